"""The one run summary: what one run key did at every stage, recounted from the manifest alone.

:func:`load` reads a run's sections from the manifest tables by SQL (the schema is the contract;
no stage package is imported) and returns a :class:`RunSummary`:

- ``crawl``: run status, categories, products ranked, reviews new/total, review photos stored,
  images new/total (and their bytes), catalogue images stored/failed in the run and in all,
  failures by reason and by stage;
- ``dedup``: images hashed and duplicates marked in this run, clusters and duplicates in all;
- ``filter``: run status, images inspected/decided/kept/rejected, rejections per rule, crops
  salvaged, report key;
- ``build``: the version this run built (status, parent, images, labels, images per split, URI,
  error, products left out) or the latest complete one when the run built none;
- ``training``: every model trained on that version (status, ensemble test Top-1/Top-3, promotion);
- ``search``: the product search index this run built (status, parent, products, vectors, added,
  threshold, error), else the current one;
- ``stages``: each stage's recorded status, duration, volume and error (``run_metrics``), and
  the whole run's status and duration once the night's teardown recorded it.

Each count has one name, the one its stage's own stats use. The same object is rendered as text
(:meth:`RunSummary.text`: the demo, ``python -m crawler summary``), as JSON
(:meth:`RunSummary.as_dict`: ``--json``, the teardown task's XCom) and as metrics
(:meth:`RunSummary.volume`: the night's ``run_metrics`` row), and it is what the shoplens page's
run report shows. :func:`version_counts` / :func:`version_markdown` are a dataset version's counts
per split and product, for the page and ``python -m dataset build --summary``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Mapping
from urllib.parse import quote

import sqlalchemy as sa

from shoplens.config import Settings
from shoplens.manifest import engine_for

RUN_STAGE = "run"  # the run_metrics row that covers the whole night
REPORT_PATH = "/shoplens/runs/"  # served by plugins/shoplens_ui


@dataclass
class RunSummary:
    run_key: str
    status: str  # success | failed | running | not found
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_seconds: float | None = None
    failed_stages: list[str] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    crawl: dict[str, Any] | None = None
    dedup: dict[str, Any] | None = None
    filter: dict[str, Any] | None = None
    build: dict[str, Any] | None = None
    training: list[dict[str, Any]] = field(default_factory=list)
    search: dict[str, Any] | None = None
    report_url: str | None = None

    @property
    def found(self) -> bool:
        return self.status != "not found"

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable (datetimes as ISO strings): for ``--json`` and XCom."""
        return _jsonable({
            "run_key": self.run_key, "found": self.found, "status": self.status,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "duration_seconds": self.duration_seconds, "failed_stages": self.failed_stages,
            "stages": self.stages, "crawl": self.crawl, "dedup": self.dedup,
            "filter": self.filter, "build": self.build, "training": self.training,
            "search": self.search, "report_url": self.report_url})

    def volume(self) -> dict[str, float]:
        """The sections' counts, flattened with dotted keys (``crawl.images_new``), as metrics."""
        counts = volume_of({"crawl": self.crawl, "dedup": self.dedup, "filter": self.filter,
                            "build": self.build,
                            "search": self.search if self.search and self.search["built"] else None})
        return {k: v for k, v in counts.items() if not k.endswith("_id")}  # ids are not volume

    def lines(self) -> list[str]:
        """The summary as text lines, one or more per stage."""
        head = f"== shoplens run {self.run_key}: {self.status}"
        if self.duration_seconds is not None:
            head += f" in {self.duration_seconds:.0f}s"
        if self.failed_stages:
            head += f", failed: {', '.join(self.failed_stages)}"
        lines = [head]
        if not self.found:
            return lines + ["   nothing recorded for this run key"]
        if self.stages:
            lines.append("   stages: " + ", ".join(
                f"{name} {s['status']} {s['duration_seconds']:.1f}s"
                for name, s in self.stages.items()))
        lines += [f"   {line}" for line in
                  _crawl_lines(self.crawl) + _dedup_lines(self.dedup) + _filter_lines(self.filter)
                  + _build_lines(self.build) + _training_lines(self.training)
                  + _search_lines(self.search)]
        if self.report_url:
            lines.append(f"Run report: {self.report_url}")
        return lines

    def text(self) -> str:
        return "\n".join(self.lines())


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------
def for_run(settings: Settings, run_key: str) -> RunSummary:
    """The run's summary with the link to its report page."""
    with engine_for(settings.manifest_url).connect() as conn:
        summary = load(conn, run_key)
    summary.report_url = report_url(settings, run_key)
    return summary


