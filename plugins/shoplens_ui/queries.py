"""Read-only manifest queries behind the shoplens page.

Every query returns a :class:`Section`. Counts that the run summary also shows come from
:mod:`shoplens.summary`, so the page and the summary never disagree; one run's report is that
summary itself. A section whose tables hold no rows yet is empty, and the page renders that with
its own message. The page checks once that the manifest is migrated
(``shoplens.manifest.require_migrated``), so every table and view queried here exists.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from shoplens import summary as run_summary

SAMPLES_PER_REASON = 8


@dataclass
class Section:
    data: dict[str, Any] = field(default_factory=dict)


def _rows(conn: sa.Connection, sql: str, **params: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in conn.execute(sa.text(sql), params).mappings()]


# --------------------------------------------------------------------------------------------
# Dataset versions
# --------------------------------------------------------------------------------------------
def dataset_versions(conn: sa.Connection, limit: int = 20) -> Section:
    """Newest versions first with their split sizes (every status, so failed builds show)."""
    return Section(data={"versions": _rows(conn, """
        SELECT version_id, seq, status, parent_version, created_at, images, labels,
               train_images, val_images, test_images
        FROM dataset_version_summary ORDER BY seq DESC LIMIT :limit""", limit=limit)})


def version_counts(conn: sa.Connection, version_id: str | None = None) -> Section:
    """Photos per product and split in one version (default: the newest complete one); the
    counts are the run summary's (:func:`shoplens.summary.version_counts`)."""
    counts = run_summary.version_counts(conn, version_id)
    if counts["version_id"] is None:
        return Section(data={"version_id": None, "products": [], "totals": {}})
    products = sorted(counts["products"],
                      key=lambda p: (p["category_id"], -p["images"], p["product_id"]))
    totals = {"images": counts["images"],
              **{f"{split}_images": n for split, n in counts["splits"].items()}}
    return Section(data={"version_id": counts["version_id"], "products": products, "totals": totals})


def version_diff(conn: sa.Connection) -> Section:
    """What changed between the two newest complete versions, overall and per product."""
    newest = _rows(conn, """SELECT version_id FROM dataset_versions WHERE status = 'complete'
                             ORDER BY seq DESC LIMIT 2""")
    if len(newest) < 2:
        return Section(data={"old": None, "new": newest[0]["version_id"] if newest else None})
    new, old = newest[0]["version_id"], newest[1]["version_id"]
    pairs = """
        SELECT coalesce(n.sha256, o.sha256) AS sha256,
               coalesce(n.product_id, o.product_id) AS product_id,
               coalesce(n.product_name, o.product_name) AS product_name,
               CASE WHEN o.sha256 IS NULL THEN 'added'
                    WHEN n.sha256 IS NULL THEN 'removed'
                    WHEN n.label <> o.label THEN 'relabelled'
                    WHEN n.split <> o.split THEN 'moved'
                    ELSE 'unchanged' END AS change
        FROM (SELECT * FROM dataset_members WHERE version_id = :new) n
        FULL JOIN (SELECT * FROM dataset_members WHERE version_id = :old) o ON o.sha256 = n.sha256"""
    changes = {r["change"]: r["n"] for r in _rows(
        conn, f"SELECT change, count(*) AS n FROM ({pairs}) p GROUP BY change", new=new, old=old)}
    for key in ("added", "removed", "relabelled", "moved", "unchanged"):
        changes.setdefault(key, 0)
    per_product = _rows(conn, f"""
        SELECT product_id, min(product_name) AS product_name,
               count(*) FILTER (WHERE change <> 'added') AS old_images,
               count(*) FILTER (WHERE change <> 'removed') AS new_images,
               count(*) FILTER (WHERE change = 'added') AS added,
               count(*) FILTER (WHERE change = 'removed') AS removed,
               count(*) FILTER (WHERE change IN ('relabelled', 'moved')) AS changed
        FROM ({pairs}) p GROUP BY product_id
        HAVING count(*) FILTER (WHERE change <> 'unchanged') > 0
        ORDER BY count(*) FILTER (WHERE change <> 'unchanged') DESC, product_id""", new=new, old=old)
    return Section(data={"old": old, "new": new, "changes": changes, "products": per_product})


