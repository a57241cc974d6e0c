"""Watching a run of the local Airflow stack (shoplens/dev/airflow_stack.py): ``make demo`` and
``airflow_stack trigger --wait`` print each task as it ends instead of minutes of silence."""
from __future__ import annotations

from shoplens.dev import airflow_stack
from shoplens.dev.airflow_stack import AirflowStack, TaskProgress


def _ti(task_id, state, map_index=-1, end=None, duration=None):
    return {"task_id": task_id, "state": state, "map_index": map_index, "end_date": end,
            "duration": duration}


def test_each_task_instance_is_reported_once_when_it_ends_in_the_order_they_ended():
    progress = TaskProgress()
    assert progress.lines([_ti("start_run", "running")]) == []
    first = progress.lines([_ti("start_run", "success", end="T1", duration=2.4),
                            _ti("crawl_categories", "success", 1, end="T3", duration=41.6),
                            _ti("crawl_categories", "success", 0, end="T2", duration=40.0),
                            _ti("crawl_categories", "running", 2)])
    assert first == ["start_run success 2s", "crawl_categories[0] success 40s",
                     "crawl_categories[1] success 42s"]
    again = progress.lines([_ti("start_run", "success", end="T1", duration=2.4),
                            _ti("crawl_categories", "success", 0, end="T2", duration=40.0),
                            _ti("crawl_categories", "success", 1, end="T3", duration=41.6),
                            _ti("crawl_categories", "failed", 2, end="T4", duration=None),
                            _ti("dedup", "upstream_failed", None)])
    assert again == ["dedup upstream_failed", "crawl_categories[2] failed"]


def test_a_task_retried_after_failing_is_reported_again_when_it_ends_differently():
    progress = TaskProgress()
    assert progress.lines([_ti("filter_detect", "failed", 3, end="T1")]) == ["filter_detect[3] failed"]
    assert progress.lines([_ti("filter_detect", "up_for_retry", 3)]) == []
    assert progress.lines([_ti("filter_detect", "success", 3, end="T2", duration=9)]) == [
        "filter_detect[3] success 9s"]


def test_waiting_for_a_run_passes_the_progress_lines_and_returns_its_final_state(monkeypatch,
                                                                              tmp_path):
    stack = AirflowStack(home=tmp_path, db_url="", api_port=0)
    polls = iter([("running", [_ti("start_run", "running")]),
                  ("running", [_ti("start_run", "success", end="T1", duration=1)]),
                  ("success", [_ti("start_run", "success", end="T1", duration=1),
                               _ti("report", "success", end="T2", duration=3)])])
    current = {}

    def run_state(dag_id, run_id):
        current["state"], current["tis"] = next(polls)
        return current["state"]

    monkeypatch.setattr(stack, "run_state", run_state)
    monkeypatch.setattr(stack, "task_instances", lambda dag_id, run_id: current["tis"])
    monkeypatch.setattr(airflow_stack.time, "sleep", lambda s: None)
    lines = []
    assert stack.wait_for_run("shoplens_nightly", "r1", timeout=60,
                              progress=lines.append) == "success"
    assert lines == ["start_run success 1s", "report success 3s"]


def test_task_instances_are_read_page_by_page_until_a_short_page(monkeypatch, tmp_path):
    stack = AirflowStack(home=tmp_path, db_url="", api_port=0)
    everything = [_ti(f"t{i}", "success") for i in range(5)]
    asked = []

    def api(method, path, payload=None):
        offset, limit = int(path.split("offset=")[1]), int(path.split("limit=")[1].split("&")[0])
        asked.append(offset)
        return {"task_instances": everything[offset:offset + limit]}

    monkeypatch.setattr(stack, "api", api)
    assert stack.task_instances("d", "r", page=2) == everything
    assert asked == [0, 2, 4]
