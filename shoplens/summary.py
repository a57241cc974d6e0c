"""The run summary printed at the end of a demo or nightly run, read from the manifest alone."""
from __future__ import annotations

import importlib

import sqlalchemy as sa

from shoplens.config import Settings
from shoplens.manifest import engine_for


def crawl_summary(settings: Settings, run_key: str) -> dict:
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
    # Later stages contribute their own lines when they are installed.
    for module, func in (("dataset.filter", "summary_lines"), ("dataset.build", "summary_lines"),
                         ("modeling.train", "summary_lines")):
        try:
            fn = getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError):
            continue
        for line in fn(settings, run_key):
            print(f"   {line}")
