"""Salvage in the nightly filter: a review photo rejected as multi-product yields the crop that
matches the reviewed product, which then enters the dataset like a kept photo (issue 17, item 4).

Real manifest (PostgreSQL), object store (SeaweedFS), rules, embedding (random-init
EfficientNet-Lite0, which tells the drawn toy products apart: same product >= 0.997 cosine, others
<= 0.988) and dataset build; the detector is replaced by one that returns given boxes, so the
photos can be drawn products rather than furniture the real detector would recognise.
"""
from __future__ import annotations

import hashlib
import io

import pytest
import sqlalchemy as sa
from PIL import Image

from dataset.build import stage as build_stage
from dataset.filter import salvage, stage
from dataset.filter.overrides import set_override
from shoplens.manifest import engine_for, upgrade
from shoplens.store import ObjectStore
from shoplens.vision import crops
from shoplens.vision.current import current_embedder, current_threshold
from shoplens.vision.embedding import Embedder
from tests.drawn_products import drawn_photo

TILE = 256
PRODUCT_BOX = [8.0, 8.0, 248.0, 248.0]  # where the detector "sees" the left tile's product


def big(product: int, variant: int) -> Image.Image:
    return drawn_photo(product, variant).resize((TILE, TILE))


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


def side_by_side(left: int, right: int, height: int = TILE) -> Image.Image:
    """Two drawn products next to each other: what a review photo of a set looks like."""
    canvas = Image.new("RGB", (2 * TILE, height), (230, 230, 230))
    canvas.paste(big(left, 50), (0, 0))
    canvas.paste(big(right, 50), (TILE, 0))
    return canvas


class BoxesDetector:
    """Stands in for the detector: the boxes of a photo looked up by its size."""

    version, min_score = "boxes-test", 0.05

    def __init__(self, boxes_by_size: dict[tuple[int, int], list[dict]]):
        self.boxes_by_size = boxes_by_size

    def detect_fitted(self, pixels, scale, width, height):
        return [dict(b) for b in self.boxes_by_size.get((width, height), [])]


TWO_PRODUCTS = [{"label": "vase", "score": 0.9, "box": PRODUCT_BOX},
                {"label": "clock", "score": 0.8, "box": [TILE + 8.0, 8.0, 2 * TILE - 8.0, 248.0]}]
DETECTOR = BoxesDetector({(2 * TILE, TILE): TWO_PRODUCTS,
                          (2 * TILE, TILE - 6): [{**b, "box": [b["box"][0], 8.0, b["box"][2], 242.0]}
                                                 for b in TWO_PRODUCTS]})


class CountingEmbedder:
    """The real embedder, counting the photos it embeds."""

    def __init__(self, inner: Embedder):
        self.inner, self.backbone, self.embedded = inner, inner.backbone, 0

    def embed_decoded(self, decoded):
        self.embedded += len(decoded)
        return self.inner.embed_decoded(decoded)


@pytest.fixture(scope="module")
def base_embedder():
    from shoplens.config import Settings

    return Embedder(settings=Settings().with_overrides(model_init="random"))


@pytest.fixture
def settings(s3_settings, manifest_url, tmp_path):
    upgrade(manifest_url)
    return s3_settings.with_overrides(
        manifest_url=manifest_url, model_init="random", filter_min_occupancy=0.1,
        salvage_threshold=0.99, salvage_min_gap=0.005, salvage_margin=0.1,
        dataset_min_photos_per_product=3, model_work_dir=str(tmp_path / "models"))


def seed(settings, photos: list[tuple[int, bytes]]) -> list[str]:
    """Crawl rows (one review per photo) and dedup rows (each photo its own cluster)."""
    engine = engine_for(settings.manifest_url)
    store = ObjectStore(settings)
    store.ensure_bucket()
    shas = []
    with engine.begin() as conn:
        run = conn.execute(sa.text(
            "INSERT INTO crawl_runs (run_key, shop_base_url) VALUES ('crawl-1', 'http://shop') "
            "ON CONFLICT (run_key) DO UPDATE SET status = 'running' RETURNING id")).scalar_one()
        conn.execute(sa.text("INSERT INTO categories (id, name, first_seen_run, last_seen_run) "
                             "VALUES ('10120000', 'decor', :r, :r) ON CONFLICT DO NOTHING"), {"r": run})
        for product in (1, 2, 3):
            conn.execute(sa.text(
                "INSERT INTO products (id, category_id, name, source_url, first_seen_run, "
                "last_seen_run) VALUES (:p, '10120000', :n, 'http://shop/p', :r, :r) "
                "ON CONFLICT DO NOTHING"), {"p": product, "n": f"product {product}", "r": run})
        review = conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM reviews")).scalar_one()
        for product, data in photos:
            review += 1
            sha = hashlib.sha256(data).hexdigest()
            key, _ = store.put_image(data, "jpeg", sha)
            image = Image.open(io.BytesIO(data))
            conn.execute(sa.text(
                "INSERT INTO reviews (id, product_id, source_url, first_seen_run) "
                "VALUES (:id, :p, 'http://shop/r', :r)"), {"id": review, "p": product, "r": run})
            conn.execute(sa.text(
                "INSERT INTO images (sha256, object_key, size_bytes, width, height, format, "
                "source_url, review_id, product_id, first_seen_run) VALUES (:s, :k, :n, :w, :h, "
                "'jpeg', :u, :rv, :p, :r)"),
                {"s": sha, "k": key, "n": len(data), "w": image.width, "h": image.height,
                 "u": f"http://cdn/{review}.jpg", "rv": review, "p": product, "r": run})
            conn.execute(sa.text(
                "INSERT INTO image_dedup (sha256, cluster_id, threshold, run_id) "
                "VALUES (:s, :s, 25, :r)"), {"s": sha, "r": run})
            shas.append(sha)
    return shas


