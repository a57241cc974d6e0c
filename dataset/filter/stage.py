"""The nightly filter stage: detect in batches, store features, decide rules, report.

Three steps, each callable on its own (the nightly DAG maps :func:`detect_batch` over the plan,
so several Celery workers share a night), and ``run(settings, run_key)`` doing all three in one
process (CLI, tests):

1. :func:`plan_batches` opens (or, on a retry, reuses) the night's ``filter_runs`` row and cuts
   the images that have no detections for the current detector version into sha256 ranges
   (:mod:`shoplens.batches`);
2. :func:`detect_batch` inspects what in one range still has no detections (bytes from the
   object store by ``images.object_key``, reads in flight ahead of the detector), storing every
   box >= ``detector_store_min_score`` and the image statistics, in one transaction per batch: a
   killed batch writes nothing, a re-run batch writes the same rows;
3. :func:`decide` decides every rule for each image whose latest decisions were made with other
   thresholds, rule version or detector version (so a threshold change re-decides from stored
   features, without the detector), appending rows to the ``rule_decisions`` history; writes an
   HTML report to ``reports/<run_key>/filter.html`` and returns its key and its link on the
   shoplens page in the Airflow UI (``/shoplens/runs/<run_key>/filter-report``, which serves it
   from the object store) in the stats dict.

YOLOX-Nano's ONNX graph has a fixed batch of 1 (input ``[1, 3, 416, 416]``), so images go
through the detector one at a time; ``benchmarks/stage_scaling.py`` measures what that costs.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Iterable

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert

from dataset.filter import report, rules, salvage
from shoplens.vision.detector import Detector, fit_for_model, model_version, open_for_model
from dataset.filter.occupancy import FEATURES_VERSION, image_statistics
from shoplens import batches
from shoplens.batches import Batch
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.manifest.schema import (detections, filter_runs, images, products, rule_decisions,
                                      salvaged_crops)
from shoplens.photos import DEFAULT_LIMITS, PhotoLimits
from shoplens.progress import progress
from shoplens.store import ObjectStore

log = logging.getLogger(__name__)

STAGE = "filter"


def features_for(detector: Detector, data: bytes, category_id: str | None = None,
                 limits: PhotoLimits = DEFAULT_LIMITS) -> rules.Features:
    """Detections + statistics of one image's bytes; undecodable bytes give a decode_error."""
    try:
        image, (width, height) = open_for_model(data, limits=limits)
        fitted, scale = fit_for_model(image, (width, height))
    except Exception as exc:  # the decoder's PhotoRejected, or a resize failing on odd data
        return rules.Features(0, 0, [], {"decode_error": f"{type(exc).__name__}: {exc}"[:300]},
                              category_id)
    pixels = np.asarray(fitted)  # one array for the model input and the statistics
    boxes = detector.detect_fitted(pixels, scale, width, height)
    # Statistics from the model-sized image (no second decode or resize): they subsample it to
    # about 128 px anyway.
    return rules.Features(width, height, boxes, image_statistics(pixels), category_id)


def load_detector(settings: Settings) -> Detector:
    """The configured detector, loaded once per worker process (every batch it runs reuses it)."""
    return _detector(str(Path(settings.detector_model_path).expanduser()),
                     settings.detector_store_min_score, settings.detector_threads,
                     model_version(settings.detector_model_path))


@functools.lru_cache(maxsize=2)
def _detector(path: str, min_score: float, threads: int, version: str) -> Detector:
    # ``version`` is in the key so a replaced model file is loaded afresh.
    return Detector(path, min_score=min_score, threads=threads)


def _start_run(conn: sa.Connection, run_key: str, detector_version: str, params: dict) -> int:
    stmt = insert(filter_runs).values(run_key=run_key, detector_version=detector_version,
                                      rule_version=rules.RULES_VERSION, params=params, stats={})
    stmt = stmt.on_conflict_do_update(  # a retried task reuses its run row
        index_elements=["run_key"],
        set_={"status": "running", "detector_version": detector_version,
              "rule_version": rules.RULES_VERSION, "params": params, "finished_at": None})
    return conn.execute(stmt.returning(filter_runs.c.id)).scalar_one()


def _undetected(conn: sa.Connection, detector_version: str, batch: Batch | None = None):
    """(sha256, object_key) of images without detections of this version, in sha256 order."""
    query = (sa.select(images.c.sha256, images.c.object_key)
             .where(~sa.exists().where(detections.c.sha256 == images.c.sha256,
                                       detections.c.detector_version == detector_version))
             .order_by(images.c.sha256))
    if batch is not None:
        query = query.where(batch.where(images.c.sha256))
    return conn.execute(query).all()


