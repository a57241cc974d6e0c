"""The ``shoplens`` command tree (shoplens/cli.py): every stage under one command, the same exit
codes everywhere (0 ok, 1 failed, 2 usage or bad input, 3 service unreachable) with one-line
errors, ``--json`` output that parses, the model lifecycle verbs, and the installable package."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from shoplens import cli
from shoplens.dev.services import free_port_block

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
DECLARED = PYPROJECT["project"]["entry-points"]["shoplens.commands"]
STAGE_COMMANDS = ("crawl", "dedup", "filter", "build", "train", "evaluate", "predict", "export",
                  "lineage", "diff", "override", "models", "demo")
PACKAGES = ("shoplens", "crawler", "dataset", "modeling")


def closed_port_url() -> str:
    return f"postgresql+psycopg2://nobody@127.0.0.1:{free_port_block(1)}/shoplens"


def run_shoplens(*args: str, env: dict | None = None, cwd: Path = REPO,
                 executable: list[str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*(executable or [sys.executable, "-m", "shoplens"]), *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=180)


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------
def test_help_lists_every_stage_command_without_importing_any_stage():
    """`shoplens --help` names every stage's command with its one-line help, read from the
    commands' docstrings: no stage (and no TensorFlow, Scrapy or Airflow) is imported for it."""
    probe = ("import sys; from shoplens.cli import main; code = main(['--help']); "
             "heavy = [m for m in ('tensorflow', 'keras', 'scrapy', 'airflow', 'onnxruntime', "
             "'sqlalchemy', 'crawler', 'dataset', 'modeling') if m in sys.modules]; "
             "print('IMPORTED', heavy); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line.split(None, 1)[1] for line in done.stdout.splitlines()
              if line.startswith("  ") and len(line.split()) > 1}
    assert set(STAGE_COMMANDS) <= set(listed)
    assert all(listed[name] for name in STAGE_COMMANDS), listed  # every command has a help line
    assert "IMPORTED []" in done.stdout
    assert "3 service unreachable" in done.stdout

    models = run_shoplens("models", "--help")
    assert models.returncode == 0
    assert {"list", "promote", "rollback", "fetch"} <= {
        line.split()[0] for line in models.stdout.splitlines() if line.startswith("  ")}