def load(conn: sa.Connection, run_key: str) -> RunSummary:
    """Every section of ``run_key`` from the manifest (sections a run did not reach are None)."""
    stages, run_row = _stages(conn, run_key)
    crawl = crawl_section(conn, run_key)
    summary = RunSummary(run_key=run_key, status="not found", stages=stages, crawl=crawl,
                         dedup=dedup_section(conn, crawl["run_id"]) if crawl else None,
                         filter=filter_section(conn, run_key), build=build_section(conn, run_key),
                         search=search_section(conn, run_key))
    if summary.build and summary.build.get("built"):
        summary.training = training_section(conn, summary.build["version_id"])
    failed = {name for name, s in stages.items() if s["status"] == "failed"}
    if run_row is not None:
        failed |= set(run_row["detail"].get("failed_stages") or [])
        summary.status = run_row["status"]
        summary.started_at, summary.finished_at = run_row["started_at"], run_row["finished_at"]
        summary.duration_seconds = round(run_row["duration_seconds"], 3)
    else:
        states = [crawl and crawl["status"], summary.filter and summary.filter["status"],
                  summary.build and summary.build.get("status")]
        if failed or "failed" in states:
            summary.status = "failed"
        elif "running" in states or "building" in states:
            summary.status = "running"
        elif stages or any(states) or (summary.build and summary.build.get("built")):
            summary.status = "success"
        if stages:
            summary.started_at = min(s["started_at"] for s in stages.values())
            summary.finished_at = max(s["finished_at"] for s in stages.values())
            summary.duration_seconds = round(
                (summary.finished_at - summary.started_at).total_seconds(), 3)
    summary.failed_stages = sorted(failed)
    return summary


def _stages(conn: sa.Connection, run_key: str) -> tuple[dict[str, dict], dict | None]:
    rows = conn.execute(sa.text(
        "SELECT stage, status, started_at, finished_at, duration_seconds, volume, detail "
        "FROM run_metrics WHERE run_key = :k ORDER BY started_at, stage"),
        {"k": run_key}).mappings().all()
    stages = {r["stage"]: {"status": r["status"], "started_at": r["started_at"],
                           "finished_at": r["finished_at"],
                           "duration_seconds": r["duration_seconds"], "volume": r["volume"],
                           "error": r["detail"].get("error")}
              for r in rows if r["stage"] != RUN_STAGE}
    run_row = next((dict(r) for r in rows if r["stage"] == RUN_STAGE), None)
    return stages, run_row


def crawl_section(conn: sa.Connection, run_key: str) -> dict[str, Any] | None:
    """The crawl run's counts, recounted from its rows (a failed night has no stats written)."""
    run = conn.execute(sa.text("SELECT id, status FROM crawl_runs WHERE run_key = :k"),
                       {"k": run_key}).mappings().first()
    if run is None:
        return None
    counts = conn.execute(sa.text("""
        SELECT
          (SELECT count(*) FROM categories WHERE last_seen_run = :r) AS categories,
          (SELECT count(*) FROM product_ranks WHERE run_id = :r) AS products,
          (SELECT count(*) FROM products) AS products_total,
          (SELECT count(*) FROM reviews WHERE first_seen_run = :r) AS reviews_new,
          (SELECT count(*) FROM reviews) AS reviews_total,
          (SELECT count(*) FROM review_photos WHERE run_id = :r) AS photos_stored,
          (SELECT count(*) FROM images WHERE first_seen_run = :r) AS images_new,
          (SELECT count(*) FROM images) AS images_total,
          (SELECT coalesce(sum(size_bytes), 0) FROM images WHERE first_seen_run = :r)
            AS image_bytes_new,
          (SELECT coalesce(sum(size_bytes), 0) FROM images) AS image_bytes_total,
          (SELECT count(*) FROM catalogue_images WHERE run_id = :r) AS catalogue_images_stored,
          (SELECT count(*) FROM crawl_failures WHERE run_id = :r AND stage = 'catalogue_image')
            AS catalogue_images_failed,
          (SELECT count(*) FROM catalogue_images) AS catalogue_images_total
        """), {"r": run["id"]}).mappings().one()
    failures: dict[str, int] = {}
    by_stage: dict[str, int] = {}
    for stage, reason, n in conn.execute(sa.text(
            "SELECT stage, reason, count(*) FROM crawl_failures WHERE run_id = :r "
            "GROUP BY stage, reason"), {"r": run["id"]}):
        failures[reason] = failures.get(reason, 0) + n
        by_stage[stage] = by_stage.get(stage, 0) + n
    return {"run_id": run["id"], "status": run["status"], **{k: int(v) for k, v in counts.items()},
            "failures": dict(sorted(failures.items())),
            "failures_by_stage": dict(sorted(by_stage.items()))}


