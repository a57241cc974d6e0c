"""Progress of long loops: a rich bar on a terminal, log lines everywhere else.

    from shoplens.progress import progress

    for path in progress(paths, "filter detection", unit="photos"):
        ...
    with progress(total=len(todo), desc="dedup hashing", unit="photos") as bar:
        for chunk in chunks:
            ...
            bar.advance(len(chunk))

Where the output goes is decided once per loop:

- **bar**: a rich progress bar on stderr, when stderr is a terminal;
- **log**: otherwise (Airflow task logs, pipes, files), lines through :mod:`logging` (logger
  ``shoplens.progress``, level INFO) of the form
  ``filter detection: 120/1000 photos (12.0%), 4.3 photos/s, ETA 3m25s``: the first update, then
  at most one per ``interval`` seconds (``SHOPLENS_PROGRESS_INTERVAL``, default 30) or per tenth
  of the total, and always the last;
- **off**: nothing.

Switches, strongest first:

- ``progress(..., enabled=False)`` turns the bar off for that loop (log lines remain, so a
  ``--json`` command keeps its stdout and stderr free of bar characters);
- :func:`configure` sets the mode for the whole process (``configure(bars=False)`` is what a
  ``--json`` command line calls once, for loops deep inside the stages it runs);
- the environment variable ``SHOPLENS_PROGRESS``: ``auto`` (default: bar on a TTY, else log),
  ``log`` (never a bar), ``off`` (neither bars nor lines), ``bar`` (a bar even without a TTY).

Only one bar is shown at a time: a loop started while a bar is live logs lines instead.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, Iterable, Iterator, TextIO

log = logging.getLogger("shoplens.progress")

ENV_MODE = "SHOPLENS_PROGRESS"
ENV_INTERVAL = "SHOPLENS_PROGRESS_INTERVAL"
MODES = ("auto", "bar", "log", "off")
DEFAULT_INTERVAL = 30.0

_configured: dict[str, Any] = {"mode": None}
_live_bars = 0
_lock = threading.Lock()


def configure(mode: str | None = None, *, bars: bool | None = None) -> None:
    """Set the process-wide mode (one of :data:`MODES`), or ``bars=False`` for 'log'.
    ``configure()`` with no arguments returns to the environment's choice."""
    if bars is not None:
        mode = "auto" if bars else "log"
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode must be one of {MODES}, got {mode!r}")
    _configured["mode"] = mode


def resolve_mode(enabled: bool | None = None, stream: TextIO | None = None) -> str:
    """'bar', 'log' or 'off' for a loop, from its ``enabled`` flag, :func:`configure`, the
    environment and whether ``stream`` (default stderr) is a terminal."""
    mode = _configured["mode"] or os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if mode not in MODES:
        log.warning("%s=%r is not one of %s; using auto", ENV_MODE, mode, MODES)
        mode = "auto"
    if mode == "off":
        return "off"
    if enabled is False or mode == "log":
        return "log"
    if mode == "bar":
        return "bar"
    return "bar" if _isatty(stream if stream is not None else sys.stderr) else "log"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _interval_from_env() -> float:
    try:
        return max(0.0, float(os.environ.get(ENV_INTERVAL, DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    """``desc: done/total unit (pct), rate unit/s, ETA`` (without total: ``desc: done unit, rate``)."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        line = f"{desc}: {done}/{total} {unit} ({100 * done / total:.1f}%), {rate:.1f} {unit}/s"
        if done >= total:
            return f"{line}, done in {_duration(elapsed)}"
        eta = _duration((total - done) / rate) if rate > 0 else "unknown"
        return f"{line}, ETA {eta}"
    return f"{desc}: {done} {unit}, {rate:.1f} {unit}/s"


class Progress:
    """One loop's progress; iterate over it, or call :meth:`advance`. Use as a context manager
    (or call :meth:`close`) so the bar is removed and the last line logged."""

    def __init__(self, iterable: Iterable | None = None, desc: str = "working", *,
                 total: int | None = None, unit: str = "items", enabled: bool | None = None,
                 interval: float | None = None, logger: logging.Logger | None = None,
                 stream: TextIO | None = None):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
        self.done = 0
        self.interval = _interval_from_env() if interval is None else interval
        self.log = logger or log
        self._stream = stream
        self._started = time.monotonic()
        self._last_logged_at: float | None = None
        self._last_logged_done = 0
        self._closed = False
        self._bar = None
        self.mode = resolve_mode(enabled, stream)
        if self.mode == "bar":
            self._start_bar()

    def _start_bar(self) -> None:
        global _live_bars
        with _lock:
            if _live_bars:  # rich shows one live display at a time: this loop logs instead
                self.mode = "log"
                return
            _live_bars += 1
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                   TaskProgressColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        console = Console(file=self._stream or sys.stderr,
                          force_terminal=True if self._stream is not None else None)
        self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn(self.unit),
                                 TaskProgressColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=console, transient=False,
                                 # Prints to a piped stdout stay in the pipe, not in the bar's stream.
                                 redirect_stdout=_isatty(sys.stdout))
        self._task = self._bar.add_task(self.desc, total=self.total)
        self._bar.start()

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this Progress has no iterable; call advance() instead")
        try:
            for item in self.iterable:
                yield item
                self.advance()
        finally:
            self.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.mode == "bar":
            self._bar.update(self._task, completed=self.done)
        elif self.mode == "log":
            now = time.monotonic()
            step = (self.total or 0) / 10
            due = (self._last_logged_at is None
                   or now - self._last_logged_at >= self.interval
                   or (step and self.done - self._last_logged_done >= step)
                   or (self.total is not None and self.done >= self.total))
            if due:
                self._log_line(now)

    def _log_line(self, now: float) -> None:
        self.log.info("%s", progress_line(self.desc, self.done, self.total, self.unit,
                                          now - self._started))
        self._last_logged_at, self._last_logged_done = now, self.done

    def close(self) -> None:
        global _live_bars
        if self._closed:
            return
        self._closed = True
        if self.mode == "bar" and self._bar is not None:
            self._bar.stop()
            with _lock:
                _live_bars -= 1
        elif self.mode == "log" and self.done != self._last_logged_done:
            self._log_line(time.monotonic())  # the last count, even when the loop stopped early


def progress(iterable: Iterable | None = None, desc: str = "working", **options) -> Progress:
    """A :class:`Progress` over ``iterable`` (or over ``total=`` units advanced by hand)."""
    return Progress(iterable, desc, **options)
