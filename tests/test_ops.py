"""Operations: failure alerts to the log and a webhook, per-stage run metrics, the run summary."""
from __future__ import annotations

import json
import logging
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from shoplens import ops
from shoplens.config import ConfigError, Settings
from shoplens.manifest.db import engine_for, upgrade
from shoplens.dev.services import free_port_block


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, self.headers["Content-Type"], json.loads(body)))
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    """A local HTTP server that records every POST; ``.status`` sets what it answers."""
    server = ThreadingHTTPServer(("127.0.0.1", free_port_block(1)), _Receiver)
    server.received, server.status = [], 204
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_port}/hooks/shoplens"
    yield server
    server.shutdown()
    server.server_close()


def _failed_task_context(error: Exception) -> dict:
    ti = SimpleNamespace(dag_id="shoplens_nightly", run_id="scheduled__2026-01-02", task_id="dedup",
                         try_number=2, log_url="http://ui/dags/shoplens_nightly/runs/x/tasks/dedup")
    return {"ti": ti, "exception": error, "run_id": ti.run_id}


def test_failure_alert_is_logged_and_posted_to_the_webhook(webhook, caplog):
    settings = Settings(alert_webhook_url=webhook.url)
    with caplog.at_level(logging.ERROR, logger="shoplens.ops"):
        ops.FailureAlert(settings)(_failed_task_context(RuntimeError("S3 refused the upload")))
    assert "task dedup (try 2) of shoplens_nightly run scheduled__2026-01-02 failed" in caplog.text
    assert "RuntimeError: S3 refused the upload" in caplog.text
    [(path, content_type, payload)] = webhook.received
    assert path == "/hooks/shoplens" and content_type == "application/json"
    assert payload["event"] == "task_failed"
    assert (payload["dag_id"], payload["task_id"], payload["try_number"]) == ("shoplens_nightly", "dedup", 2)
    assert payload["error"] == "RuntimeError: S3 refused the upload"
    assert payload["log_url"].endswith("/tasks/dedup") and payload["log_url"] in payload["text"]


def test_a_dag_run_failure_without_task_instance_is_reported_as_a_run_failure(webhook):
    dag_run = SimpleNamespace(dag_id="shoplens_nightly", run_id="manual__1")
    ops.FailureAlert(Settings(alert_webhook_url=webhook.url))(
        {"dag_run": dag_run, "reason": "task_failure"})
    [(_, _, payload)] = webhook.received
    assert payload["event"] == "dag_run_failed" and payload["run_id"] == "manual__1"
    assert payload["error"] == "task_failure" and payload["task_id"] is None


def test_without_webhook_the_alert_only_goes_to_the_log(caplog):
    with caplog.at_level(logging.ERROR, logger="shoplens.ops"):
        delivered = ops.send_alert(ops.alert_from_context(_failed_task_context(ValueError("x"))),
                                   Settings())
    assert delivered is False and "ValueError: x" in caplog.text


def test_an_unreachable_or_failing_webhook_is_logged_and_never_raises(webhook, caplog):
    alert = ops.alert_from_context(_failed_task_context(ValueError("boom")))
    dead_port = free_port_block(1)
    with caplog.at_level(logging.ERROR, logger="shoplens.ops"):
        assert ops.send_alert(alert, Settings(alert_webhook_url=f"http://127.0.0.1:{dead_port}/",
                                              alert_timeout=2)) is False
    assert "alert webhook delivery failed" in caplog.text
    webhook.status = 500
    assert ops.send_alert(alert, Settings(alert_webhook_url=webhook.url)) is False
    assert len(webhook.received) == 1


def test_webhook_url_must_be_http_and_is_redacted_from_public_settings():
    with pytest.raises(ConfigError, match="alert_webhook_url must be an http"):
        Settings.from_env({"SHOPLENS_ALERT_WEBHOOK_URL": "hooks.example/abc"})
    settings = Settings.from_env({"SHOPLENS_ALERT_WEBHOOK_URL": "https://hooks.example/T0/secret"})
    assert settings.public_dict()["alert_webhook_url"] == "***"


def test_volume_is_the_numeric_leaves_of_the_stats_dict():
    stats = {"images_new": 12, "bytes": 3.5e6, "ok": True, "category": "10120000",
             "rejected": {"too_small": 3, "two_products": 1}, "ids": [1, 2]}
    assert ops.volume_of(stats) == {"images_new": 12, "bytes": 3.5e6,
                                    "rejected.too_small": 3, "rejected.two_products": 1}