# --------------------------------------------------------------------------------------------
# Filter rejections
# --------------------------------------------------------------------------------------------
def rejections(conn: sa.Connection, run_key: str | None = None,
               samples: int = SAMPLES_PER_REASON) -> Section:
    """Rejected photos of one filter run (default: the latest) by rule, with sample images.

    A photo that fails two rules counts under both.
    """
    run = conn.execute(sa.text(
        "SELECT id, run_key, status, started_at, finished_at, stats->>'report_key' AS report_key "
        "FROM filter_runs "
        + ("WHERE run_key = :k " if run_key else "") + "ORDER BY id DESC LIMIT 1"),
        {"k": run_key}).mappings().first()
    if run is None:
        return Section(data={"run": None, "reasons": [], "decided": 0, "rejected": 0})
    counts = run_summary.filter_section(conn, run["run_key"])  # the run summary's numbers
    sample_rows = _rows(conn, """
        SELECT rule, sha256, reason, score FROM (
            SELECT rule, sha256, reason, score,
                   row_number() OVER (PARTITION BY rule ORDER BY id) AS nth
            FROM rule_decisions WHERE run_id = :r AND NOT passed) s
        WHERE nth <= :n ORDER BY rule, nth""", r=run["id"], n=samples)
    reasons = [{"rule": rule, "images": n, "samples": [s for s in sample_rows if s["rule"] == rule]}
               for rule, n in counts["rejected_by_rule"].items()]
    return Section(data={"run": dict(run), "reasons": reasons, "decided": counts["decided"],
                         "rejected": counts["rejected_images"]})


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def model_history(conn: sa.Connection, limit: int = 20) -> Section:
    """The current model's ensemble Top-1/Top-3 (on the newest version it was evaluated on) and
    its evaluations over versions, plus every trained model scored on its own test split."""
    current = conn.execute(sa.text(
        "SELECT id AS model_id, dataset_version, profile, promoted_at, reason FROM current_model"
    )).mappings().first()
    evaluations: list[dict[str, Any]] = []
    if current is not None:
        evaluations = _rows(conn, """
            SELECT evaluated_on, top1, top3, n FROM model_scoreboard
            WHERE model_id = :m ORDER BY evaluated_on DESC""", m=current["model_id"])
    models = _rows(conn, """
        SELECT model_id, trained_on, profile, status, promoted, reason, top1, top3, n, created_at
        FROM model_scoreboard WHERE evaluated_on = trained_on
        ORDER BY created_at DESC LIMIT :limit""", limit=limit)
    latest = evaluations[0] if evaluations else None
    return Section(data={
        "current": ({**dict(current), **{k: latest[k] for k in ("top1", "top3", "n", "evaluated_on")}}
                    if current is not None and latest else (dict(current) if current else None)),
        "evaluations": evaluations, "models": models})


# --------------------------------------------------------------------------------------------
# Runs (operations)
# --------------------------------------------------------------------------------------------
def recent_runs(conn: sa.Connection, limit: int = 10) -> Section:
    """The whole-night rows the run summary records, newest first."""
    return Section(data={"runs": _rows(conn, """
        SELECT run_key, status, started_at, finished_at, duration_seconds, volume
        FROM run_metrics WHERE stage = 'run' ORDER BY finished_at DESC LIMIT :limit""",
        limit=limit)})


def image_object_key(conn: sa.Connection, sha256: str) -> tuple[str, int] | None:
    """Object key and stored size of one image, or None when the manifest does not know it."""
    row = conn.execute(sa.text("SELECT object_key, size_bytes FROM images WHERE sha256 = :s"),
                       {"s": sha256}).first()
    return (row[0], row[1]) if row else None


# --------------------------------------------------------------------------------------------
# Reports kept in the object store (served by the page itself)
# --------------------------------------------------------------------------------------------
def filter_report_key(conn: sa.Connection, run_key: str) -> str | None:
    """The object key of the HTML report the filter stage stored for ``run_key``, or None."""
    return conn.execute(sa.text("SELECT stats->>'report_key' FROM filter_runs WHERE run_key = :k"),
                        {"k": run_key}).scalar()


def model_artifact_prefix(conn: sa.Connection, model_id: str) -> str | None:
    """Where a completed model's artefacts are (``models/<id>/``), or None for an unknown,
    running or failed model."""
    return conn.execute(sa.text("SELECT artifact_prefix FROM models WHERE id = :m "
                                "AND status = 'complete'"), {"m": model_id}).scalar()