@pytest.fixture
def night(settings, base_embedder):
    """References of products 1 and 2 (six photos each), a photo of products 1 and 2 side by side
    reviewed as product 1, and one of products 2 and 3 also reviewed as product 1; the filter run."""
    refs = [(p, jpeg(big(p, v))) for p in (1, 2) for v in range(6)]
    multi, nobody = seed(settings, refs + [(1, jpeg(side_by_side(1, 2))),
                                           (1, jpeg(side_by_side(2, 3).crop((0, 0, 2 * TILE, TILE - 6))))])[-2:]
    embedder = CountingEmbedder(base_embedder)
    stats = stage.run(settings, "night-1", DETECTOR, embedder)
    return {"multi": multi, "nobody": nobody, "stats": stats, "embedder": embedder}


def crop_rows(settings) -> dict[str, dict]:
    with engine_for(settings.manifest_url).connect() as conn:
        return {r["parent_sha256"]: dict(r) for r in conn.execute(
            sa.text("SELECT * FROM salvaged_crops")).mappings()}


def test_a_multi_product_photo_yields_the_crop_of_the_reviewed_product_with_its_lineage(settings, night):
    rows = crop_rows(settings)
    row = rows[night["multi"]]
    assert row["outcome"] == "salvaged" and row["label"] == "vase"
    assert row["box"] == PRODUCT_BOX
    assert row["crop_box"] == list(crops.crop_box(PRODUCT_BOX, 2 * TILE, TILE, 0.1))
    assert row["product_id"] == 1 and row["best_score"] >= row["threshold"] == 0.99
    with engine_for(settings.manifest_url).connect() as conn:
        parent = conn.execute(sa.text("SELECT review_id, source_url FROM images WHERE sha256 = :s"),
                              {"s": night["multi"]}).one()
        run_id = conn.execute(sa.text("SELECT id FROM filter_runs WHERE run_key = 'night-1'")).scalar_one()
    assert row["review_id"] == parent.review_id and row["run_id"] == run_id
    assert row["source_url"].startswith(parent.source_url + "#crop=")
    data = ObjectStore(settings).get_bytes(row["object_key"])
    assert hashlib.sha256(data).hexdigest() == row["sha256"].strip()
    assert row["object_key"] == f"images/{row['sha256'][:2]}/{row['sha256'].strip()}.jpg"
    x0, y0, x1, y1 = row["crop_box"]
    assert Image.open(io.BytesIO(data)).size == (x1 - x0, y1 - y0) == (row["width"], row["height"])
    assert night["stats"]["salvaged_crops"] == 1 and night["stats"]["salvage_considered"] == 2

    from shoplens.lineage import lineage

    story = lineage(settings, row["sha256"][:12])
    assert story["salvaged_from"]["parent_sha256"].strip() == night["multi"]
    assert story["image"]["sha256"].strip() == night["multi"] and story["product"]["id"] == 1
    assert lineage(settings, night["multi"])["salvaged_crop"]["sha256"].strip() == row["sha256"].strip()


def test_a_photo_whose_products_match_nobody_above_the_threshold_yields_nothing(settings, night):
    row = crop_rows(settings)[night["nobody"]]
    assert row["outcome"] == "no_match" and row["sha256"] is None and row["object_key"] is None
    assert row["best_score"] < 0.99


def test_the_filter_report_shows_the_salvaged_crop_with_its_parent(settings, night):
    page = ObjectStore(settings).get_bytes(night["stats"]["report_key"]).decode()
    crop = crop_rows(settings)[night["multi"]]["sha256"]
    assert 'id="salvaged"' in page and crop[:12] in page and night["multi"][:12] in page
    assert night["nobody"][:12] not in page.split('id="salvaged"')[1]