def test_a_measured_stage_records_duration_and_volume_and_passes_its_result_through(manifest_url):
    settings = Settings(manifest_url=manifest_url)
    result = ops.run_stage(settings, "run-1", "dedup", lambda s, k: {"checked": 40, "dupes": 7},
                           settings, "run-1")
    assert result == {"checked": 40, "dupes": 7}
    [row] = ops.stage_metrics(settings, "run-1")
    assert (row["stage"], row["status"]) == ("dedup", "success")
    assert row["volume"] == {"checked": 40, "dupes": 7}
    assert row["finished_at"] >= row["started_at"] and row["duration_seconds"] >= 0


def test_a_failing_stage_is_recorded_as_failed_and_its_error_still_raises(manifest_url):
    settings = Settings(manifest_url=manifest_url)

    def broken(*_):
        raise ConnectionError("detector server gone")

    with pytest.raises(ConnectionError, match="detector server gone"):
        ops.run_stage(settings, "run-1", "filter", broken)
    [row] = ops.stage_metrics(settings, "run-1")
    assert row["status"] == "failed"
    assert row["detail"]["error"] == "ConnectionError: detector server gone"
    # the retry that succeeds replaces the failed attempt's row
    ops.run_stage(settings, "run-1", "filter", lambda: {"kept": 5})
    [row] = ops.stage_metrics(settings, "run-1")
    assert (row["status"], row["volume"], row["detail"]) == ("success", {"kept": 5}, {})


def test_metrics_that_cannot_be_recorded_do_not_fail_the_stage(caplog, fresh_database):
    # fresh_database has no run_metrics table: recording fails, the stage result survives
    settings = Settings(manifest_url=fresh_database)
    with caplog.at_level(logging.ERROR, logger="shoplens.ops"):
        assert ops.run_stage(settings, "r", "crawl", lambda: {"n": 1}) == {"n": 1}
    assert "could not record run metrics for r/crawl" in caplog.text


def _seed_crawl(url: str, run_key: str, image_bytes: list[int]) -> None:
    with engine_for(url).begin() as conn:
        run_id = conn.execute(sa.text(
            "INSERT INTO crawl_runs (run_key, shop_base_url) VALUES (:k, 'http://shop') RETURNING id"),
            {"k": run_key}).scalar_one()
        conn.execute(sa.text("INSERT INTO categories VALUES ('10120000', '침대', NULL, :r, :r)"),
                     {"r": run_id})
        conn.execute(sa.text(
            "INSERT INTO products (id, category_id, name, source_url, first_seen_run, last_seen_run)"
            " VALUES (1, '10120000', 'bed', 'http://shop/p/1', :r, :r)"), {"r": run_id})
        for i, size in enumerate(image_bytes):
            conn.execute(sa.text(
                "INSERT INTO reviews (id, product_id, source_url, first_seen_run) VALUES (:i, 1, 'u', :r)"),
                {"i": i + 1, "r": run_id})
            sha = f"{i:064x}"
            conn.execute(sa.text(
                "INSERT INTO images (sha256, object_key, size_bytes, width, height, format, source_url,"
                " review_id, product_id, first_seen_run) VALUES (:s, :k, :b, 10, 10, 'jpeg', 'u', :i, 1, :r)"),
                {"s": sha, "k": f"images/{sha[:2]}/{sha}.jpg", "b": size, "i": i + 1, "r": run_id})