def test_every_declared_command_is_a_callable_main_of_its_stage():
    """The tree is the pyproject's `shoplens.commands` entry points; each names a function
    that exists, and the core module itself imports no stage."""
    tree = cli.command_tree(DECLARED)
    assert set(STAGE_COMMANDS) <= set(tree.children)
    for name, target in DECLARED.items():
        assert callable(cli.load(target)), name
    stage_roots = {"crawler", "dataset", "modeling", "plugins", "dags"}
    import ast

    imported = set()
    for node in ast.walk(ast.parse((REPO / "shoplens" / "cli.py").read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & stage_roots


def test_version_prints_the_shoplens_version_on_the_tree_and_on_every_command(capsys):
    """`--version` is the software's version everywhere (a dataset version is --dataset-version)."""
    expected = f"shoplens {PYPROJECT['project']['version']}"
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == expected
    for command in (["dedup"], ["lineage"], ["train"], ["models", "list"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main([*command, "--version"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.strip() == expected, command


def test_the_old_version_flag_still_names_a_dataset_version_with_a_warning(monkeypatch, capsys):
    """`--version V` (the old spelling) is read as --dataset-version V, never as "print the
    version and exit 0", which would silently skip the work a script asked for."""
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", closed_port_url())
    assert cli.main(["lineage", "0" * 64, "--version", "v0003"]) == 3  # it went to the manifest
    err = capsys.readouterr().err
    assert "--version v0003 is deprecated: use --dataset-version v0003" in err


# --------------------------------------------------------------------------------------------
# Exit codes and one-line errors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["no-such-command"], [], ["models"], ["models", "nope"], ["diff", "v0001"],
    ["dedup", "/no/such/folder"], ["train"], ["build", "--materialise", "v0001"],
])
def test_usage_errors_exit_2(argv):
    done = run_shoplens(*argv)
    assert done.returncode == 2, (argv, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("argv", [
    ["models", "list"], ["models", "rollback"], ["diff", "v0001", "v0002"],
    ["lineage", "0" * 64], ["override", "--list"], ["crawl", "summary", "--run-key", "r"],
    ["build", "--summary"], ["ops", "metrics"], ["predict", "--json", "photo.jpg"],
])
def test_an_unreachable_manifest_exits_3_with_one_line(argv, tmp_path):
    """A closed port where the manifest should be: exit 3 and exactly one line on stderr that
    names the manifest database (no traceback, for every command that reads the manifest)."""
    (tmp_path / "photo.jpg").write_bytes(b"not needed: the model is looked up first")
    done = run_shoplens(*argv, cwd=tmp_path,
                        env={"SHOPLENS_MANIFEST_URL": closed_port_url(), "PYTHONPATH": str(REPO)})
    assert done.returncode == 3, (argv, done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "manifest" in errors[0] and "unreachable" in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def test_an_unreachable_object_store_exits_3(tmp_path):
    done = run_shoplens("export", "--model", "m-20260101-abc", "--out", str(tmp_path / "out"),
                        env={"SHOPLENS_S3_ENDPOINT": f"127.0.0.1:{free_port_block(1)}",
                             "SHOPLENS_MODEL_WORK_DIR": str(tmp_path / "work")})
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: cannot load model m-20260101-abc")
    assert "Traceback" not in done.stderr


def test_an_unmigrated_manifest_is_a_failure_in_one_line(fresh_database, monkeypatch, capsys):
    """The database answers but the migrations were never applied: exit 1, the fix in one line."""
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", fresh_database)
    assert cli.main(["lineage", "0" * 64]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apply the migrations" in err


def test_a_bad_setting_is_bad_input_not_a_traceback():
    done = run_shoplens("models", "list", env={"SHOPLENS_BEST_N": "many"})
    assert done.returncode == 2
    assert done.stderr.strip() == "error: SHOPLENS_BEST_N must be an integer, got 'many'"


def test_a_command_whose_module_cannot_be_imported_says_so_in_one_line(capsys):
    """An installation without its dependencies: exit 1 and the missing module, no traceback."""
    assert cli.main(["ghost"], points={"ghost": "shoplens_no_such_module:main"}) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shoplens ghost cannot be loaded" in err
    assert "shoplens_no_such_module" in err


def test_an_unexpected_exception_is_a_bug_and_keeps_its_traceback():
    """Only expected failures are turned into one line: a programming error still shows where."""
    with pytest.raises(ZeroDivisionError):
        cli.command()(lambda argv: 1 / 0)([])


def test_the_python_m_aliases_run_the_same_commands():
    """`python -m dataset ...` and `python -m modeling ...` are the same tree, under their name."""
    done = subprocess.run([sys.executable, "-m", "dataset", "diff"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "usage: python -m dataset diff" in done.stderr
    done = subprocess.run([sys.executable, "-m", "modeling", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert {"train", "evaluate", "predict", "export", "models"} <= {
        line.split()[0] for line in done.stdout.splitlines() if line.startswith("  ")}


# --------------------------------------------------------------------------------------------
# --json
# --------------------------------------------------------------------------------------------
@pytest.fixture
def photo_folder(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((64, 48))
    img.save(folder / "a.png")
    img.resize((128, 96)).save(folder / "a_large.png")
    other = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((64, 48))
    other.save(folder / "other.png")
    return folder


def test_json_output_parses_and_logs_stay_on_stderr(photo_folder):
    done = run_shoplens("dedup", "--json", str(photo_folder))
    assert done.returncode == 0, done.stderr
    [cluster] = [json.loads(line) for line in done.stdout.splitlines()]
    assert cluster["size"] == 2 and cluster["representative"].endswith("a_large.png")
    text = run_shoplens("dedup", str(photo_folder))
    assert text.returncode == 0 and text.stdout.startswith("2 near-duplicates")


def test_json_mode_switches_progress_bars_off_for_the_command_only(monkeypatch):
    """--json turns progress bars into log lines on stderr (shoplens.progress), in this process
    and, through SHOPLENS_PROGRESS=log, in its child processes; the mode ends with the command."""
    from shoplens import progress

    monkeypatch.delenv("SHOPLENS_PROGRESS", raising=False)

    class Terminal:
        @staticmethod
        def isatty():
            return True

    seen = {}

    @cli.command()
    def probe(argv):
        cli.parse_args(cli.argument_parser("probe"), argv)
        seen["mode"] = progress.resolve_mode(stream=Terminal())
        seen["env"] = os.environ.get("SHOPLENS_PROGRESS")
        return 0

    assert probe([]) == 0 and seen == {"mode": "bar", "env": None}
    assert probe(["--json"]) == 0 and seen == {"mode": "log", "env": "log"}
    assert not cli.json_mode() and "SHOPLENS_PROGRESS" not in os.environ
    assert progress.resolve_mode(stream=Terminal()) == "bar"
    monkeypatch.setenv("SHOPLENS_PROGRESS", "off")  # off stays off under --json too
    assert probe(["--json"]) == 0 and seen == {"mode": "off", "env": "off"}


def test_a_json_command_shows_no_bar_even_on_a_terminal(photo_folder):
    """`shoplens dedup --json` under a pseudo-terminal: stdout is only JSON lines and stderr has
    no bar, while the same command without --json draws one."""
    import pty

    def run_on_tty(*args):
        leader, follower = pty.openpty()
        proc = subprocess.Popen([sys.executable, "-m", "shoplens", *args], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=follower, stdin=follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        out = proc.stdout.read().decode()
        proc.wait(timeout=120)
        os.close(leader)
        return proc.returncode, out, b"".join(chunks).decode(errors="replace")

    code, out, err = run_on_tty("dedup", "--json", str(photo_folder))
    assert code == 0 and [json.loads(line)["size"] for line in out.splitlines()] == [2]
    assert "━" not in err  # rich's bar
    code, out, err = run_on_tty("dedup", str(photo_folder))
    assert code == 0 and "━" in err, err


# --------------------------------------------------------------------------------------------
# Model lifecycle
# --------------------------------------------------------------------------------------------
@pytest.fixture
def models(manifest_url, monkeypatch):
    """Three complete models (m1 promoted by the training gate, m2 and m3 not) and a failed one."""
    from modeling import registry
    from shoplens.config import Settings

    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    settings = Settings(manifest_url=manifest_url)
    for model_id, top1 in (("m1", 0.80), ("m2", 0.85), ("m3", 0.70)):
        registry.begin(settings, model_id, "v0001", "offline", {})
        rows = registry.metric_rows(model_id, "v0001", "test",
                                    {"ensemble": {"top1": top1, "top3": 0.9, "n": 10}}, False)
        registry.complete(settings, model_id, rows, {},
                          lambda conn, current: (current is None, "first model" if current is None
                                                 else "not better"))
    registry.begin(settings, "m-failed", "v0001", "offline", {})
    registry.fail(settings, "m-failed", "boom")
    return settings


def current_model(settings) -> str | None:
    from modeling import registry

    return registry.current_model_id(settings)


def promotion_rows(settings) -> list[tuple]:
    from shoplens.manifest import engine_for

    with engine_for(settings.manifest_url).connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT model_id, previous_model_id, reason FROM model_promotions ORDER BY id"))]


def test_models_list_marks_the_current_model_and_its_scores(models, capsys):
    assert cli.main(["models", "list", "--json"]) == 0
    listed = {m["id"]: m for m in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(listed) == {"m1", "m2", "m3", "m-failed"}
    assert [i for i, m in listed.items() if m["current"]] == ["m1"]
    assert listed["m2"]["top1"] == pytest.approx(0.85) and listed["m-failed"]["top1"] is None
    assert listed["m-failed"]["status"] == "failed"
    assert cli.main(["models", "list"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("* m1  complete")


def test_promote_and_rollback_change_the_current_model_through_promotion_rows(models, capsys):
    """promote adds the same row the training gate adds; rollback makes the model that was
    current before the current one current again (a second rollback undoes the first)."""
    assert cli.main(["models", "promote", "m2", "--reason", "better on the new shop photos"]) == 0
    assert current_model(models) == "m2"
    assert capsys.readouterr().out.startswith("current model: m2 (was m1)")

    assert cli.main(["models", "rollback", "--reason", "misbehaves on phones", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"model_id": "m1", "kind": "ensemble", "previous_model_id": "m2",
                      "changed": True, "reason": "rollback from m2: misbehaves on phones"}
    assert current_model(models) == "m1"

    assert cli.main(["models", "rollback", "--to", "m3"]) == 0
    assert current_model(models) == "m3"
    assert promotion_rows(models) == [
        ("m1", None, "first model"),
        ("m2", "m1", "better on the new shop photos"),
        ("m1", "m2", "rollback from m2: misbehaves on phones"),
        ("m3", "m1", "rollback from m1"),
    ]
    # Promoting the current model again changes nothing and adds no row.
    assert cli.main(["models", "promote", "m3", "--reason", "again"]) == 0
    assert len(promotion_rows(models)) == 4


@pytest.mark.parametrize("argv, message", [
    (["models", "promote", "m-failed", "--reason", "x"], "model m-failed is failed"),
    (["models", "promote", "m-nope", "--reason", "x"], "no model 'm-nope'"),
    (["models", "promote", "m2", "--reason", " "], "a reason is required"),
    (["models", "rollback", "--to", "m-nope"], "no model 'm-nope'"),
    (["models", "rollback"], "m1 was the first current model"),
])
def test_impossible_promotions_are_bad_input_and_change_nothing(models, capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert current_model(models) == "m1" and len(promotion_rows(models)) == 1


def test_rollback_before_any_promotion_says_there_is_nothing_to_roll_back(manifest_url,
                                                                          monkeypatch, capsys):
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    assert cli.main(["models", "rollback"]) == 2
    assert "nothing to roll back" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The installable package
# --------------------------------------------------------------------------------------------
def _source_copy(dest: Path) -> Path:
    """What `pip install .` reads, copied so that building leaves the checkout untouched."""
    for name in ("pyproject.toml", "README.md", "requirements.in", "requirements-dev.in"):
        shutil.copy2(REPO / name, dest / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, dest / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    [built] = out.glob("shoplens-*.whl")
    return built


def test_the_wheel_holds_the_packages_the_migrations_and_the_console_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(REPO).as_posix() for package in PACKAGES
               for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts}
    assert sources <= names, sorted(sources - names)[:5]
    migrations = {p.relative_to(REPO).as_posix()
                  for p in (REPO / "shoplens/manifest/migrations").rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts}
    assert "shoplens/manifest/migrations/script.py.mako" in migrations and migrations <= names
    assert not {n for n in names if n.startswith(("tests/", "dags/", "plugins/", "benchmarks/"))}

    [dist_info] = {n.split("/")[0] for n in names if ".dist-info/" in n}
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}/entry_points.txt").decode()
    assert "[console_scripts]\nshoplens = shoplens.cli:main" in entry_points
    for name, target in DECLARED.items():
        assert f"{name} = {target}" in entry_points
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    runtime = [line for line in (REPO / "requirements.in").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    required = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert len(required) == len(runtime) and "pytest" not in " ".join(required)
    assert 'Requires-Dist: pytest; extra == "dev"' in metadata


def test_pip_install_into_a_fresh_venv_gives_a_working_shoplens_command(tmp_path):
    """`pip install .` into a fresh venv (one that sees the already installed dependencies, as
    an Airflow image does) gives the `shoplens` console script; it works outside the checkout."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    # The dependencies (setuptools and wheel for the build too): the shared virtualenv's
    # site-packages, seen through a .pth file, since a venv's "system" is the base interpreter.
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and
                (p / "sqlalchemy").is_dir())
    (site / "shared-deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    src = tmp_path / "src"
    src.mkdir()
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                           "--no-build-isolation", "."], cwd=_source_copy(src),
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    script = str(venv / "bin" / "shoplens")
    helped = subprocess.run([script, "--help"], cwd=outside, env=env, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    listed = {line.split()[0]: line.split(None, 1)[1:] for line in helped.stdout.splitlines()
              if line.startswith("  ")}
    assert set(STAGE_COMMANDS) <= set(listed)
    assert all(listed[name] for name in STAGE_COMMANDS), listed  # help read from the installed files
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import shoplens.cli, crawler, sys; print(shoplens.cli.__file__); "
                            "print(shoplens.cli.version())"],
                           cwd=outside, env=env, capture_output=True, text=True, timeout=120)
    module_file, version = where.stdout.split()
    assert module_file.startswith(str(venv)) and version == PYPROJECT["project"]["version"]
    unreachable = subprocess.run([script, "models", "list"], cwd=outside,
                                 env={**env, "SHOPLENS_MANIFEST_URL": closed_port_url()},
                                 capture_output=True, text=True, timeout=120)
    assert unreachable.returncode == 3, unreachable.stderr


def test_test_servers_get_ports_below_the_kernels_outgoing_range(monkeypatch):
    """A port picked for a local server is free and outside the range the kernel hands to
    outgoing connections, which could take it before the server binds."""
    from shoplens.dev import services

    monkeypatch.setattr(services, "_ephemeral_ports", lambda: (32768, 60999))
    ports = [free_port_block(3) for _ in range(50)]
    assert all(20000 <= p and p + 3 <= 32768 for p in ports)
    assert all(services.port_is_free(p + i) for p in ports[:5] for i in range(3))
    monkeypatch.setattr(services, "_ephemeral_ports", lambda: (1024, 65535))  # no room below
    assert 20000 <= free_port_block(1) < 60000
