"""Salvage: a review photo rejected as multi-product still shows the reviewed product.

For each such photo (latest decisions: ``multi_product`` failed, every other rule passed except
those in ``salvage_despite_rules``, by default occupancy: the main product's share of the whole
frame, which a crop fixes; no override; not looked at before), the salvage

1. takes its stored detector boxes that count as products (the multi-product rule's own
   :func:`rules.product_boxes`) and are of a salvage class (``salvage_classes``), grouped into the
   products the rule counted (:func:`rules.group_products`: boxes of one object or one kind are one
   product);
2. crops each box with a context margin (:mod:`shoplens.vision.crops`) and embeds the crops with
   the current search embedding (:func:`shoplens.vision.current.current_embedder`);
3. scores each crop by its best cosine similarity to the reviewed product's references: its kept
   photos (at most ``salvage_max_references``, a deterministic choice) and its catalogue image,
   embedded once per run;
4. salvages the best crop when its score is >= the threshold (the current search index's, when it
   was built with the same embedding; else ``salvage_threshold``) and beats the best crop of every
   other product in view by >= ``salvage_min_gap`` (so a photo whose other product looks as much
   like the reviewed one yields nothing).

A salvaged crop is stored as a JPEG under its content address (``images/<sha256>``) and recorded in
``salvaged_crops`` with its lineage; the ``kept_images`` view lists it with the parent's product,
review and near-duplicate cluster, so the build takes it like any kept photo, until
``shoplens override CROP_SHA256 --reject``. Every photo looked at gets a row (outcome
``salvaged``/``no_match``/``ambiguous``/``no_box``), so it is looked at once; a photo whose product
has no reference yet gets none and is looked at again on a later night.

Work goes in chunks of ``filter_detect_batch`` photos, each stored in one transaction after its
crops are in the store: a retried run skips the photos already recorded and re-puts nothing
(content-addressed keys).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from dataset.filter import rules
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.manifest.schema import catalogue_images, salvaged_crops
from shoplens.photos import PhotoLimits, PhotoRejected, decode_photo, encode_jpeg
from shoplens.progress import progress
from shoplens.store import ObjectStore
from shoplens.vision import crops as crop_geometry
from shoplens.vision.current import current_embedder, current_threshold

log = logging.getLogger(__name__)

# Photos whose latest decisions fail multi_product and pass every other rule but those in :allowed,
# not overridden, not looked at yet, with their stored boxes for the detector version.
CANDIDATES_SQL = sa.text("""
    WITH latest AS (
        SELECT DISTINCT ON (sha256, rule) sha256, rule, passed
        FROM rule_decisions
        ORDER BY sha256, rule, run_id DESC, id DESC
    ), only_multi AS (
        SELECT sha256 FROM latest GROUP BY sha256
        HAVING bool_and(passed OR rule = ANY(:allowed))
           AND bool_or(rule = 'multi_product' AND NOT passed)
    )
    SELECT i.sha256, i.object_key, i.product_id, i.review_id, i.source_url,
           d.width, d.height, d.boxes, p.category_id
    FROM only_multi m
    JOIN images i ON i.sha256 = m.sha256
    JOIN products p ON p.id = i.product_id
    JOIN detections d ON d.sha256 = i.sha256 AND d.detector_version = :detector_version
    WHERE NOT EXISTS (SELECT 1 FROM salvaged_crops c WHERE c.parent_sha256 = i.sha256)
      AND NOT EXISTS (SELECT 1 FROM image_overrides o WHERE o.sha256 = i.sha256)
    ORDER BY i.sha256
""")

# A product's kept photos (crops included), in a deterministic order.
REFERENCES_SQL = sa.text("""
    SELECT sha256, object_key FROM kept_images WHERE product_id = :product_id
    ORDER BY md5(sha256 || :seed) LIMIT :n