def test_run_summary_records_the_whole_night_and_links_the_report(manifest_url, webhook, caplog):
    settings = Settings(manifest_url=manifest_url, alert_webhook_url=webhook.url,
                        ui_base_url="http://127.0.0.1:8080/")
    _seed_crawl(manifest_url, "scheduled__2026-01-02", [1000, 2500])
    t0 = datetime.now(timezone.utc) - timedelta(minutes=5)
    ops.record_stage(settings, "scheduled__2026-01-02", "crawl:10120000", t0, t0 + timedelta(seconds=90),
                     "success", {"images_new": 2})
    ops.record_stage(settings, "scheduled__2026-01-02", "crawl:16220000", t0, t0 + timedelta(seconds=30),
                     "success", {"images_new": 0})
    ops.record_stage(settings, "scheduled__2026-01-02", "filter", t0 + timedelta(seconds=90),
                     t0 + timedelta(seconds=100), "failed", None, {"error": "x"})
    with caplog.at_level(logging.INFO, logger="shoplens.ops"):
        summary = ops.summarize_run(settings, "scheduled__2026-01-02", run_started_at=t0)
    assert summary["status"] == "failed" and summary["failed_stages"] == ["filter"]
    crawl = summary["crawl"]
    assert (crawl["images_new"], crawl["images_total"], crawl["reviews_new"]) == (2, 2, 2)
    assert crawl["image_bytes_new"] == 3500
    assert 300 <= summary["duration_seconds"] < 400
    assert summary["report_url"] == "http://127.0.0.1:8080/shoplens/runs/scheduled__2026-01-02"
    [run_row] = [r for r in ops.stage_metrics(settings, "scheduled__2026-01-02") if r["stage"] == "run"]
    assert run_row["status"] == "failed"
    assert run_row["volume"]["crawl.images_new"] == 2 and run_row["volume"]["crawl.image_bytes_new"] == 3500
    assert ops.recent_runs(settings)[0]["run_key"] == "scheduled__2026-01-02"
    assert "Run report: http://127.0.0.1:8080/shoplens/runs/scheduled__2026-01-02" in caplog.text
    [(_, _, payload)] = webhook.received
    assert payload["event"] == "run_summary" and "failed: filter" in payload["text"]
    json.dumps(summary)  # goes to XCom


def test_every_consumer_gets_the_same_run_summary(manifest_url, webhook, monkeypatch, capsys):
    """The teardown's XCom, the webhook text, the CLI's --json and text, and the recorded run
    row all come from one summary: after the night is closed they agree number for number."""
    from crawler.__main__ import main as crawler_cli
    from shoplens import summary as run_summary

    settings = Settings(manifest_url=manifest_url, alert_webhook_url=webhook.url,
                        ui_base_url="http://ui.test")
    _seed_crawl(manifest_url, "night", [700, 300, 500])
    t0 = datetime.now(timezone.utc) - timedelta(minutes=2)
    ops.record_stage(settings, "night", "crawl", t0, t0 + timedelta(seconds=60), "success",
                     {"photos_stored": 3})
    xcom = ops.summarize_run(settings, "night", run_started_at=t0)

    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    monkeypatch.setenv("SHOPLENS_UI_BASE_URL", "http://ui.test")
    assert crawler_cli(["summary", "--run-key", "night", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == xcom
    assert crawler_cli(["summary", "--run-key", "night"]) == 0
    text = capsys.readouterr().out.strip()
    [(_, _, payload)] = webhook.received
    assert text == payload["text"] == run_summary.for_run(settings, "night").text()
    assert "new images 3 (1.5 kB; total 3, 1.5 kB)" in text and text.startswith(
        "== shoplens run night: success in ")
    [run_row] = [r for r in ops.stage_metrics(settings, "night") if r["stage"] == "run"]
    assert run_row["volume"] == run_summary.for_run(settings, "night").volume()
    assert run_row["volume"]["crawl.images_new"] == xcom["crawl"]["images_new"] == 3
    assert crawler_cli(["summary", "--run-key", "never-ran"]) == 2


def test_run_keys_are_quoted_in_the_report_link():
    url = ops.report_url(Settings(ui_base_url="https://airflow.example"), "manual__2026-01-02T03:00:00+00:00")
    assert url == "https://airflow.example/shoplens/runs/manual__2026-01-02T03%3A00%3A00%2B00%3A00"


def test_ops_migration_downgrades_and_upgrades_cleanly(manifest_url):
    from alembic import command

    from shoplens.manifest.db import alembic_config

    command.downgrade(alembic_config(manifest_url), "0005_modeling")
    assert not sa.inspect(engine_for(manifest_url)).has_table("run_metrics")
    engine_for.cache_clear()
    upgrade(manifest_url)
    assert sa.inspect(engine_for(manifest_url)).has_table("run_metrics")


def test_cli_prints_the_metrics_of_a_run(manifest_url, monkeypatch, capsys):
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    settings = Settings(manifest_url=manifest_url)
    ops.run_stage(settings, "run-9", "build", lambda: {"members": 30})
    assert ops.main(["metrics", "--run-key", "run-9"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["volume"] == {"members": 30}
    monkeypatch.delenv("SHOPLENS_ALERT_WEBHOOK_URL", raising=False)
    assert ops.main(["test-alert"]) == 2
