"""``shoplens``: the one command tree, and the exit codes and error lines every command shares.

The tree is not written here: each stage declares its commands as entry points in the group
``shoplens.commands`` (``pyproject.toml``), each naming a ``main(argv) -> int``; a dotted name
(``models.promote``) is a subcommand of a group (``shoplens models promote``). They are found with
``importlib.metadata`` (or, in a source checkout, read from the ``pyproject.toml`` beside this
package) and a command's module is imported only when that command runs, so the core imports no
stage and ``shoplens --help`` stays fast (help lines are read from the docstrings, not imported).

Exit codes, the same for every command (and for the ``python -m`` aliases):
0 ok; 1 failed; 2 usage error or bad input (unknown id, bad setting, missing file);
3 a service is unreachable (the manifest database or the object store).
Expected failures are one ``error: ...`` line on stderr, never a traceback.

``--json`` puts results on stdout as JSON (one object per line) and switches progress bars off
(:func:`set_json_mode`: ``shoplens.progress`` logs lines instead, here and in child processes);
logs go to stderr.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

DIST_NAME = "shoplens"
ENTRY_POINT_GROUP = "shoplens.commands"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_CODES_HELP = ("exit codes: 0 ok, 1 failed, 2 usage error or bad input, "
                   "3 service unreachable (manifest database or object store)")


class CommandError(Exception):
    """An expected failure: reported as one line, exit status 1."""

    exit_code = EXIT_FAILED


class BadInput(CommandError):
    """The user asked for something that does not exist or cannot be done: exit status 2."""

    exit_code = EXIT_USAGE


class ServiceUnreachable(CommandError):
    """The manifest database or the object store cannot be reached: exit status 3."""

    exit_code = EXIT_UNREACHABLE


# --------------------------------------------------------------------------------------------
# Version, output mode
# --------------------------------------------------------------------------------------------
def version() -> str:
    """The installed distribution's version; the source tree's when shoplens is not installed."""
    from importlib import metadata

    try:
        return metadata.version(DIST_NAME)
    except metadata.PackageNotFoundError:
        table = _pyproject()
        return str((table or {}).get("project", {}).get("version", "0+unknown"))


_json_mode = False


def set_json_mode(on: bool = True) -> None:
    """Results as JSON on stdout and no progress bars: for loops deep inside the stages
    (:func:`shoplens.progress.configure`, log lines on stderr remain) and for child processes
    (``SHOPLENS_PROGRESS=log``, unless progress is switched off altogether)."""
    global _json_mode
    from shoplens import progress

    _json_mode = on
    switched_off = os.environ.get(progress.ENV_MODE, "").strip().lower() == "off"
    progress.configure(bars=False if on and not switched_off else None)
    if on and not switched_off:
        os.environ[progress.ENV_MODE] = "log"


def _restore_output_mode(was_json: bool, progress_env: str | None) -> None:
    if _json_mode != was_json:
        set_json_mode(was_json)
    from shoplens.progress import ENV_MODE

    if progress_env is None:
        os.environ.pop(ENV_MODE, None)
    else:
        os.environ[ENV_MODE] = progress_env


def json_mode() -> bool:
    return _json_mode


@contextlib.contextmanager
def own_output_mode():
    """--json lasts for one command only: callers in the same process (tests, the next command)
    keep their own output mode and progress setting."""
    saved = _json_mode, os.environ.get("SHOPLENS_PROGRESS")  # progress.ENV_MODE
    try:
        yield
    finally:
        _restore_output_mode(*saved)


def emit(result: Any, human: Callable[[Any], str] | None = None, out: TextIO | None = None) -> None:
    """Print a command's result: one JSON line with ``--json``, else ``human(result)`` (indented
    JSON when the command has no text form)."""
    out = out if out is not None else sys.stdout
    if _json_mode:
        text = json.dumps(result, ensure_ascii=False, default=str)
    elif human is not None:
        text = human(result)
    else:
        text = json.dumps(result, ensure_ascii=False, default=str, indent=2)
    print(text, file=out, flush=True)


# --------------------------------------------------------------------------------------------
# Argument parsing shared by every command
# --------------------------------------------------------------------------------------------
_invoked_as: list[str] = []  # the command line the tree dispatched to, e.g. ["shoplens", "models", "list"]


def prog_name(alias: str) -> str:
    """``shoplens <command>`` when run through the tree, else the ``python -m`` alias given."""
    return " ".join(_invoked_as) if _invoked_as else alias


class _VersionAction(argparse.Action):
    """``--version`` prints the shoplens version. On commands that used to take ``--version V``
    for a dataset version, a value is still read as the deprecated spelling of
    ``--dataset-version V``: an old script's ``train --version v0007`` must still train, not
    print the version and exit 0."""

    def __init__(self, option_strings, dest, legacy_dest: str | None = None, **kwargs):
        self.legacy_dest = legacy_dest
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                         nargs="?" if legacy_dest else 0,
                         metavar=legacy_dest.upper() if legacy_dest else None, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if self.legacy_dest and values:
            print(f"warning: {option_string} {values} is deprecated: use --dataset-version {values}",
                  file=sys.stderr)
            setattr(namespace, self.legacy_dest, values)
            return
        print(f"shoplens {version()}")
        parser.exit(EXIT_OK)


def argument_parser(alias: str, description: str | None = None, *, json_flag: bool = True,
                    legacy_version_dest: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the flags every command has: ``--version`` and (for commands
    that print results) ``--json``. ``alias`` is the ``python -m`` spelling of the command."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    epilog = kwargs.pop("epilog", None)
    parser = argparse.ArgumentParser(prog=prog_name(alias), description=description,
                                     epilog="\n\n".join(filter(None, [epilog, EXIT_CODES_HELP])),
                                     **kwargs)
    parser.add_argument("--version", action=_VersionAction, legacy_dest=legacy_version_dest,
                        help="print the shoplens version and exit"
                        + (" (with a value: deprecated spelling of --dataset-version)"
                           if legacy_version_dest else ""))
    if json_flag:
        parser.add_argument("--json", action="store_true",
                            help="results as JSON on stdout (one object per line), no progress bars")
    return parser


def add_json_flag(subparser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--json`` after a subcommand too (``shoplens crawl run --json``), not only before it."""
    subparser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                           help="results as JSON on stdout (one object per line), no progress bars")
    return subparser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if getattr(args, "json", False):
        set_json_mode(True)
    return args