def dedup_section(conn: sa.Connection, crawl_run_id: int) -> dict[str, Any]:
    """Hashes computed and duplicates marked for this crawl run, and the clusters in all."""
    row = conn.execute(sa.text("""
        SELECT
          (SELECT count(*) FROM image_hashes WHERE computed_run = :r) AS hashed,
          (SELECT count(*) FROM image_embeddings WHERE computed_run = :r) AS embedded,
          (SELECT count(*) FROM image_dedup WHERE run_id = :r AND duplicate_of IS NOT NULL)
            AS duplicates_new,
          count(*) AS images_clustered, count(DISTINCT cluster_id) AS clusters,
          count(*) FILTER (WHERE duplicate_of IS NOT NULL) AS duplicates,
          count(*) FILTER (WHERE duplicate_of IS NOT NULL AND distance > threshold)
            AS duplicates_beyond_hash_threshold
        FROM image_dedup"""), {"r": crawl_run_id}).mappings().one()
    return {k: int(v) for k, v in row.items()}


def filter_section(conn: sa.Connection, run_key: str) -> dict[str, Any] | None:
    """The filter run of ``run_key``: images inspected and decided, kept and rejected per rule,
    crops salvaged from multi-product photos.

    An image failing two rules counts once in ``rejected_images`` and under both rules.
    """
    run = conn.execute(sa.text(
        "SELECT id, status, detector_version, rule_version, stats->>'report_key' AS report_key "
        "FROM filter_runs WHERE run_key = :k"), {"k": run_key}).mappings().first()
    if run is None:
        return None
    counts = conn.execute(sa.text("""
        SELECT
          (SELECT count(*) FROM detections WHERE run_id = :r) AS inspected,
          (SELECT count(*) FROM detections WHERE run_id = :r AND stats ? 'decode_error')
            AS unreadable,
          count(DISTINCT sha256) AS decided,
          count(DISTINCT sha256) FILTER (WHERE NOT passed) AS rejected_images,
          (SELECT count(*) FROM salvaged_crops WHERE run_id = :r AND sha256 IS NOT NULL)
            AS salvaged_crops
        FROM rule_decisions WHERE run_id = :r"""), {"r": run["id"]}).mappings().one()
    by_rule = conn.execute(sa.text(
        "SELECT rule, count(*) FROM rule_decisions WHERE run_id = :r AND NOT passed "
        "GROUP BY rule ORDER BY count(*) DESC, rule"), {"r": run["id"]}).all()
    counts = {k: int(v) for k, v in counts.items()}
    return {"filter_run_id": run["id"], "status": run["status"],
            "detector_version": run["detector_version"], "rule_version": run["rule_version"],
            **counts, "kept_images": counts["decided"] - counts["rejected_images"],
            "rejected_by_rule": {rule: int(n) for rule, n in by_rule},
            "report_key": run["report_key"]}


def build_section(conn: sa.Connection, run_key: str) -> dict[str, Any] | None:
    """The version ``run_key`` built (its latest attempt), else the latest complete version."""
    version_id = conn.execute(sa.text(
        "SELECT version_id FROM dataset_versions WHERE run_key = :k ORDER BY seq DESC LIMIT 1"),
        {"k": run_key}).scalar()
    if version_id is not None:
        counts = version_counts(conn, version_id)
        counts.pop("products")
        return {"built": True, **counts}
    latest = conn.execute(sa.text("SELECT version_id FROM dataset_latest_version")).scalar()
    if latest is None:
        return None
    images = conn.execute(sa.text("SELECT images FROM dataset_version_summary "
                                  "WHERE version_id = :v"), {"v": latest}).scalar()
    return {"built": False, "latest_version": latest, "latest_images": int(images)}


def search_section(conn: sa.Connection, run_key: str) -> dict[str, Any] | None:
    """The search index ``run_key`` built (its latest attempt), else the current one."""
    columns = ("SELECT id AS index_id, status, parent_id, model_id, products, vectors, "
               "added_vectors, threshold, error FROM ")
    row = conn.execute(sa.text(columns + "search_indexes WHERE run_key = :k "
                               "ORDER BY built_at DESC, id DESC LIMIT 1"), {"k": run_key}).mappings().first()
    if row is not None:
        return {"built": True, **row}
    row = conn.execute(sa.text(columns + "current_search_index")).mappings().first()
    return None if row is None else {"built": False, **row}


