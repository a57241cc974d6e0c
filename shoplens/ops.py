"""Operations: failure alerts, per-stage run metrics and the end-of-night run summary.

- :class:`FailureAlert` is an Airflow notifier: pass ``on_failure_callback=FailureAlert()`` to a
  task (or the DAG). It writes the failure to the log and, when ``alert_webhook_url`` is set,
  POSTs it as JSON (a ``text`` field that chat webhooks display, plus structured fields).
- :func:`run_stage` calls a stage entry function and records its duration and data volume (the
  numeric counters of the stats dict it returns) in the manifest table ``run_metrics``.
- :func:`summarize_run` closes a night: it adds a ``run`` row with the whole run's duration and
  the run summary's counts (:mod:`shoplens.summary`), logs that summary with the link to the run
  report page, and sends it to the webhook.

Recording metrics or delivering an alert never masks the stage's own outcome: their errors are
logged, not raised.

    shoplens ops metrics [--run-key KEY] [--last 10]   # (alias: python -m shoplens.ops ...)
    shoplens ops summary --run-key KEY
    shoplens ops test-alert
"""
from __future__ import annotations

import json
import logging
import sys
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from airflow.sdk.bases.notifier import BaseNotifier

from shoplens import summary as run_summary
from shoplens.cli import BadInput, add_json_flag, argument_parser, command, emit, parse_args
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.manifest.schema import run_metrics
from shoplens.summary import RUN_STAGE, report_url, volume_of  # noqa: F401 - part of this API

log = logging.getLogger("shoplens.ops")


# --------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Alert:
    event: str  # task_failed | dag_run_failed | run_summary | test
    dag_id: str | None
    run_id: str | None
    task_id: str | None
    try_number: int | None
    error: str | None
    log_url: str | None
    text: str  # one human-readable line; chat webhooks (Slack, Mattermost, ...) show this field

    def payload(self) -> dict[str, Any]:
        return asdict(self)