# --------------------------------------------------------------------------------------------
# Exceptions -> exit status + one line
# --------------------------------------------------------------------------------------------
def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _unreachable(exc: BaseException) -> str | None:
    """Which service an exception (or one it was raised from) says is unreachable, if any."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    urllib3_exc = sys.modules.get("urllib3.exceptions")
    for cause in _causes(exc):
        if sa_exc is not None and isinstance(cause, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return f"the manifest database is unreachable: {_one_line(cause.orig or cause, 200)}"
        if urllib3_exc is not None and isinstance(cause, (urllib3_exc.MaxRetryError,
                                                           urllib3_exc.NewConnectionError,
                                                           urllib3_exc.ProtocolError,
                                                           urllib3_exc.TimeoutError)):
            return f"the object store is unreachable: {_one_line(cause, 200)}"
        if isinstance(cause, ServiceUnreachable):
            return str(cause)
    return None


def classify(exc: BaseException, bad_input: tuple[type, ...] = (),
             failed: tuple[type, ...] = ()) -> tuple[int, str] | None:
    """(exit status, one-line message) for an expected failure; None for a bug (traceback)."""
    if isinstance(exc, ServiceUnreachable):
        return EXIT_UNREACHABLE, _one_line(exc)
    unreachable = _unreachable(exc)
    if unreachable is not None:
        return EXIT_UNREACHABLE, _one_line(unreachable)
    if isinstance(exc, CommandError):
        return exc.exit_code, _one_line(exc)
    from shoplens.config import ConfigError

    if isinstance(exc, (ConfigError, *bad_input)):
        return EXIT_USAGE, _one_line(exc)
    if isinstance(exc, failed):
        return EXIT_FAILED, _one_line(exc)
    manifest_db = sys.modules.get("shoplens.manifest.db")
    if manifest_db is not None and isinstance(exc, manifest_db.ManifestNotMigrated):
        return EXIT_FAILED, _one_line(exc)
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None and isinstance(exc, sa_exc.DBAPIError):
        message = "the manifest database refused: " + _one_line(exc.orig or exc, 300)
        if getattr(exc.orig, "pgcode", None) == "42P01":  # undefined table: never migrated
            message += " (apply the migrations: shoplens.manifest.upgrade, or the image's `init`)"
        return EXIT_FAILED, message
    minio_error = sys.modules.get("minio.error")
    if minio_error is not None and isinstance(exc, minio_error.S3Error):
        return EXIT_FAILED, "the object store refused: " + _one_line(exc, 300)
    return None


def report(exc: BaseException, bad_input: tuple[type, ...] = (), failed: tuple[type, ...] = (),
           err: TextIO | None = None) -> int | None:
    """Print the one-line error of an expected failure and return its exit status (else None)."""
    verdict = classify(exc, bad_input, failed)
    if verdict is None:
        return None
    code, message = verdict
    print(f"error: {message}", file=err if err is not None else sys.stderr, flush=True)
    return code


def command(bad_input: tuple[type, ...] = (), failed: tuple[type, ...] = ()):
    """Decorate a ``main(argv) -> int``: expected failures become one stderr line and their exit
    status (``bad_input`` types -> 2, ``failed`` types -> 1, unreachable services -> 3, plus the
    ones every command shares); anything else is a bug and keeps its traceback."""

    def wrap(main: Callable[..., int | None]) -> Callable[..., int]:
        @functools.wraps(main)
        def guarded(argv: list[str] | None = None) -> int:
            with own_output_mode():
                try:
                    return int(main(argv) or 0)
                except KeyboardInterrupt:
                    print("error: interrupted", file=sys.stderr)
                    return 130
                except Exception as exc:
                    code = report(exc, bad_input, failed)
                    if code is None:
                        raise
                    return code

        return guarded

    return wrap


# --------------------------------------------------------------------------------------------
# The command tree, from entry points
# --------------------------------------------------------------------------------------------
@dataclass
class Command:
    name: str
    target: str = ""  # "module:function", empty for a group
    children: dict[str, "Command"] = field(default_factory=dict)

    def help_line(self) -> str:
        if self.children:
            return "{" + ",".join(self.children) + "}"
        return _docstring_line(self.target)


@functools.lru_cache(maxsize=1)
def _pyproject() -> dict | None:
    """The source checkout's pyproject.toml (the one beside this package), if there is one."""
    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if not path.is_file():
        return None
    import tomllib

    return tomllib.loads(path.read_text())