""")


CROP_COLUMNS = ("label", "detector_score", "box", "crop_box", "sha256", "object_key", "size_bytes",
                "width", "height", "source_url")


@dataclass(frozen=True)
class Choice:
    """What the salvage decided for one photo: ``index`` of the chosen crop or None."""

    outcome: str  # salvaged | no_match | ambiguous | no_box
    index: int | None
    best: float | None
    runner_up: float | None


def choose(scores: np.ndarray, groups: list[int], threshold: float, min_gap: float) -> Choice:
    """The crop to salvage from per-crop ``scores`` (similarity to the reviewed product) and the
    product group each crop belongs to: the best crop if it reaches ``threshold`` and beats the
    best crop of every other group by ``min_gap``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return Choice("no_box", None, None, None)
    best = int(np.argmax(scores))
    others = [float(s) for s, g in zip(scores, groups) if g != groups[best]]
    runner_up = max(others) if others else None
    top = float(scores[best])
    if top < threshold:
        return Choice("no_match", None, top, runner_up)
    if runner_up is not None and top - runner_up < min_gap:
        return Choice("ambiguous", None, top, runner_up)
    return Choice("salvaged", best, top, runner_up)


def salvage_boxes(f: rules.Features, params: rules.RuleParams,
                  classes: frozenset[str]) -> tuple[list[dict], list[int]]:
    """The boxes worth cropping (product boxes of a salvage class) and the product group of each."""
    groups = rules.group_products(rules.product_boxes(f, params), params.same_object_iou)
    boxes, group_of = [], []
    for g, group in enumerate(groups):
        for box in group:
            if box["label"] in classes:
                boxes.append(box)
                group_of.append(g)
    return boxes, group_of


class References:
    """Reference vectors per product (kept photos + catalogue image), embedded once per run."""

    def __init__(self, settings: Settings, conn: sa.Connection, store: ObjectStore, embedder,
                 limits: PhotoLimits):
        self.settings, self.conn, self.store, self.embedder = settings, conn, store, embedder
        self.limits = limits
        self._vectors: dict[int, np.ndarray] = {}

    def __call__(self, product_id: int) -> np.ndarray:
        if product_id not in self._vectors:
            keys = [r.object_key for r in self.conn.execute(REFERENCES_SQL, {
                "product_id": product_id, "seed": self.settings.dataset_split_seed,
                "n": self.settings.salvage_max_references})]
            keys += list(self.conn.execute(sa.select(catalogue_images.c.object_key).where(
                catalogue_images.c.product_id == product_id)).scalars())
            decoded = []
            for key in keys:
                try:
                    decoded.append(decode_photo(self.store.get_bytes(key), self.limits).image)
                except PhotoRejected as exc:  # a bad reference is skipped, not fatal
                    log.warning("salvage: reference %s unreadable (%s)", key, exc.reason)
            self._vectors[product_id] = self.embedder.embed_decoded(decoded)
        return self._vectors[product_id]


def _settings_classes(settings: Settings) -> frozenset[str]:
    from shoplens.vision.detector import COCO_CLASSES

    classes = frozenset(settings.salvage_classes)
    unknown = sorted(classes - set(COCO_CLASSES))
    if unknown:
        raise ValueError(f"salvage_classes names unknown detector classes {unknown}")
    return classes


def allowed_failures(settings: Settings) -> list[str]:
    """The rules a salvaged photo may fail: multi_product and ``salvage_despite_rules``."""
    extra = set(settings.salvage_despite_rules)
    wrong = sorted(extra - set(rules.RULE_NAMES) | extra & {"unreadable"})
    if wrong:
        raise ValueError(f"salvage_despite_rules: {wrong} cannot be salvaged despite "
                         f"(rules: {', '.join(rules.RULE_NAMES[1:])})")
    return ["multi_product", *sorted(extra)]


def salvageable(failed: set[str], settings: Settings) -> bool:
    """Whether a photo failing ``failed`` rules is one the salvage looks at."""
    return "multi_product" in failed and failed <= set(allowed_failures(settings))


def crop_source_url(parent_url: str, rect: tuple[int, int, int, int]) -> str:
    """The crop's source: its parent's address with the crop rectangle as a fragment."""
    return f"{parent_url.split('#')[0]}#crop={','.join(str(v) for v in rect)}"