def alert_from_context(context: Mapping[str, Any]) -> Alert:
    """Build an alert from an Airflow callback context (a task's or a DAG run's)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag = context.get("dag")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", None) or getattr(dag, "dag_id", None)
    run_id = getattr(ti, "run_id", None) or getattr(dag_run, "run_id", None) or context.get("run_id")
    task_id = getattr(ti, "task_id", None)
    error = context.get("exception") or context.get("reason")
    error_text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else (
        str(error) if error else None)
    try:
        log_url = getattr(ti, "log_url", None) if ti is not None else None
    except Exception:  # log_url reads Airflow config; an alert must not fail on it
        log_url = None
    if task_id:
        event = "task_failed"
        what = f"task {task_id} (try {getattr(ti, 'try_number', '?')})"
    else:
        event = "dag_run_failed"
        what = "DAG run"
    text = f"shoplens: {what} of {dag_id} run {run_id} failed: {error_text or 'no error message'}"
    if log_url:
        text += f" - log: {log_url}"
    return Alert(event=event, dag_id=dag_id, run_id=run_id, task_id=task_id,
                 try_number=getattr(ti, "try_number", None), error=error_text, log_url=log_url,
                 text=text)


def post_webhook(url: str, payload: Mapping[str, Any], timeout: float) -> bool:
    """POST ``payload`` as JSON; True when the receiver answered 2xx. Never raises."""
    body = json.dumps(payload, ensure_ascii=False, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              "User-Agent": "shoplens-alerts"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError) as exc:
        log.error("alert webhook delivery failed: %s", exc)
        return False


def send_alert(alert: Alert, settings: Settings) -> bool:
    """Log the alert; deliver it to the webhook when one is configured. True when delivered."""
    level = logging.INFO if alert.event == "run_summary" else logging.ERROR
    log.log(level, "%s", alert.text)
    if not settings.alert_webhook_url:
        return False
    return post_webhook(settings.alert_webhook_url, alert.payload(), settings.alert_timeout)


class FailureAlert(BaseNotifier):
    """Airflow notifier for ``on_failure_callback``: log + optional webhook.

    Settings are read from the environment when the callback fires (on the worker for a task,
    in the dag-processor for a DAG run), so a rotated webhook URL needs no DAG change.
    """

    def __init__(self, settings: Settings | None = None):
        super().__init__()
        self._settings = settings

    def notify(self, context) -> None:
        settings = self._settings or Settings.from_env()
        send_alert(alert_from_context(context), settings)


# --------------------------------------------------------------------------------------------
# Run metrics
# --------------------------------------------------------------------------------------------
def record_stage(settings: Settings, run_key: str, stage: str, started_at: datetime,
                 finished_at: datetime, status: str, stats: Any = None,
                 detail: Mapping[str, Any] | None = None) -> None:
    """Upsert one (run_key, stage) row; a retried stage overwrites its earlier attempt."""
    if status not in ("success", "failed"):
        raise ValueError(f"status must be 'success' or 'failed', got {status!r}")
    duration = max(0.0, (finished_at - started_at).total_seconds())
    row = {
        "run_key": run_key, "stage": stage, "status": status, "started_at": started_at,
        "finished_at": finished_at, "duration_seconds": duration,
        "volume": volume_of(stats),
        "detail": json.loads(json.dumps(dict(detail or {}), default=str)),
    }
    stmt = insert(run_metrics).values(**row)
    stmt = stmt.on_conflict_do_update(
        index_elements=["run_key", "stage"],
        set_={k: stmt.excluded[k] for k in row if k not in ("run_key", "stage")}
        | {"recorded_at": sa.func.now()})
    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(stmt)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def run_stage(settings: Settings, run_key: str, stage: str, entry: Callable[..., Any],
              *args: Any, **kwargs: Any) -> Any:
    """Call ``entry(*args, **kwargs)`` and record its duration and volume under ``stage``.

    The entry's result (or exception) is passed through unchanged.
    """
    started = _now()
    try:
        stats = entry(*args, **kwargs)
    except BaseException as exc:
        _record_quietly(settings, run_key, stage, started, "failed", None,
                        {"error": f"{type(exc).__name__}: {exc}"})
        raise
    _record_quietly(settings, run_key, stage, started, "success", stats, {})
    return stats


def _record_quietly(settings, run_key, stage, started, status, stats, detail) -> None:
    try:
        record_stage(settings, run_key, stage, started, _now(), status, stats, detail)
    except Exception as exc:  # the manifest being down must not turn a good stage into a failure
        log.error("could not record run metrics for %s/%s: %s", run_key, stage, exc)


def stage_metrics(settings: Settings, run_key: str) -> list[dict[str, Any]]:
    """The recorded rows of one run, in the order the stages started."""
    with engine_for(settings.manifest_url).connect() as conn:
        rows = conn.execute(sa.select(run_metrics).where(run_metrics.c.run_key == run_key)
                            .order_by(run_metrics.c.started_at, run_metrics.c.stage)).mappings()
        return [dict(r) for r in rows]


def recent_runs(settings: Settings, last: int = 10) -> list[dict[str, Any]]:
    """The ``run`` rows of the latest runs, newest first."""
    with engine_for(settings.manifest_url).connect() as conn:
        rows = conn.execute(sa.select(run_metrics).where(run_metrics.c.stage == RUN_STAGE)
                            .order_by(run_metrics.c.finished_at.desc()).limit(last)).mappings()
        return [dict(r) for r in rows]


# --------------------------------------------------------------------------------------------
# Closing a night
# --------------------------------------------------------------------------------------------
FAILED_TASK_STATES = ("failed", "upstream_failed")


def failed_tasks(task_states: Mapping[str, str | None], task_ids: list[str]) -> list[str]:
    """A DAG run's tasks that failed for good (a mapped one as ``task[map index]``) and those
    that never ran because of them (``task (not run)``), from Airflow's task states
    (``{task_id or f"{task_id}_{map_index}": state}``): what the night is missing."""
    names = []
    for key, state in task_states.items():
        if state not in FAILED_TASK_STATES:
            continue
        base, _, index = key.rpartition("_")
        name = f"{base}[{index}]" if key not in task_ids and base in task_ids and index.isdigit() else key
        names.append(name if state == "failed" else f"{name} (not run)")
    return sorted(names)


def summarize_dag_run(settings: Settings, context: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`summarize_run` for the DAG run of an Airflow task ``context`` (its teardown), with
    the run's :func:`failed_tasks` as failed stages: a mapped batch records no stage row of its
    own, and the step deciding over the batches never runs after one failed for good."""
    run_id, dag = context["run_id"], context["dag"]
    states = context["ti"].get_task_states(dag_id=dag.dag_id, run_ids=[run_id])
    return summarize_run(settings, run_id, run_started_at=context["dag_run"].start_date,
                         failed_stages=failed_tasks(states.get(run_id, {}), list(dag.task_ids)))