def _run_row(conn: sa.Connection, run_key: str):
    row = conn.execute(sa.select(filter_runs.c.id, filter_runs.c.detector_version)
                       .where(filter_runs.c.run_key == run_key)).one_or_none()
    if row is None:
        raise RuntimeError(f"no filter run {run_key!r}: plan_batches opens it")
    return row


def plan_batches(settings: Settings, run_key: str, detector_version: str | None = None) -> list[Batch]:
    """Open the night's filter run; its detection work as sha256-range batches of
    ``filter_detect_batch`` images, for ``detector_version`` (default: the configured model's)."""
    # A missing model fails here, before any batch starts.
    version = detector_version or model_version(settings.detector_model_path)
    params = rules.params_from_settings(settings)
    engine = engine_for(settings.manifest_url)
    with engine.begin() as conn:
        _start_run(conn, run_key, version, params.as_json())
        todo = [row.sha256 for row in _undetected(conn, version)]
    return batches.plan(todo, stage=STAGE, run_key=run_key, size=settings.filter_detect_batch,
                        version=version)


def detect_batch(settings: Settings, batch: Batch | dict, detector: Detector | None = None) -> dict:
    """Detections + statistics of what in the batch's range has none for this detector version;
    one transaction for the batch's rows."""
    batch = Batch.of(batch)
    detector = detector or load_detector(settings)
    if detector.version != batch.version:
        raise RuntimeError(f"{batch.label} was planned for detector {batch.version!r}, this worker "
                           f"has {detector.version!r}: plan again")
    engine = engine_for(settings.manifest_url)
    with engine.connect() as conn:
        run_id = _run_row(conn, batch.run_key).id
        todo = _undetected(conn, detector.version, batch)
    store = ObjectStore(settings)
    limits = PhotoLimits.from_settings(settings)  # the caps the crawler stored the photos under
    values = []
    with progress(total=len(todo), desc=f"filter detection, {batch.label}", unit="photos") as shown:
        for (sha256, object_key), data, error in store.read_objects(
                todo, key=lambda row: row.object_key):
            if error is not None:  # the photo was stored by the crawler: its absence is an outage
                raise RuntimeError(f"cannot read {object_key}: {type(error).__name__}: {error}") from error
            features = features_for(detector, data, limits=limits)
            values.append({"sha256": sha256, "detector_version": detector.version,
                           "features_version": FEATURES_VERSION, "width": features.width,
                           "height": features.height, "boxes": features.boxes,
                           "stats": features.stats, "min_score": detector.min_score,
                           "run_id": run_id})
            shown.advance()
    if values:
        statement = insert(detections).values(values)
        with engine.begin() as conn:
            conn.execute(statement.on_conflict_do_update(
                index_elements=[detections.c.sha256, detections.c.detector_version],
                set_={c: statement.excluded[c] for c in
                      ("features_version", "width", "height", "boxes", "stats", "min_score", "run_id")}))
    return {"batch": batch.index, "inspected": len(values),
            "unreadable": sum("decode_error" in v["stats"] for v in values)}


def decide_stored(settings: Settings, detector_version: str, params: rules.RuleParams,
                  run_id: int) -> dict:
    """Decide rules from stored features for every image not yet decided with these params."""
    engine = engine_for(settings.manifest_url)
    params_json = params.as_json()
    later = rule_decisions.alias("later")
    already = sa.exists().where(
        rule_decisions.c.sha256 == detections.c.sha256,
        rule_decisions.c.detector_version == detector_version,
        rule_decisions.c.rule_version == rules.RULES_VERSION,
        rule_decisions.c.params == sa.cast(sa.literal(params_json, JSONB), JSONB),
        # The latest run's decisions must be those: an older identical run does not count.
        rule_decisions.c.run_id == sa.select(sa.func.max(later.c.run_id))
        .where(later.c.sha256 == detections.c.sha256).scalar_subquery())
    query = (sa.select(detections.c.sha256, detections.c.width, detections.c.height,
                       detections.c.boxes, detections.c.stats, products.c.category_id)
             .select_from(detections.join(images, images.c.sha256 == detections.c.sha256)
                          .outerjoin(products, products.c.id == images.c.product_id))
             .where(detections.c.detector_version == detector_version, ~already))
    decided = 0
    with engine.begin() as conn:
        rows = conn.execute(query).all()
        batch: list[dict] = []
        for row in progress(rows, "filter rules", unit="photos"):
            f = rules.Features(row.width, row.height, row.boxes, row.stats, row.category_id)
            for d in rules.decide(f, params):
                batch.append({"sha256": row.sha256, "rule": d.rule, "run_id": run_id,
                              "passed": d.passed, "score": d.score, "reason": d.reason,
                              "rule_version": rules.RULES_VERSION,
                              "detector_version": detector_version, "params": params_json})
            decided += 1
            if len(batch) >= 2000:
                _insert_decisions(conn, batch)
                batch = []
        _insert_decisions(conn, batch)
    return {"decided": decided}


