"""The run summary printed at the end of a demo or nightly run, read from the manifest alone."""
from __future__ import annotations

import sqlalchemy as sa

from shoplens.config import Settings
from shoplens.manifest import engine_for


def crawl_summary(settings: Settings, run_key: str) -> dict:
    """A run's crawl counts, recounted from the manifest rows.

    Recounted rather than read from ``crawl_runs.stats``: that summary is only written when the
    crawl finishes, and a failed night needs its counts most.
    """
    with engine_for(settings.manifest_url).connect() as conn:
        run = conn.execute(sa.text("SELECT id, status FROM crawl_runs WHERE run_key = :k"),
                           {"k": run_key}).mappings().first()
        if run is None:
            return {"run_key": run_key, "found": False}
        rid = run["id"]
        one = lambda q: conn.execute(sa.text(q), {"r": rid}).scalar()  # noqa: E731
        return {
            "run_key": run_key,
            "status": run["status"],
            "products_seen": one("SELECT count(*) FROM product_ranks WHERE run_id = :r"),
            "products_total": one("SELECT count(*) FROM products"),
            "reviews_new": one("SELECT count(*) FROM reviews WHERE first_seen_run = :r"),
            "reviews_total": one("SELECT count(*) FROM reviews"),
            "photos_stored_this_run": one("SELECT count(*) FROM images WHERE first_seen_run = :r"),
            "photos_total": one("SELECT count(*) FROM images"),
            "failures_by_reason": dict(conn.execute(sa.text(
                "SELECT reason, count(*) FROM crawl_failures WHERE run_id = :r GROUP BY reason "
                "ORDER BY count(*) DESC"), {"r": rid}).all()),
        }


def print_summary(settings: Settings, run_key: str) -> None:
    s = crawl_summary(settings, run_key)
    print(f"== shoplens run {run_key}")
    if not s.get("found", True):
        print("   no crawl run recorded")
        return
    print(f"   crawl: {s['status']}; products this run {s['products_seen']} (total {s['products_total']}), "
          f"new reviews {s['reviews_new']} (total {s['reviews_total']}), "
          f"photos stored this run {s['photos_stored_this_run']} (total {s['photos_total']})")
    failures = s["failures_by_reason"]
    print("   failures by reason: " + (", ".join(f"{k}={v}" for k, v in failures.items()) or "none"))
    for line in filter_lines(settings):
        print(f"   {line}")
    for line in build_summary_lines(settings, run_key) + model_lines(settings):
        print(f"   {line}")
    try:
        from dataset.build.version_summary import readme_summary
    except ImportError:
        return
    try:
        print("\n" + readme_summary(settings))
    except Exception as exc:  # a night without any dataset version yet
        print(f"   (no dataset version summary: {exc})")


def build_summary_lines(settings: Settings, run_key: str) -> list[str]:
    try:  # the dataset stage is optional for a crawl-only installation
        from dataset.build.stage import summary_lines
    except ImportError:
        return []
    return summary_lines(settings, run_key)


def _relation_exists(conn, name: str) -> bool:
    return conn.execute(sa.text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar()


def filter_lines(settings: Settings) -> list[str]:
    """Verdicts over all inspected photos and rejections per reason."""
    with engine_for(settings.manifest_url).connect() as conn:
        if not _relation_exists(conn, "image_verdicts"):
            return []
        verdicts = dict(conn.execute(sa.text(
            "SELECT verdict, count(*) FROM image_verdicts GROUP BY verdict")).all())
        reasons = conn.execute(sa.text(
            "SELECT reason, count(*) FROM image_verdicts, unnest(reasons) AS reason "
            "WHERE verdict = 'reject' GROUP BY reason ORDER BY count(*) DESC")).all()
        duplicates = conn.execute(sa.text(
            "SELECT count(*) FROM image_dedup WHERE duplicate_of IS NOT NULL")).scalar() \
            if _relation_exists(conn, "image_dedup") else 0
    return [f"filter: keep {verdicts.get('keep', 0)}, reject {verdicts.get('reject', 0)} "
            f"({', '.join(f'{r}={n}' for r, n in reasons) or 'no rejections'}); "
            f"near-duplicates {duplicates}"]


def model_lines(settings: Settings) -> list[str]:
    """The current model and the latest training run's result."""
    with engine_for(settings.manifest_url).connect() as conn:
        if not _relation_exists(conn, "model_scoreboard"):
            return []
        rows = conn.execute(sa.text(
            "SELECT model_id, trained_on, evaluated_on, top1, top3, n, promoted, reason "
            "FROM model_scoreboard ORDER BY created_at DESC LIMIT 3")).mappings().all()
    return [f"model {r['model_id']} (trained on {r['trained_on']}, test of {r['evaluated_on']}, "
            f"n={r['n']}): ensemble Top-1 {r['top1']:.1%}, Top-3 {r['top3']:.1%}; "
            f"{'promoted' if r['promoted'] else 'not promoted'}: {r['reason']}" for r in rows]