def summarize_run(settings: Settings, run_key: str, run_started_at: datetime | None = None,
                  failed_stages: list[str] | None = None) -> dict[str, Any]:
    """Record the whole run's row (status, duration, the summary's counts as volume), log the
    run summary (:mod:`shoplens.summary`) and send it to the webhook.

    Returns the summary as JSON (for XCom), read back after the row is recorded, so it is the
    same as what ``python -m crawler summary`` and the run report page show afterwards.
    ``run_started_at`` is the DAG run's start; without it the earliest stage start is used.
    ``failed_stages``: what else failed, e.g. the DAG run's :func:`failed_tasks` (a mapped batch
    records no stage row of its own; its failure must still fail the night).
    """
    with engine_for(settings.manifest_url).connect() as conn:
        before = run_summary.load(conn, run_key)
    finished = _now()
    starts = [s["started_at"] for s in before.stages.values()]
    started = run_started_at or (min(starts) if starts else finished)
    failed = sorted(set(failed_stages or []) | {
        name for name, s in before.stages.items() if s["status"] == "failed"})
    url = report_url(settings, run_key)
    record_stage(settings, run_key, RUN_STAGE, started, finished,
                 "failed" if failed else "success", before.volume(),
                 {"failed_stages": failed, "report_url": url})
    summary = run_summary.for_run(settings, run_key)
    for line in summary.lines():
        log.info("%s", line)
    send_alert(Alert(event="run_summary", dag_id=None, run_id=run_key, task_id=None, try_number=None,
                     error=None, log_url=url, text=summary.text()), settings)
    return summary.as_dict()


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
@command()
def main(argv: list[str] | None = None) -> int:
    """Run metrics, a night's summary, a test alert"""
    parser = argument_parser("python -m shoplens.ops", __doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    metrics = sub.add_parser("metrics", help="print recorded run metrics as JSON lines")
    metrics.add_argument("--run-key", help="one run's stages; default: the latest runs")
    metrics.add_argument("--last", type=int, default=10)
    summary = sub.add_parser("summary", help="(re)compute and record a run's summary")
    summary.add_argument("--run-key", required=True)
    test_alert = sub.add_parser("test-alert", help="send a test alert to the configured webhook")
    for subcommand in (metrics, summary, test_alert):
        add_json_flag(subcommand)
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    settings = Settings.from_env()
    if args.command == "metrics":
        rows = stage_metrics(settings, args.run_key) if args.run_key else recent_runs(settings, args.last)
        for row in rows:  # JSON lines with or without --json: the rows have no text form
            emit(row, lambda r: json.dumps(r, default=str, ensure_ascii=False))
        return 0
    if args.command == "summary":
        emit(summarize_run(settings, args.run_key))
        return 0
    if not settings.alert_webhook_url:
        raise BadInput("SHOPLENS_ALERT_WEBHOOK_URL is not set")
    delivered = send_alert(Alert(event="test", dag_id=None, run_id=None, task_id=None,
                                 try_number=None, error=None, log_url=None,
                                 text="shoplens: test alert"), settings)
    emit({"delivered": delivered},
         lambda r: "delivered" if r["delivered"] else "NOT delivered (see the log line above)")
    return 0 if delivered else 1


if __name__ == "__main__":
    raise SystemExit(main())