def _insert_decisions(conn: sa.Connection, batch: list[dict]) -> None:
    if batch:
        conn.execute(insert(rule_decisions).on_conflict_do_update(
            constraint="rule_decisions_once_per_run",
            set_={c: sa.text(f"excluded.{c}") for c in
                  ("passed", "score", "reason", "rule_version", "detector_version", "params")}),
            batch)


def report_link(settings: Settings, run_key: str) -> str:
    """The filter report's address on the shoplens page (served by plugins/shoplens_ui)."""
    from shoplens.ops import report_url  # the run page's address; ops needs Airflow, import late

    return f"{report_url(settings, run_key)}/filter-report"


def _report(settings: Settings, run_key: str, run_id: int, summary: dict) -> tuple[str, str]:
    engine = engine_for(settings.manifest_url)
    store = ObjectStore(settings)
    with engine.connect() as conn:
        counts = conn.execute(
            sa.select(rule_decisions.c.rule, rule_decisions.c.passed, sa.func.count())
            .where(rule_decisions.c.run_id == run_id)
            .group_by(rule_decisions.c.rule, rule_decisions.c.passed)).all()
        rejected = conn.execute(
            sa.select(rule_decisions.c.rule, rule_decisions.c.sha256, rule_decisions.c.reason,
                      rule_decisions.c.score, images.c.object_key)
            .join(images, images.c.sha256 == rule_decisions.c.sha256)
            .where(rule_decisions.c.run_id == run_id, ~rule_decisions.c.passed)
            .order_by(rule_decisions.c.rule, rule_decisions.c.sha256)).all()
        parent = images.alias("parent")
        salvaged_rows = conn.execute(
            sa.select(salvaged_crops, parent.c.object_key.label("parent_key"), products.c.name)
            .join(parent, parent.c.sha256 == salvaged_crops.c.parent_sha256)
            .join(products, products.c.id == salvaged_crops.c.product_id)
            .where(salvaged_crops.c.run_id == run_id, salvaged_crops.c.sha256.isnot(None))
            .order_by(salvaged_crops.c.sha256).limit(settings.filter_report_salvaged)).all()
    rule_counts: dict[str, dict[str, int]] = {}
    for rule, passed, n in counts:
        rule_counts.setdefault(rule, {})["passed" if passed else "rejected"] = n
    examples: dict[str, list[dict]] = {}
    for row in rejected:
        shown = examples.setdefault(row.rule, [])
        if len(shown) < settings.filter_report_examples:
            shown.append({"sha256": row.sha256, "reason": row.reason, "score": row.score,
                          "thumbnail": report.thumbnail_data_uri(store.get_bytes(row.object_key),
                                                                 PhotoLimits.from_settings(settings))})
    salvaged = []
    limits = PhotoLimits.from_settings(settings)
    for row in salvaged_rows:
        salvaged.append({
            "sha256": row.sha256, "parent_sha256": row.parent_sha256, "label": row.label,
            "score": row.best_score, "runner_up": row.runner_up_score, "product_id": row.product_id,
            "product_name": row.name, "box": row.box,
            "crop": report.thumbnail_data_uri(store.get_bytes(row.object_key), limits),
            "parent": report.boxed_thumbnail_data_uri(store.get_bytes(row.parent_key),
                                                      row.crop_box, limits)})
    key = f"reports/{run_key}/filter.html"
    page = report.render(run_key, summary, rule_counts, examples, salvaged)
    store.put_bytes(key, page.encode(), "text/html; charset=utf-8")
    return key, report_link(settings, run_key)