def training_section(conn: sa.Connection, version_id: str) -> list[dict[str, Any]]:
    """Models trained on ``version_id``, oldest first, with their ensemble test scores on it."""
    rows = conn.execute(sa.text("""
        SELECT m.id AS model_id, m.status, m.promoted, m.reason, m.error,
               mm.top1, mm.top3, mm.n
        FROM models m
        LEFT JOIN model_metrics mm ON mm.model_id = m.id AND mm.dataset_version = m.dataset_version
             AND mm.split = 'test' AND mm.member = 'ensemble'
        WHERE m.dataset_version = :v ORDER BY m.created_at, m.id"""), {"v": version_id})
    return [dict(r) for r in rows.mappings()]


def version_counts(conn: sa.Connection, version_id: str | None = None) -> dict[str, Any]:
    """A version's images per split and per product (default: the latest complete version).

    Raises LookupError for an unknown version; ``version_id`` None in the result means no
    version is complete yet.
    """
    if version_id is None:
        version_id = conn.execute(sa.text("SELECT version_id FROM dataset_latest_version")).scalar()
        if version_id is None:
            return {"version_id": None, "products": []}
    version = conn.execute(sa.text("""
        SELECT s.*, v.excluded_products, v.error
        FROM dataset_version_summary s JOIN dataset_versions v USING (version_id)
        WHERE s.version_id = :v"""), {"v": version_id}).mappings().first()
    if version is None:
        raise LookupError(f"no dataset version {version_id!r} in the manifest")
    products = conn.execute(sa.text(
        "SELECT label, product_id, product_name, category_id, images, train_images, val_images, "
        "test_images FROM dataset_version_label_counts WHERE version_id = :v ORDER BY label"),
        {"v": version_id}).mappings().all()
    return {
        "version_id": version_id, "status": version["status"],
        "parent_version": version["parent_version"], "uri": version["uri"],
        "created_at": version["created_at"], "code_version": version["code_version"],
        "images": int(version["images"]), "labels": int(version["labels"]),
        "splits": {split: int(version[f"{split}_images"]) for split in ("train", "val", "test")},
        "excluded_products": version["excluded_products"] or [], "error": version["error"],
        "products": [{k: (int(v) if k.endswith("images") else v) for k, v in p.items()}
                     for p in products],
    }


def version_markdown(counts: Mapping[str, Any]) -> str:
    """:func:`version_counts` as Markdown for a dataset card: per split, then per product."""
    if counts["version_id"] is None:
        return "No complete dataset version yet.\n"
    splits = list(counts["splits"])
    lines = [
        f"### Dataset version {counts['version_id']} ({counts['status']}, parent "
        f"{counts['parent_version'] or 'none'})",
        "",
        f"{counts['uri']} - {counts['images']} images, {counts['labels']} labels, "
        f"created {counts['created_at']:%Y-%m-%d %H:%M %Z}, code {counts['code_version']}",
        "",
        "| split | images |",
        "|---|---:|",
    ]
    lines += [f"| {s} | {n} |" for s, n in counts["splits"].items()]
    lines += [f"| **total** | **{counts['images']}** |", "",
              "| label | product | name | category | " + " | ".join(splits) + " | total |",
              "|---:|---:|---|---|" + "---:|" * (len(splits) + 1)]
    for p in counts["products"]:
        name = str(p["product_name"]).replace("|", "\\|")
        lines.append(f"| {p['label']} | {p['product_id']} | {name} | {p['category_id']} | "
                     + " | ".join(str(p[f"{s}_images"]) for s in splits) + f" | {p['images']} |")
    if counts["excluded_products"]:
        lines += ["", "Left out for too few kept photos: " + ", ".join(
            f"product {e['product_id']} ({e['photos']})" for e in counts["excluded_products"])]
    return "\n".join(lines) + "\n"


def report_url(settings: Settings, run_key: str) -> str:
    """The run's report page on the Airflow UI (``ui_base_url``, else Airflow's own base URL)."""
    base = settings.ui_base_url
    if not base:
        try:
            from airflow.configuration import conf

            base = conf.get("api", "base_url", fallback="") or ""
        except Exception:  # no Airflow here (a plain CLI install): the local default
            base = ""
    base = (base or "http://localhost:8080").rstrip("/")
    return f"{base}{REPORT_PATH}{quote(run_key, safe='')}"


