"""The one progress helper: a bar on a terminal, log lines in task logs and pipes, nothing when off."""
from __future__ import annotations

import io
import logging

import pytest

from shoplens import progress as progress_module
from shoplens.progress import configure, progress, progress_line, resolve_mode


class FakeStream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture(autouse=True)
def default_mode(monkeypatch):
    monkeypatch.delenv(progress_module.ENV_MODE, raising=False)
    configure()
    yield
    configure()


def test_a_terminal_gets_a_bar_and_a_pipe_or_task_log_gets_lines():
    assert resolve_mode(stream=FakeStream(tty=True)) == "bar"
    assert resolve_mode(stream=FakeStream(tty=False)) == "log"


def test_json_mode_switches_the_bar_off_per_loop_per_process_or_by_environment(monkeypatch):
    terminal = FakeStream(tty=True)
    assert resolve_mode(enabled=False, stream=terminal) == "log"
    configure(bars=False)
    assert resolve_mode(stream=terminal) == "log"
    configure()
    monkeypatch.setenv("SHOPLENS_PROGRESS", "log")
    assert resolve_mode(stream=terminal) == "log"
    monkeypatch.setenv("SHOPLENS_PROGRESS", "off")
    assert resolve_mode(stream=terminal) == "off"
    monkeypatch.setenv("SHOPLENS_PROGRESS", "bar")
    assert resolve_mode(stream=FakeStream(tty=False)) == "bar"
    with pytest.raises(ValueError, match="progress mode"):
        configure("sometimes")


def test_log_mode_writes_done_total_percent_rate_and_eta_lines(caplog):
    caplog.set_level(logging.INFO, logger="shoplens.progress")
    items = list(progress(["a", "b", "c", "d"], "dedup hashing", unit="photos", interval=0,
                          stream=FakeStream(tty=False)))
    assert items == ["a", "b", "c", "d"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("dedup hashing: 1/4 photos (25.0%), ") and ", ETA " in lines[0]
    assert "photos/s" in lines[0]
    assert lines[-1].startswith("dedup hashing: 4/4 photos (100.0%), ") and "done in" in lines[-1]


def test_log_mode_throttles_to_the_interval_or_each_tenth_and_always_logs_the_last(caplog):
    caplog.set_level(logging.INFO, logger="shoplens.progress")
    with progress(total=100, desc="filter detection", unit="photos", interval=3600,
                  stream=FakeStream(tty=False)) as bar:
        for _ in range(100):
            bar.advance()
    done = [int(r.getMessage().split(": ")[1].split("/")[0]) for r in caplog.records]
    assert done == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]


def test_a_loop_that_stops_early_still_logs_how_far_it_got(caplog):
    caplog.set_level(logging.INFO, logger="shoplens.progress")
    with pytest.raises(RuntimeError):
        for k in progress(range(50), "build export", unit="photos", interval=3600,
                          stream=FakeStream(tty=False)):
            if k == 7:
                raise RuntimeError("object store down")
    assert caplog.records[-1].getMessage().startswith("build export: 7/50 photos")


def test_bar_mode_draws_a_bar_and_nothing_in_the_log(caplog):
    caplog.set_level(logging.INFO, logger="shoplens.progress")
    terminal = FakeStream(tty=True)
    with progress(total=3, desc="predict", unit="photos", stream=terminal) as bar:
        assert bar.mode == "bar"
        bar.advance(3)
    drawn = terminal.getvalue()
    assert "predict" in drawn and "3/3" in drawn and "━" in drawn
    assert caplog.records == []


def test_a_loop_inside_a_live_bar_logs_lines_instead_of_a_second_bar(caplog):
    caplog.set_level(logging.INFO, logger="shoplens.progress")
    terminal = FakeStream(tty=True)
    with progress(total=1, desc="outer", stream=terminal) as outer:
        inner = progress(total=2, desc="inner", stream=terminal, interval=0)
        assert outer.mode == "bar" and inner.mode == "log"
        inner.advance(2)
        inner.close()
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["inner"]
    # The outer bar is closed: the next loop may draw one again.
    with progress(total=1, desc="again", stream=terminal) as again:
        assert again.mode == "bar"


def test_off_mode_is_silent(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="shoplens.progress")
    monkeypatch.setenv("SHOPLENS_PROGRESS", "off")
    terminal = FakeStream(tty=True)
    assert list(progress([1, 2], "quiet", stream=terminal, interval=0)) == [1, 2]
    assert terminal.getvalue() == "" and caplog.records == []


def test_the_line_without_a_total_gives_count_and_rate_only():
    assert progress_line("crawl", 5, None, "categories", 10.0) == "crawl: 5 categories, 0.5 categories/s"
    assert progress_line("x", 1, 4, "photos", 1.0).endswith("ETA 3s")