def decide(settings: Settings, run_key: str, detection: list[dict] | None = None,
           embedder=None) -> dict:
    """Rules from stored features, the salvage of multi-product photos
    (:mod:`dataset.filter.salvage`), the report, the run closed (see the module docstring);
    ``detection`` is the night's :func:`detect_batch` results, for the counts; ``embedder``
    (default: the current search embedding) is what the salvage compares crops with."""
    detection = list(detection or [])
    params = rules.params_from_settings(settings)
    engine = engine_for(settings.manifest_url)
    with engine.connect() as conn:
        run_id, detector_version = _run_row(conn, run_key)
    try:
        stats: dict = {"run_key": run_key, "detector_version": detector_version,
                       "rule_version": rules.RULES_VERSION, "batches": len(detection),
                       "inspected": sum(d["inspected"] for d in detection),
                       "unreadable": sum(d["unreadable"] for d in detection)}
        stats.update(decide_stored(settings, detector_version, params, run_id))
        stats.update(salvage.run(settings, run_id, detector_version, params, embedder))
        with engine.connect() as conn:
            per_rule = conn.execute(
                sa.select(rule_decisions.c.rule, sa.func.count())
                .where(rule_decisions.c.run_id == run_id, ~rule_decisions.c.passed)
                .group_by(rule_decisions.c.rule)).all()
            rejected_images = conn.execute(
                sa.select(sa.func.count(sa.distinct(rule_decisions.c.sha256)))
                .where(rule_decisions.c.run_id == run_id, ~rule_decisions.c.passed)).scalar_one()
            if "salvaged_crops" in stats:  # recounted: a retried run salvages nothing twice
                stats["salvaged_crops"] = conn.execute(
                    sa.select(sa.func.count()).select_from(salvaged_crops)
                    .where(salvaged_crops.c.run_id == run_id,
                           salvaged_crops.c.sha256.isnot(None))).scalar_one()
        stats["rejected_by_rule"] = {rule: n for rule, n in per_rule}
        stats["rejected_images"] = rejected_images
        stats["kept_images"] = stats["decided"] - rejected_images
        stats["report_key"], stats["report_url"] = _report(
            settings, run_key, run_id, {k: v for k, v in stats.items() if k != "rejected_by_rule"})
        log.info("filter report for %s: %s", run_key, stats["report_url"])
    except BaseException:
        _mark_failed(engine, run_id)
        raise
    with engine.begin() as conn:
        conn.execute(sa.update(filter_runs).where(filter_runs.c.id == run_id).values(
            status="success", finished_at=sa.func.now(),
            stats={k: v for k, v in stats.items() if k != "report_url"}))
    return stats


def _mark_failed(engine: sa.Engine, run_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(filter_runs).where(filter_runs.c.id == run_id)
                     .values(status="failed", finished_at=sa.func.now()))


def run(settings: Settings, run_key: str, detector: Detector | None = None, embedder=None) -> dict:
    """Plan, detect every batch, decide: the whole stage in one process (see the module
    docstring). Returns a JSON-serialisable stats dict."""
    detector = detector or load_detector(settings)
    plan = plan_batches(settings, run_key, detector.version)
    try:
        detection = [detect_batch(settings, batch, detector) for batch in plan]
    except BaseException:
        with engine_for(settings.manifest_url).connect() as conn:
            run_id = _run_row(conn, run_key).id
        _mark_failed(engine_for(settings.manifest_url), run_id)
        raise
    return decide(settings, run_key, detection, embedder)


def measured_occupancy(f: rules.Features, params: rules.RuleParams) -> float:
    """The CLI's ``occupancy``: the share of the frame the main product covers (0..1). It is 0.0
    when no product was found: an unreadable image, or no product box on a cluttered background
    (the occupancy rule then passes or rejects as ``filter_occupancy_when_unknown`` says)."""
    if not f.width:
        return 0.0
    share = rules.estimate_occupancy(f, params)
    return 0.0 if share is None else round(share, 4)


def decide_files(detector: Detector, paths: Iterable[str], params: rules.RuleParams,
                 category_id: str | None = None,
                 limits: PhotoLimits = DEFAULT_LIMITS) -> Iterable[dict]:
    """The CLI's per-file JSON objects (no manifest involved)."""
    for path in paths:
        with open(path, "rb") as fh:
            f = features_for(detector, fh.read(), category_id, limits)
        decisions = rules.decide(f, params)
        verdict, reasons = rules.verdict(decisions)
        yield {"image": path, "verdict": verdict, "reasons": reasons,
               "occupancy": measured_occupancy(f, params),
               "products": rules.count_products(f, params) if f.width else 0,
               "boxes": [b for b in f.boxes if b["score"] >= params.min_score],
               "details": {d.rule: {"passed": d.passed, "score": d.score, "reason": d.reason}
                           for d in decisions}}