def test_the_crop_enters_the_next_build_labelled_with_the_product_until_overridden(settings, night):
    crop = crop_rows(settings)[night["multi"]]["sha256"].strip()
    first = build_stage.run(settings, "build-1")
    with engine_for(settings.manifest_url).connect() as conn:
        member = conn.execute(sa.text(
            "SELECT m.product_id, m.label, l.product_id AS labelled FROM dataset_members m "
            "JOIN label_map l ON l.label = m.label WHERE m.version_id = :v AND m.sha256 = :s"),
            {"v": first["version_id"], "s": crop}).one()
    assert member.product_id == member.labelled == 1

    set_override(settings.manifest_url, crop, "reject", "crop shows the neighbouring product")
    second = build_stage.run(settings, "build-2")
    assert second["version_id"] != first["version_id"]
    with engine_for(settings.manifest_url).connect() as conn:
        members = set(conn.execute(sa.text(
            "SELECT sha256 FROM dataset_members WHERE version_id = :v"),
            {"v": second["version_id"]}).scalars())
    assert crop not in {m.strip() for m in members} and len(members) == first["counts"]["images"] - 1


def test_a_retried_or_later_run_redoes_nothing(settings, night):
    before = crop_rows(settings)
    objects = set(ObjectStore(settings).list_keys("images/"))
    embedder = night["embedder"]
    embedded = embedder.embedded
    again = stage.decide(settings, "night-1", embedder=embedder)  # the same run, retried
    later = stage.run(settings, "night-2", DETECTOR, embedder)    # the next night
    assert crop_rows(settings) == before
    assert set(ObjectStore(settings).list_keys("images/")) == objects
    assert embedder.embedded == embedded
    assert again["salvaged_crops"] == 1 and later["salvaged_crops"] == 0


def test_salvage_off_salvages_nothing(settings, base_embedder):
    seed(settings, [(1, jpeg(big(1, v))) for v in range(3)] + [(1, jpeg(side_by_side(1, 2)))])
    stats = stage.run(settings.with_overrides(salvage_enabled=False), "night-off", DETECTOR,
                      CountingEmbedder(base_embedder))
    assert stats["salvage"] == "off" and crop_rows(settings) == {}


def test_choice_needs_the_threshold_and_a_lead_over_the_other_products():
    assert salvage.choose([0.97, 0.80], [0, 1], 0.9, 0.05).index == 0
    assert salvage.choose([0.97, 0.80], [0, 1], 0.98, 0.05).outcome == "no_match"
    assert salvage.choose([0.97, 0.95], [0, 1], 0.9, 0.05).outcome == "ambiguous"
    # Two boxes of one product (same group) do not compete with each other.
    assert salvage.choose([0.97, 0.96], [0, 0], 0.9, 0.05).index == 0
    assert salvage.choose([], [], 0.9, 0.05).outcome == "no_box"


def test_crop_geometry_adds_the_margin_and_stays_inside_the_photo():
    assert crops.crop_box([10, 20, 110, 70], 200, 100, 0.1) == (0, 15, 120, 75)
    assert crops.crop_box([150, 50, 200, 100], 200, 100, 0.5) == (125, 25, 200, 100)


def test_without_a_promoted_embedding_the_baseline_and_the_configured_threshold_are_used(settings):
    model_id, embedder = current_embedder(settings)
    assert model_id is None and not embedder.trained
    assert current_threshold(settings, None, 0.77) == 0.77


def test_a_photo_failing_another_rule_than_occupancy_is_not_a_candidate():
    from shoplens.config import Settings

    settings = Settings()
    assert salvage.salvageable({"multi_product"}, settings)
    assert salvage.salvageable({"multi_product", "occupancy"}, settings)  # a crop fixes occupancy
    assert not salvage.salvageable({"multi_product", "too_small"}, settings)
    assert not salvage.salvageable({"occupancy"}, settings)
    with pytest.raises(ValueError):
        salvage.allowed_failures(settings.with_overrides(salvage_despite_rules=("unreadable",)))


def test_a_promoted_embedding_and_its_index_threshold_are_what_the_salvage_uses(settings, base_embedder,
                                                                                tmp_path):
    local = base_embedder.save(tmp_path / "emb")
    store = ObjectStore(settings)
    store.ensure_bucket()
    for path in local.iterdir():
        store.put_bytes(f"models/emb-1/{path.name}", path.read_bytes())
    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO models (id, dataset_version, profile, status, artifact_prefix, kind) "
            "VALUES ('emb-1', 'v0001', 'offline', 'complete', 'models/emb-1/', 'embedding')"))
        conn.execute(sa.text("INSERT INTO model_promotions (model_id, reason) VALUES ('emb-1', 'test')"))
        conn.execute(sa.text(
            "INSERT INTO search_indexes (id, model_id, status, threshold, artifact_prefix, "
            "completed_at) VALUES ('idx-1', 'emb-1', 'complete', 0.81, 'indexes/idx-1/', now())"))
    model_id, embedder = current_embedder(settings)
    assert model_id == "emb-1" and embedder.backbone == base_embedder.backbone
    assert current_threshold(settings, "emb-1", 0.55) == 0.81
    assert current_threshold(settings, None, 0.55) == 0.55  # another embedding's scale
