"""The nightly dedup stage against a real manifest (PostgreSQL) and object store (SeaweedFS)."""
from __future__ import annotations

import hashlib
import io
import itertools
import random

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image, ImageEnhance

from dataset.dedup import alignment, similarity, stage as dedup
from dataset.dedup.hashing import HASH_VERSION, hamming, hashes_of_bytes
from shoplens.manifest import engine_for
from shoplens.store import ObjectStore


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth synthetic 'photo': a few random colour blobs, so perceptual hashes behave."""
    small = np.random.RandomState(seed).randint(0, 256, (6, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


class Crawl:
    """Writes crawl rows (runs, products, reviews, images) with plain SQL, like the crawler would."""

    def __init__(self, url: str, settings):
        self.engine = engine_for(url)
        self.store = ObjectStore(settings)
        self.review_ids = itertools.count(1)
        self.run_id = self.new_run("crawl-1")
        with self.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO categories (id, name, first_seen_run, last_seen_run)"
                                 " VALUES ('10120000', 'beds', :r, :r)"), {"r": self.run_id})
            for product in (1, 2):
                conn.execute(sa.text(
                    "INSERT INTO products (id, category_id, name, source_url, first_seen_run, last_seen_run)"
                    " VALUES (:p, '10120000', :n, :u, :r, :r)"),
                    {"p": product, "n": f"product {product}", "u": f"http://shop/{product}", "r": self.run_id})

    def new_run(self, run_key: str) -> int:
        with self.engine.begin() as conn:
            return conn.execute(sa.text("INSERT INTO crawl_runs (run_key, shop_base_url) VALUES (:k, 'http://shop')"
                                        " RETURNING id"), {"k": run_key}).scalar()

    def add(self, data: bytes, product: int = 1, run_id: int | None = None, store: bool = True) -> str:
        sha = hashlib.sha256(data).hexdigest()
        key = f"images/{sha[:2]}/{sha}.jpg"
        if store:
            self.store.put_image(data, "jpeg", sha)
        width, height = Image.open(io.BytesIO(data)).size
        review = next(self.review_ids)
        with self.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO reviews (id, product_id, source_url, first_seen_run)"
                                 " VALUES (:id, :p, 'http://shop/reviews', :r)"),
                         {"id": review, "p": product, "r": run_id or self.run_id})
            conn.execute(sa.text(
                "INSERT INTO images (sha256, object_key, size_bytes, width, height, format, source_url,"
                " review_id, product_id, first_seen_run) VALUES (:s, :k, :b, :w, :h, 'jpeg', :u, :rv, :p, :r)"),
                {"s": sha, "k": key, "b": len(data), "w": width, "h": height, "u": f"http://cdn/{sha}",
                 "rv": review, "p": product, "r": run_id or self.run_id})
        return sha

    def dedup_rows(self) -> dict[str, dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM image_dedup")).mappings().all()
        return {r["sha256"]: dict(r) for r in rows}

    def hash_rows(self) -> dict[str, dict]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT * FROM image_hashes")).mappings().all()
        return {r["sha256"]: dict(r) for r in rows}


@pytest.fixture
def crawl(manifest_url, s3_settings):
    return Crawl(manifest_url, s3_settings)


@pytest.fixture
def settings(manifest_url, s3_settings):
    return s3_settings.with_overrides(manifest_url=manifest_url)


def combined_distance(a: bytes, b: bytes) -> int:
    ha, hb = hashes_of_bytes(a), hashes_of_bytes(b)
    return hamming(ha.phash, hb.phash) + hamming(ha.dhash, hb.dhash)


def test_hashes_are_bit_for_bit_those_of_the_imagehash_library_the_version_names():
    import imagehash

    from dataset.dedup.hashing import hashes_of_image, to_signed64, trim_uniform_border

    rng = np.random.RandomState(7)
    images = [photo(seed, size) for seed, size in zip(range(12), itertools.cycle([(320, 240), (97, 411), (640, 640)]))]
    images += [Image.fromarray(rng.randint(0, 256, (120, 90, 3)).astype(np.uint8)),  # noise
               Image.new("RGB", (64, 48), (200, 10, 10)),  # one flat colour
               photo(3).convert("L")]
    for image in images:
        trimmed = trim_uniform_border(image)
        expected = (to_signed64(int(str(imagehash.phash(trimmed, hash_size=8)), 16)),
                    to_signed64(int(str(imagehash.dhash(trimmed, hash_size=8)), 16)))
        hashes = hashes_of_image(image)
        assert (hashes.phash, hashes.dhash) == expected


def test_largest_image_represents_its_cluster_and_the_others_point_to_it_with_distance(crawl, settings):
    large, small, recompressed = jpeg(photo(1)), jpeg(photo(1).resize((160, 120))), jpeg(photo(1), quality=55)
    other = jpeg(photo(2))
    shas = [crawl.add(data) for data in (small, large, recompressed, other)]
    small_sha, large_sha, recompressed_sha, other_sha = shas

    stats = dedup.run(settings, "crawl-1")

    assert stats["hashed"] == 4 and stats["run_id"] == crawl.run_id and stats["hash_failures"] == []
    rows = crawl.dedup_rows()
    assert rows[large_sha]["cluster_id"] == large_sha and rows[large_sha]["duplicate_of"] is None
    for sha, data in ((small_sha, small), (recompressed_sha, recompressed)):
        assert rows[sha]["cluster_id"] == large_sha and rows[sha]["duplicate_of"] == large_sha
        assert rows[sha]["distance"] == combined_distance(data, large)
    assert rows[other_sha]["cluster_id"] == other_sha and rows[other_sha]["duplicate_of"] is None
    assert {r["threshold"] for r in rows.values()} == {settings.dedup_threshold}
    assert {r["run_id"] for r in rows.values()} == {crawl.run_id}
    hashes = crawl.hash_rows()
    assert set(hashes) == set(shas) and {h["hash_version"] for h in hashes.values()} == {HASH_VERSION}
    assert hashes[other_sha]["phash"] == hashes_of_bytes(other).phash
    assert stats["clusters"] == 2 and stats["duplicates"] == 2 and stats["clusters_spanning_products"] == 0


def test_same_photo_under_two_products_is_flagged_for_review(crawl, settings):
    first = crawl.add(jpeg(photo(3)), product=1)
    second = crawl.add(jpeg(ImageEnhance.Brightness(photo(3)).enhance(1.1), quality=70), product=2)
    alone = crawl.add(jpeg(photo(4)), product=2)

    dedup.run(settings, "run-without-crawl-row")

    rows = crawl.dedup_rows()
    assert rows[first]["spans_products"] and rows[second]["spans_products"]
    assert not rows[alone]["spans_products"]
    assert {r["run_id"] for r in rows.values()} == {None}  # the run key has no crawl_runs row
    with crawl.engine.connect() as conn:
        review = conn.execute(sa.text("SELECT * FROM duplicate_clusters_for_review")).mappings().all()
    assert len(review) == 1
    assert review[0]["products"] == [1, 2] and sorted(review[0]["members"]) == sorted([first, second])


def test_incremental_run_hashes_only_new_images_and_a_rerun_changes_nothing(crawl, settings):
    a = crawl.add(jpeg(photo(5)))
    b = crawl.add(jpeg(photo(6)))
    dedup.run(settings, "crawl-1")
    before_hashes, before_rows = crawl.hash_rows(), crawl.dedup_rows()

    second_run = crawl.new_run("crawl-2")
    copy = crawl.add(jpeg(photo(5).resize((200, 150)), quality=60), run_id=second_run)
    stats = dedup.run(settings, "crawl-2")

    assert stats["hashed"] == 1 and stats["queried"] == 1 and stats["mode"] == "incremental"
    after_hashes, after_rows = crawl.hash_rows(), crawl.dedup_rows()
    assert after_hashes[copy]["computed_run"] == second_run
    for sha in (a, b):
        assert after_hashes[sha] == before_hashes[sha]  # not hashed again
        assert after_rows[sha] == before_rows[sha]  # a is still the representative: row untouched
    assert after_rows[copy]["duplicate_of"] == a and after_rows[copy]["run_id"] == second_run

    again = dedup.run(settings, "crawl-3")
    assert again["hashed"] == 0 and again["queried"] == 0 and again["rows_changed"] == 0
    assert crawl.hash_rows() == after_hashes and crawl.dedup_rows() == after_rows


def test_a_new_larger_image_becomes_representative_and_members_are_repointed(crawl, settings):
    medium = crawl.add(jpeg(photo(7).resize((240, 180))))
    small = crawl.add(jpeg(photo(7).resize((120, 90)), quality=60))
    dedup.run(settings, "crawl-1")
    assert crawl.dedup_rows()[small]["duplicate_of"] == medium

    later = crawl.new_run("crawl-2")
    large_bytes = jpeg(photo(7, size=(480, 360)))
    large = crawl.add(large_bytes, run_id=later)
    stats = dedup.run(settings, "crawl-2")

    rows = crawl.dedup_rows()
    assert rows[large]["cluster_id"] == large and rows[large]["duplicate_of"] is None
    assert rows[medium]["duplicate_of"] == large and rows[small]["duplicate_of"] == large
    assert rows[medium]["distance"] == combined_distance(jpeg(photo(7).resize((240, 180))), large_bytes)
    assert stats["rows_changed"] == 3 and stats["clusters"] == 1


def test_missing_object_is_reported_not_fatal_and_is_retried_next_run(crawl, settings):
    present = crawl.add(jpeg(photo(8)))
    missing_bytes = jpeg(photo(9))
    missing = crawl.add(missing_bytes, store=False)

    stats = dedup.run(settings, "crawl-1")

    assert [f["sha256"] for f in stats["hash_failures"]] == [missing]
    assert "unreadable object" in stats["hash_failures"][0]["reason"]
    assert set(crawl.dedup_rows()) == {present}
    crawl.store.put_image(missing_bytes, "jpeg", missing)  # the object shows up later
    assert dedup.run(settings, "crawl-2")["hashed"] == 1
    assert set(crawl.dedup_rows()) == {present, missing}


def test_changing_the_threshold_reclusters_every_image(crawl, settings):
    settings = settings.with_overrides(dedup_embedding=False)  # the hash rule alone decides here
    original = crawl.add(jpeg(photo(10)))
    copy = crawl.add(jpeg(photo(10).resize((160, 120)), quality=55))
    dedup.run(settings, "crawl-1")
    assert crawl.dedup_rows()[copy]["duplicate_of"] == original

    stats = dedup.run(settings.with_overrides(dedup_threshold=0), "crawl-1")

    rows = crawl.dedup_rows()
    assert stats["mode"] == "full" and stats["rows_changed"] == 2
    assert rows[copy]["duplicate_of"] is None and rows[copy]["cluster_id"] == copy
    assert {r["threshold"] for r in rows.values()} == {0}


# --- the embedding signal: near-duplicates the hashes miss ----------------------------------------
def product_photos(product: int, count: int) -> list[Image.Image]:
    """Different customer photos of one product (the replica shop's renderer: own framing, pose,
    background and light each time)."""
    from crawler.replica.synthetic import product_looks, render_photo

    rng = random.Random(product)
    look = product_looks(seed=product, count=1)[0]
    return [render_photo(look, rng) for _ in range(count)]


def cropped(image: Image.Image, fraction: float = 0.08) -> Image.Image:
    """The photo with ``fraction`` of its width and height cut from the left and the top (a re-upload
    re-framed by the customer)."""
    w, h = image.size
    return image.crop((round(w * fraction), round(h * fraction), w, h))


@pytest.fixture
def on(settings):
    """The settings with the embedding signal on (off by default, see docs/benchmarks.md)."""
    return settings.with_overrides(dedup_embedding=True)


@pytest.fixture
def reupload(crawl, settings):
    """An original photo, its 7 % crop re-uploaded, and another photo of the same product."""
    original, other = product_photos(3, 2)
    data = {"original": jpeg(original), "cropped": jpeg(cropped(original, 0.07), quality=85), "other": jpeg(other)}
    return data, {name: crawl.add(blob) for name, blob in data.items()}


def test_a_cropped_reupload_is_clustered_with_its_original_though_hashes_miss_it(crawl, on, reupload):
    settings = on
    data, sha = reupload
    assert combined_distance(data["original"], data["cropped"]) > settings.dedup_threshold  # hashes miss it

    stats = dedup.run(settings, "crawl-1")

    rows = crawl.dedup_rows()
    assert rows[sha["cropped"]]["duplicate_of"] == sha["original"]  # the larger one represents
    assert rows[sha["other"]]["cluster_id"] == sha["other"]  # another photo of the product stays apart
    assert stats["pairs_by_signal"] == {"hash": 0, "embedding": 1}
    assert stats["embedded"] == 3 and stats["embedding_rule"].startswith(
        f"cosine >= {settings.dedup_embedding_min_cosine:g}")
    with crawl.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT sha256, embedding_version, dim FROM image_embeddings")).all()
    assert {r.sha256 for r in stored} == set(sha.values())
    assert {r.embedding_version for r in stored} == {similarity.embedding_version(settings)}


def test_turning_the_embedding_signal_off_reverts_to_hashes_only(crawl, on, reupload):
    settings = on
    _, sha = reupload
    dedup.run(settings, "crawl-1")
    assert crawl.dedup_rows()[sha["cropped"]]["duplicate_of"] == sha["original"]

    stats = dedup.run(settings.with_overrides(dedup_embedding=False), "crawl-2")

    rows = crawl.dedup_rows()
    assert stats["mode"] == "full" and stats["embedded"] == 0 and stats["embedding_rule"] is None
    assert stats["pairs_by_signal"] == {"hash": 0, "embedding": 0}
    assert all(row["cluster_id"] == s and row["embedding_rule"] is None for s, row in rows.items())


def test_a_new_embedding_version_recomputes_every_vector_and_reclusters(crawl, on, reupload, monkeypatch):
    settings = on
    _, sha = reupload
    dedup.run(settings, "crawl-1")
    monkeypatch.setattr(similarity, "EMBEDDING_SCHEME", similarity.EMBEDDING_SCHEME + "-next")

    stats = dedup.run(settings, "crawl-2")

    assert stats["embedded"] == 3 and stats["reembedded"] == 3 and stats["hashed"] == 0
    assert stats["mode"] == "full" and crawl.dedup_rows()[sha["cropped"]]["duplicate_of"] == sha["original"]
    with crawl.engine.connect() as conn:
        versions = conn.execute(sa.text("SELECT DISTINCT embedding_version FROM image_embeddings")).scalars().all()
    assert versions == [similarity.embedding_version(settings)]


def test_a_batch_that_fails_writes_nothing_and_a_retry_writes_the_same_rows(crawl, on, reupload, monkeypatch):
    settings = on
    [batch] = dedup.plan_batches(settings, "crawl-1")

    def broken(*args):
        raise RuntimeError("worker killed")
    real = similarity.embed_squares
    monkeypatch.setattr(similarity, "embed_squares", broken)
    with pytest.raises(RuntimeError, match="worker killed"):
        dedup.hash_batch(settings, batch.as_dict())
    assert crawl.hash_rows() == {}  # neither hashes nor vectors of a failed batch are stored
    with crawl.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM image_embeddings")).scalar() == 0

    monkeypatch.setattr(similarity, "embed_squares", real)
    first = dedup.hash_batch(settings, batch.as_dict())
    with crawl.engine.connect() as conn:
        vectors = dict(conn.execute(sa.text("SELECT sha256, vector FROM image_embeddings")).all())
    again = dedup.hash_batch(settings, batch.as_dict())  # a retried task after success

    assert (first["hashed"], first["embedded"]) == (3, 3) and (again["hashed"], again["embedded"]) == (0, 0)
    with crawl.engine.connect() as conn:
        assert dict(conn.execute(sa.text("SELECT sha256, vector FROM image_embeddings")).all()) == vectors
    assert dedup.plan_batches(settings, "crawl-1") == []


# --- how embedding pairs become clusters: attached under a guard, never chained -------------------
def unit(angle_degrees: float) -> np.ndarray:
    """A unit vector in a plane: the cosine of two of them is the cosine of their angle apart."""
    angle = np.radians(angle_degrees)
    return np.array([np.cos(angle), np.sin(angle), 0.0], dtype=np.float32)


def bits(*ranges: tuple[int, int]) -> int:
    """A 64-bit hash (signed, as stored) with the given bit ranges set."""
    value = sum(1 << k for start, stop in ranges for k in range(start, stop))
    return value - (1 << 64) if value >= 1 << 63 else value


Row = __import__("collections").namedtuple(
    "Row", "sha256 phash dhash width height first_seen_run created_at product_id")


def rows_of(images: dict[str, tuple[int, int]], pixels: dict[str, int]) -> list:
    return [Row(sha, phash, 0, pixels[sha], 1, 1, 0, 1) for sha, (phash, _) in sorted(images.items())]


def clusters_of(decided) -> set[frozenset]:
    by_cluster: dict[str, set] = {}
    for row in decided:
        by_cluster.setdefault(row.cluster_id, set()).add(row.sha256)
    return {frozenset(members) for members in by_cluster.values()}


def signals_for(rows, angles: dict[str, float], settings, thumbnails: dict | None = None) -> dedup.Signals:
    """The settings' embedding rule over planted vectors; with ``thumbnails`` (sha256 -> image) also
    its geometric check, else without it (these rows have no pixels)."""
    rule = similarity.EmbeddingRule(settings.dedup_embedding_min_cosine, settings.dedup_embedding_max_hash_distance,
                                    settings.dedup_embedding_max_attach,
                                    settings.dedup_embedding_min_alignment if thumbnails else None)
    vectors = np.stack([unit(angles[r.sha256]) for r in rows])
    stored = None if thumbnails is None else similarity.Thumbnails(
        alignment.thumbnail_of(thumbnails[r.sha256]) for r in rows)
    return dedup.Signals(rule, vectors, np.ones(len(rows), bool), stored)


def chain_of_three(settings):
    """a ~ b and b ~ c by the embedding rule (cosine halfway between the rule's minimum and 1,
    hashes 30 apart: beyond the hash rule, within the band), but a and c are two different photos
    (twice the angle: below the minimum cosine): a chain, not a cluster."""
    assert settings.dedup_threshold < 30 <= settings.dedup_embedding_max_hash_distance
    hashes = {"a": (0, 0), "b": (bits((0, 30)), 0), "c": (bits((15, 45)), 0)}
    step = float(np.degrees(np.arccos((1 + settings.dedup_embedding_min_cosine) / 2)))
    angles = {"a": 0.0, "b": step, "c": 2 * step}
    return hashes, angles


def test_an_embedding_chain_does_not_put_two_different_photos_in_one_cluster(settings):
    hashes, angles = chain_of_three(settings)
    rows = rows_of(hashes, {"a": 300, "b": 200, "c": 100})
    signals = signals_for(rows, angles, settings)
    assert signals.vectors[0] @ signals.vectors[2] < settings.dedup_embedding_min_cosine
    pair_counts: dict = {}

    decided, _ = dedup.assign_clusters(rows, {}, dedup.DuplicateRule(settings.dedup_threshold), True, signals,
                                       pair_counts)

    assert pair_counts == {"hash": 0, "embedding": 2}  # both links are found ...
    assert clusters_of(decided) == {frozenset("ab"), frozenset("c")}  # ... c fails against the representative a


def test_an_image_arriving_later_is_checked_against_the_clusters_representative_too(settings):
    hashes, angles = chain_of_three(settings)
    rows = rows_of(hashes, {"a": 300, "b": 200, "c": 100})
    signals = signals_for(rows, angles, settings)
    rule = dedup.DuplicateRule(settings.dedup_threshold)
    stored = {"a": ("a", None), "b": ("a", "a")}  # a and b clustered by an earlier night

    decided, queried = dedup.assign_clusters(rows, stored, rule, False, signals)

    assert queried == 1
    assert clusters_of(decided) == {frozenset("c")}  # c stays on its own; the stored cluster is untouched


def test_one_embedding_pair_does_not_merge_two_established_clusters(settings):
    """Two photos with three hash-identical copies each: one close embedding pair between them,
    even one whose representatives pass the rule, is not enough to merge clusters of more than
    ``dedup_embedding_max_attach`` images."""
    assert settings.dedup_embedding_max_attach < 4
    hashes = {f"{photo}{k}": (0 if photo == "a" else bits((0, 30)), 0) for photo in "ab" for k in range(4)}
    angles = {sha: 0.0 if sha[0] == "a" else 10.0 for sha in hashes}  # cosine 0.985
    rows = rows_of(hashes, {sha: 100 + k for k, sha in enumerate(sorted(hashes))})

    decided, _ = dedup.assign_clusters(rows, {}, dedup.DuplicateRule(settings.dedup_threshold), True,
                                       signals_for(rows, angles, settings))

    assert clusters_of(decided) == {frozenset(f"a{k}" for k in range(4)), frozenset(f"b{k}" for k in range(4))}
    # ... while a single copy of b (a re-upload) is attached to a's cluster
    single = {sha: hashes[sha] for sha in ("a0", "a1", "a2", "a3", "b0")}
    rows = rows_of(single, {sha: 100 + k for k, sha in enumerate(sorted(single))})
    decided, _ = dedup.assign_clusters(rows, {}, dedup.DuplicateRule(settings.dedup_threshold), True,
                                       signals_for(rows, angles, settings))
    assert clusters_of(decided) == {frozenset(single)}


def test_guarded_labels_attach_through_any_member_but_check_the_representative():
    from dataset.dedup.clusters import guarded_labels

    # 0-1-2 one cluster by trusted (hash) edges; 0 represents it (lowest priority). Extra edges:
    # 3 ~ 2 (a non-representative member) and 4 ~ 2; joins() accepts 3 with 0 but not 4 with 0.
    accepted = {frozenset((0, 3))}
    labels = guarded_labels(5, [0, 1], [1, 2], [2, 2], [3, 4], [0.95, 0.97], priority=[0, 1, 2, 3, 4],
                            joins=lambda a, b: frozenset((a, b)) in accepted, max_attach=3)
    assert labels[3] == labels[0] == labels[1] == labels[2]
    assert labels[4] != labels[0]


# --- the geometric check: a crop is the same pixels re-framed, another shot is not ------------------
def reframed(image: Image.Image, fraction: float = 0.08) -> Image.Image:
    """``fraction`` cut from the right and the bottom, scaled back to the original size (a slight stretch)."""
    w, h = image.size
    return image.crop((0, 0, round(w * (1 - fraction)), round(h * (1 - fraction)))).resize((w, h), Image.BICUBIC)


def test_crops_and_reframings_align_with_their_original_and_other_shots_of_the_product_do_not(settings):
    original, other = product_photos(5, 2)
    darker = ImageEnhance.Brightness(cropped(original, 0.10)).enhance(0.85)
    thumbnail = alignment.thumbnail_of
    check = settings.dedup_embedding_min_alignment

    for copy in (cropped(original, 0.06), cropped(original, 0.10), reframed(original), darker,
                 original.resize((160, 120))):
        assert alignment.aligned_correlation(thumbnail(original), thumbnail(copy)) >= check
    assert alignment.aligned_correlation(thumbnail(original), thumbnail(other)) < check


def two_images_the_embedding_cannot_tell_apart(settings):
    """Two images with the same vector (cosine 1) and hashes 30 apart (beyond the hash rule, within the band)."""
    assert settings.dedup_threshold < 30 <= settings.dedup_embedding_max_hash_distance
    hashes = {"a": (0, 0), "b": (bits((0, 30)), 0)}
    rows = rows_of(hashes, {"a": 300, "b": 200})
    return rows, {"a": 0.0, "b": 0.0}


def test_the_geometric_check_keeps_another_shot_of_the_product_out_and_lets_a_crop_in(settings):
    rows, angles = two_images_the_embedding_cannot_tell_apart(settings)
    original, other = product_photos(7, 2)
    rule = dedup.DuplicateRule(settings.dedup_threshold)

    another_shot, _ = dedup.assign_clusters(rows, {}, rule, True,
                                            signals_for(rows, angles, settings, {"a": original, "b": other}))
    a_crop, _ = dedup.assign_clusters(rows, {}, rule, True,
                                      signals_for(rows, angles, settings, {"a": original, "b": cropped(original)}))

    assert clusters_of(another_shot) == {frozenset("a"), frozenset("b")}
    assert clusters_of(a_crop) == {frozenset("ab")}


def test_an_image_without_a_thumbnail_is_not_attached_when_the_check_is_on(settings):
    rows, angles = two_images_the_embedding_cannot_tell_apart(settings)
    original = product_photos(7, 1)[0]
    signals = signals_for(rows, angles, settings, {"a": original, "b": cropped(original)})
    signals.thumbnails.items[1] = None  # e.g. a row of an older embedding version

    decided, _ = dedup.assign_clusters(rows, {}, dedup.DuplicateRule(settings.dedup_threshold), True, signals)

    assert clusters_of(decided) == {frozenset("a"), frozenset("b")}


def test_with_the_check_on_a_chain_of_crops_still_does_not_reach_past_the_representative(settings):
    """a ~ b ~ c as in :func:`chain_of_three`, every thumbnail a crop of one photo (all align): the
    check adds a condition, it does not replace the cosine and band against the representative."""
    hashes, angles = chain_of_three(settings)
    rows = rows_of(hashes, {"a": 300, "b": 200, "c": 100})
    original = product_photos(9, 1)[0]
    crops = {"a": original, "b": cropped(original, 0.05), "c": cropped(original, 0.10)}

    decided, _ = dedup.assign_clusters(rows, {}, dedup.DuplicateRule(settings.dedup_threshold), True,
                                       signals_for(rows, angles, settings, crops))

    assert clusters_of(decided) == {frozenset("ab"), frozenset("c")}