def volume_of(stats: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a stats dict, flattened with dotted keys (booleans are not volume)."""
    out: dict[str, float] = {}
    if not isinstance(stats, Mapping):
        return out
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            out[name] = value
        elif isinstance(value, Mapping):
            out.update(volume_of(value, f"{name}."))
    return out


# --------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------
def _pairs(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in counts.items())


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _crawl_lines(c: dict | None) -> list[str]:
    if c is None:
        return ["crawl: no crawl run recorded"]
    return [f"crawl: {c['status']}; {c['categories']} categories, {c['products']} products ranked "
            f"(total {c['products_total']}), new reviews {c['reviews_new']} "
            f"(total {c['reviews_total']}), photos stored {c['photos_stored']}, new images "
            f"{c['images_new']} ({_size(c['image_bytes_new'])}; total {c['images_total']}, "
            f"{_size(c['image_bytes_total'])})",
            f"catalogue images: stored {c['catalogue_images_stored']}, failed "
            f"{c['catalogue_images_failed']} (products with one: {c['catalogue_images_total']})",
            "crawl failures: " + (_pairs(c["failures"]) or "none")]


def _dedup_lines(d: dict | None) -> list[str]:
    if d is None:
        return []
    return [f"dedup: {d['hashed']} images hashed, {d.get('embedded', 0)} embedded, {d['duplicates_new']} new "
            f"near-duplicates (in all {d['duplicates']} of {d['images_clustered']} images, {d['clusters']} "
            f"clusters; {d.get('duplicates_beyond_hash_threshold', 0)} further from their representative than "
            f"the hash threshold: joined by the embedding signal or through a chain)"]


def _filter_lines(f: dict | None) -> list[str]:
    if f is None:
        return ["filter: did not run"]
    line = (f"filter: {f['status']}; {f['inspected']} inspected ({f['unreadable']} unreadable), "
            f"{f['decided']} decided: kept {f['kept_images']}, rejected {f['rejected_images']} "
            f"({_pairs(f['rejected_by_rule']) or 'no rejections'})"
            + (f"; {f['salvaged_crops']} crops salvaged from multi-product photos"
               if f.get("salvaged_crops") else ""))
    return [line] + ([f"filter report: {f['report_key']}"] if f["report_key"] else [])


def _build_lines(b: dict | None) -> list[str]:
    if b is None:
        return ["dataset: no version built yet"]
    if not b["built"]:
        return [f"dataset: no new version this run (latest {b['latest_version']}, "
                f"{b['latest_images']} images)"]
    lines = [f"dataset: {b['version_id']} {b['status']} (parent {b['parent_version'] or 'none'}): "
             f"{b['images']} images, {b['labels']} labels; "
             + " / ".join(f"{s} {n}" for s, n in b["splits"].items())]
    if b["status"] == "complete":
        lines.append(f"dataset: {b['uri']}")
    elif b["error"]:
        lines.append(f"dataset: error: {b['error'][:300]}")
    excluded = b["excluded_products"]
    if excluded:
        lines.append("dataset: left out for too few photos: " + ", ".join(
            f"{e['product_id']} ({e['photos']})" for e in excluded[:10])
            + (f" and {len(excluded) - 10} more" if len(excluded) > 10 else ""))
    return lines


def _search_lines(s: dict | None) -> list[str]:
    if s is None:
        return []
    if not s["built"]:
        return [f"search index: none built this run (current {s['index_id']}, "
                f"{s['products']} products)"]
    threshold = f"{s['threshold']:.3f}" if s["threshold"] is not None else "none"
    line = (f"search index: {s['index_id']} {s['status']} "
            f"({'on ' + s['parent_id'] if s['parent_id'] else 'full build'}): "
            f"{s['products']} products, {s['vectors']} vectors (+{s['added_vectors']}), "
            f"threshold {threshold}")
    return [line] + ([f"search index: error: {s['error'][:300]}"] if s["error"] else [])


def _training_lines(models: list[dict]) -> list[str]:
    lines = []
    for m in models:
        scores = (f": ensemble test Top-1 {m['top1']:.1%}, Top-3 {m['top3']:.1%} (n={m['n']})"
                  if m["top1"] is not None else "")
        outcome = ("promoted" if m["promoted"] else "not promoted") + (
            f": {m['reason']}" if m["reason"] else "")
        if m["status"] == "failed":
            outcome = f"error: {(m['error'] or '')[:300]}"
        lines.append(f"training: model {m['model_id']} {m['status']}{scores}; {outcome}")
    return lines


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