def salvage_photo(row, image, params: rules.RuleParams, classes: frozenset[str], embedder,
                  references: np.ndarray, threshold: float, settings: Settings):
    """(Choice, chosen box, crop rectangle, crop image) for one decoded photo."""
    f = rules.Features(row.width, row.height, row.boxes, {}, row.category_id)
    boxes, group_of = salvage_boxes(f, params, classes)
    crops, rects, kept_boxes, kept_groups = [], [], [], []
    for box, group in zip(boxes, group_of):
        piece, rect = crop_geometry.crop(image, box["box"], settings.salvage_margin)
        if min(piece.size) < settings.salvage_min_side:
            continue
        crops.append(piece)
        rects.append(rect)
        kept_boxes.append(box)
        kept_groups.append(group)
    if not crops:
        return Choice("no_box", None, None, None), None, None, None
    vectors = embedder.embed_decoded(crops)
    scores = (vectors @ references.T).max(axis=1)
    choice = choose(scores, kept_groups, threshold, settings.salvage_min_gap)
    if choice.index is None:
        return choice, None, None, None
    return choice, kept_boxes[choice.index], rects[choice.index], crops[choice.index]


def run(settings: Settings, run_id: int, detector_version: str, params: rules.RuleParams,
        embedder=None) -> dict:
    """Salvage every candidate photo (see the module docstring); returns the counts."""
    if not settings.salvage_enabled:
        return {"salvage": "off"}
    classes = _settings_classes(settings)
    engine = engine_for(settings.manifest_url)
    with engine.connect() as conn:
        candidates = conn.execute(CANDIDATES_SQL, {"detector_version": detector_version,
                                                   "allowed": allowed_failures(settings)}).all()
    counts = {"salvage_considered": 0, "salvaged_crops": 0, "salvage_no_reference": 0}
    if not candidates:
        return counts
    if embedder is None:
        model_id, embedder = current_embedder(settings)
    else:  # given by the caller (tests, benchmarks): its id if it says, else the baseline's None
        model_id = getattr(embedder, "model_id", None)
    threshold = current_threshold(settings, model_id, settings.salvage_threshold)
    store = ObjectStore(settings)
    limits = PhotoLimits.from_settings(settings)
    size = max(1, settings.filter_detect_batch)
    with engine.connect() as ref_conn, progress(total=len(candidates), desc="filter salvage",
                                                unit="photos") as shown:
        references = References(settings, ref_conn, store, embedder, limits)
        for start in range(0, len(candidates), size):
            values = []
            for row in candidates[start:start + size]:
                shown.advance()
                refs = references(int(row.product_id))
                if len(refs) == 0:
                    counts["salvage_no_reference"] += 1
                    continue
                try:
                    image = decode_photo(store.get_bytes(row.object_key), limits).image
                except PhotoRejected as exc:
                    log.warning("salvage: %s unreadable (%s)", row.sha256, exc.reason)
                    continue
                choice, box, rect, piece = salvage_photo(row, image, params, classes, embedder,
                                                         refs, threshold, settings)
                value = {"parent_sha256": row.sha256, "run_id": run_id, "outcome": choice.outcome,
                         "product_id": row.product_id, "review_id": row.review_id,
                         "detector_version": detector_version, "embedding_model": model_id,
                         "threshold": threshold, "best_score": choice.best,
                         "runner_up_score": choice.runner_up, "reference_photos": len(refs),
                         **dict.fromkeys(CROP_COLUMNS)}
                if piece is not None:
                    data = encode_jpeg(piece)
                    key, _ = store.put_image(data, "jpeg")  # content-addressed: a retry re-puts nothing
                    value.update(label=box["label"], detector_score=float(box["score"]),
                                 box=[round(float(v), 2) for v in box["box"]], crop_box=list(rect),
                                 sha256=hashlib.sha256(data).hexdigest(), object_key=key,
                                 size_bytes=len(data), width=piece.width, height=piece.height,
                                 source_url=crop_source_url(row.source_url, rect))
                    counts["salvaged_crops"] += 1
                values.append(value)
                counts["salvage_considered"] += 1
            if values:
                with engine.begin() as conn:
                    conn.execute(insert(salvaged_crops).on_conflict_do_nothing(), values)
    counts["salvage_threshold"] = threshold
    counts["salvage_embedding"] = model_id or f"untrained {embedder.backbone}"
    return counts