def entry_points() -> dict[str, str]:
    """{command name: "module:function"}. A source checkout's pyproject.toml wins over installed
    metadata, so an editable install never runs a stale table."""
    table = _pyproject()
    if table is not None:
        declared = table.get("project", {}).get("entry-points", {}).get(ENTRY_POINT_GROUP)
        if declared:
            return dict(declared)
    from importlib.metadata import entry_points as installed

    return {ep.name: ep.value for ep in installed(group=ENTRY_POINT_GROUP)}


def command_tree(points: dict[str, str] | None = None) -> Command:
    root = Command("shoplens")
    for name, target in sorted((points if points is not None else entry_points()).items()):
        node = root
        *groups, leaf = name.split(".")
        for group in groups:
            node = node.children.setdefault(group, Command(group))
        node.children[leaf] = Command(leaf, target)
    return root


def _docstring_line(target: str) -> str:
    """First line of the target function's docstring (else its module's), read without importing
    the module: help must not load TensorFlow, Scrapy or Airflow."""
    module, _, func = target.partition(":")
    source = _module_file(module)
    try:
        tree = ast.parse(source.read_text()) if source else None
    except (OSError, SyntaxError, ValueError):
        tree = None
    if tree is None:
        return ""
    doc = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == func:
            doc = ast.get_docstring(node)
    doc = doc or ast.get_docstring(tree) or ""
    return doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""


def _module_file(module: str) -> Path | None:
    """The source file of a dotted module, found from its top-level package's location: finding
    ``crawler.cli`` through importlib would run ``crawler/__init__.py`` (and what it imports)."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name is located, not imported
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin else None
    for location in spec.submodule_search_locations or ():
        base = Path(location).joinpath(*rest)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def load(target: str) -> Callable[[list[str]], int]:
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def _usage(node: Command, path: list[str]) -> str:
    where = " ".join(path)
    width = max((len(n) for n in node.children), default=0) + 2
    lines = [f"usage: {where} [-h] [--version] COMMAND [ARGS...]", ""]
    if len(path) == 1:
        lines += ["shoplens: review photos in, a versioned dataset and a photo-to-product model out.",
                  f"`{where} COMMAND --help` describes a command.", ""]
    lines.append("commands:")
    for name, child in node.children.items():
        lines.append(f"  {name:<{width}}{child.help_line()}")
    lines += ["", EXIT_CODES_HELP]
    return "\n".join(lines)


def main(argv: list[str] | None = None, points: dict[str, str] | None = None,
         prog: str = "shoplens") -> int:
    """The ``shoplens`` console script. ``points`` and ``prog``: a subset of the tree under another
    name (the ``python -m dataset`` / ``python -m modeling`` aliases)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    node, path = command_tree(points), [prog]
    while True:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(node, path), file=sys.stdout if argv else sys.stderr)
            return EXIT_OK if argv else EXIT_USAGE
        if argv[0] == "--version":
            print(f"shoplens {version()}")
            return EXIT_OK
        child = node.children.get(argv[0])
        if child is None:
            print(_usage(node, path), file=sys.stderr)
            print(f"error: unknown command {' '.join([*path, argv[0]])!r}",
                  file=sys.stderr)
            return EXIT_USAGE
        path.append(argv.pop(0))
        if not child.children:
            break
        node = child
    _invoked_as[:] = path
    try:
        try:
            entry = load(child.target)
        except ImportError as exc:  # an installation without its dependencies
            print(f"error: {' '.join(path)} cannot be loaded: {exc}; install shoplens with its "
                  "dependencies (pip install -c constraints.txt .)", file=sys.stderr)
            return EXIT_FAILED
        return command()(entry)(argv)
    finally:
        _invoked_as.clear()


if __name__ == "__main__":
    raise SystemExit(main())
