"""The catalogue search index (issue 16 item 2): versioned in the object store with a
``search_indexes`` row per version, refreshed incrementally, and what ``search`` and ``serve``
answer from when no ``--index`` is given.

A real manifest and bucket hold drawn product photos (kept by the filter, as the stages would
write them) and a catalogue image; the embedding is the untrained baseline on a random-initialised
backbone at 32 px (fast and deterministic), products ranked by their best photo ("max")."""
from __future__ import annotations

import hashlib
import io
import os
import time
import json

import numpy as np
import pytest
import sqlalchemy as sa

from build_fixtures import ManifestWriter
from conftest import count_keras_builds
from drawn_products import SHAPES, drawn_photo
from modeling import catalogue_index
from shoplens.manifest import engine_for
from shoplens.store import ObjectStore
from shoplens.vision import embedding
from shoplens.vision.embedding import Embedder
from test_crawl import crawl_run, crawl_settings, replica  # noqa: F401 - the replica fixture


def _jpeg(img) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92)
    return out.getvalue()


@pytest.fixture
def settings(manifest_url, s3_settings, tmp_path):
    return s3_settings.with_overrides(
        manifest_url=manifest_url, model_init="random", search_image_size=32,
        search_aggregation="max", search_embed_batch=4, search_cache_dir=str(tmp_path / "cache"),
        search_reload_seconds=0.0)


@pytest.fixture
def shop(settings):
    """Products 1 and 2 with 3 kept photos each; product 1 also has its catalogue image."""
    writer = ManifestWriter(settings.manifest_url, settings, image_size=64)
    for pid in (1, 2):
        _add_product(writer, pid)
    _catalogue_image(writer, 1, drawn_photo(1, 9))
    return writer


def _add_product(writer, pid: int, photos=range(3)) -> list[str]:
    colour, shape = SHAPES[pid]
    writer.product(pid, name=f"{colour} {shape}")
    with writer.engine.begin() as conn:
        conn.execute(sa.text("UPDATE products SET price = :p WHERE id = :id"),
                     {"p": 1000 * pid, "id": pid})
    return [writer.photo(pid, data=_jpeg(drawn_photo(pid, v))) for v in photos]


def _catalogue_image(writer, pid: int, img) -> str:
    data = _jpeg(img)
    sha = hashlib.sha256(data).hexdigest()
    key, _ = writer.store.put_image(data, "jpeg", sha)
    with writer.engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO catalogue_images (product_id, sha256, object_key, source_url, size_bytes,"
            " width, height, format, run_id) VALUES (:p, :s, :k, :u, :n, 64, 64, 'jpeg', :r)"),
            {"p": pid, "s": sha, "k": key, "u": f"http://127.0.0.1:8612/catalogue/{pid}.jpg",
             "n": len(data), "r": writer.run_id})
    return sha


@pytest.fixture
def embedded(monkeypatch):
    """How many photos went through the embedder (every refresh's embedding passes here)."""
    seen = []
    real = Embedder.embed_decoded

    def counting(self, decoded, **kwargs):
        seen.append(len(decoded))
        return real(self, decoded, **kwargs)

    monkeypatch.setattr(Embedder, "embed_decoded", counting)
    return seen


def _rows(settings) -> dict:
    return {r["id"]: r for r in catalogue_index.list_indexes(settings)}


def _env(monkeypatch, settings):
    for key in ("manifest_url", "s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket",
                "model_init", "search_image_size", "search_aggregation", "search_cache_dir",
                "search_embed_batch"):
        monkeypatch.setenv(f"SHOPLENS_{key.upper()}", str(getattr(settings, key)))


def _search_cli(argv, monkeypatch, settings) -> tuple[int, list[dict], str]:
    from modeling.search import main

    _env(monkeypatch, settings)
    out, err = io.StringIO(), io.StringIO()
    code = main(argv, out=out, err=err)
    return code, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


# --- refresh ------------------------------------------------------------------------------------
def test_a_product_added_after_a_refresh_is_found_by_the_next_one_without_retraining(
        settings, shop, embedded, tmp_path, monkeypatch):
    first = catalogue_index.refresh(settings, run_key="night-1")
    assert first["mode"] == "full" and first["parent_id"] is None and first["model_id"] is None
    assert (first["products"], first["vectors"], first["embedded"]) == (2, 7, 7)
    assert sum(embedded) == 7

    _add_product(shop, 3)  # tonight's crawl, dedup and filter kept 3 photos of a new product
    embedded.clear()
    second = catalogue_index.refresh(settings, run_key="night-2")
    assert second["mode"] == "incremental" and second["parent_id"] == first["index_id"]
    assert (second["products"], second["vectors"]) == (3, 10)
    assert second["added_vectors"] == second["embedded"] == 3 and sum(embedded) == 3

    rows = _rows(settings)
    assert rows[second["index_id"]]["current"] and rows[second["index_id"]]["status"] == "complete"
    assert rows[second["index_id"]]["added_vectors"] == 3
    assert rows[second["index_id"]]["parent_id"] == first["index_id"]

    from shoplens import summary  # the night's run summary names the index it built

    with engine_for(settings.manifest_url).connect() as conn:
        night = summary.load(conn, "night-2")
    assert night.search["index_id"] == second["index_id"] and night.search["status"] == "complete"
    assert night.volume()["search.added_vectors"] == 3

    photo = tmp_path / "new-product.jpg"
    photo.write_bytes(_jpeg(drawn_photo(3, 1)))
    code, [line], _ = _search_cli([str(photo)], monkeypatch, settings)  # no --index: the current
    assert code == 0 and line["top"][0]["product_id"] == 3
    assert line["top"][0]["name"] == "green triangle"


def test_nothing_new_embeds_nothing_and_a_rejected_photo_leaves_without_reembedding(
        settings, shop, embedded):
    first = catalogue_index.refresh(settings)
    embedded.clear()
    again = catalogue_index.refresh(settings)
    assert (again["mode"], again["embedded"], again["added_vectors"], again["vectors"]) == \
        ("incremental", 0, 0, first["vectors"])
    kept = shop.engine.connect().execute(sa.text(
        "SELECT sha256 FROM kept_images WHERE product_id = 2 ORDER BY sha256")).scalars().all()
    shop.reject(kept[0])
    after = catalogue_index.refresh(settings)
    assert (after["removed_vectors"], after["embedded"], after["vectors"]) == \
        (1, 0, first["vectors"] - 1)
    assert sum(embedded) == 0


def test_a_new_source_with_bytes_already_indexed_reuses_their_vector(settings, shop, embedded):
    """Product 2's catalogue image turns out to be one of its review photos, byte for byte: the
    next refresh enrols it under its catalogue source with that photo's stored vector and
    embeds nothing."""
    first = catalogue_index.refresh(settings)
    embedded.clear()
    sha = _catalogue_image(shop, 2, drawn_photo(2, 0))  # the bytes of product 2's first photo
    night = catalogue_index.refresh(settings)
    assert (night["embedded"], night["reused_vectors"]) == (0, 1) and embedded == []
    assert night["vectors"] == first["vectors"] + 1
    index = _built(settings, night["index_id"])
    both = [v for s, v in zip(index.sources(), index._vectors) if s.endswith(sha)]  # noqa: SLF001
    assert len(both) == 2
    np.testing.assert_array_equal(both[0], both[1])
    assert index.vectors_by_sha(catalogue_index.source_sha, {sha, "f" * 64}).keys() == {sha}


def test_full_refresh_embeds_everything_again(settings, shop, embedded):
    catalogue_index.refresh(settings)
    embedded.clear()
    full = catalogue_index.refresh(settings, full=True)
    assert full["mode"] == "full" and full["parent_id"] is None
    assert full["embedded"] == full["vectors"] == 7 and sum(embedded) == 7


def test_a_refresh_splits_its_time_by_phase_and_builds_the_backbone_only_to_embed(
        settings, shop, monkeypatch):
    built = count_keras_builds(monkeypatch)
    first = catalogue_index.refresh(settings)
    phases = first["timings"]
    assert {"embedder", "manifest", "backbone", "embed", "calibration", "save", "upload",
            "other"} <= set(phases) and "parent" not in phases
    assert sum(phases.values()) == pytest.approx(first["seconds"], abs=0.01)
    assert len(built) == 1

    built.clear()
    again = catalogue_index.refresh(settings)  # nothing new: the parent, no network
    assert "parent" in again["timings"] and "backbone" not in again["timings"]
    assert "embed" not in again["timings"] and built == []

    _add_product(shop, 3)
    third = catalogue_index.refresh(settings)  # new photos: the frozen network is loaded
    assert third["embedded"] == 3 and {"parent", "backbone", "embed"} <= set(third["timings"])
    assert built == []  # the first refresh froze it into the cache: no Keras build again


def test_a_failed_refresh_is_marked_failed_and_the_current_index_is_unchanged(
        settings, shop, monkeypatch, tmp_path):
    from shoplens.store import ObjectStore

    first = catalogue_index.refresh(settings)
    _add_product(shop, 3)
    real_put = ObjectStore.put_bytes

    def put_failing_at_the_end(self, key, *args, **kwargs):
        if key.endswith("/index.json"):
            raise OSError("disk full")
        return real_put(self, key, *args, **kwargs)

    monkeypatch.setattr(ObjectStore, "put_bytes", put_failing_at_the_end)
    with pytest.raises(OSError, match="disk full"):
        catalogue_index.refresh(settings)
    monkeypatch.setattr(ObjectStore, "put_bytes", real_put)

    rows = _rows(settings)
    [failed] = [r for r in rows.values() if r["status"] == "failed"]
    assert "disk full" in failed["error"] and not failed["current"]
    assert catalogue_index.current_index_id(settings) == first["index_id"]
    photo = tmp_path / "p1.jpg"
    photo.write_bytes(_jpeg(drawn_photo(1, 0)))
    code, [line], _ = _search_cli([str(photo)], monkeypatch, settings)
    assert code == 0 and {h["product_id"] for h in line["top"]} == {1, 2}  # the first index

    retry = catalogue_index.refresh(settings)  # the next night extends the last complete one
    assert retry["parent_id"] == first["index_id"] and retry["embedded"] == 3


def test_the_threshold_is_recalibrated_by_leave_one_out_on_the_enrolled_photos(settings, shop):
    for pid in (3, 4):
        _add_product(shop, pid)
    stats = catalogue_index.refresh(settings)
    # 12 review photos of products that have another photo; the catalogue image is not a query.
    assert stats["calibration_queries"] == 12
    assert stats["threshold"] is not None
    row = _rows(settings)[stats["index_id"]]
    assert row["threshold"] == pytest.approx(stats["threshold"])  # the top-1 cut, for salvage
    # The confidence rule in force is saved with the index and judges its answers.
    assert stats["confidence_rule"] == settings.search_confidence_rule == "combined"
    saved = catalogue_index.download(settings, stats["index_id"], catalogue_index.cache_dir(settings))
    rule = json.loads((saved / "index.json").read_text())["threshold"]
    assert rule["rule"] == "combined" and rule["holdout"] == settings.search_calibration_holdout
    assert rule["threshold"] == pytest.approx(stats["threshold"])


def test_a_refresh_that_changes_no_vector_keeps_its_parents_threshold_without_calibrating(
        settings, shop, monkeypatch):
    """Nothing new and nothing gone, same settings: the calibration (deterministic) would pick
    the parent's threshold again, so it is not run and the threshold is the parent's. A photo
    added, a photo gone or a calibration setting changed runs it again."""
    from modeling.search_index import SearchIndex

    for pid in (3, 4):
        _add_product(shop, pid)
    first = catalogue_index.refresh(settings)
    runs = []
    real = SearchIndex.calibrate_leave_one_out
    monkeypatch.setattr(SearchIndex, "calibrate_leave_one_out",
                        lambda self, *a, **k: runs.append(1) or real(self, *a, **k))

    same = catalogue_index.refresh(settings)
    assert runs == [] and "calibration" not in same["timings"]
    assert (same["threshold"], same["calibration_queries"]) == (first["threshold"], 12)
    assert _built(settings, same["index_id"]).threshold == _built(settings,
                                                                  first["index_id"]).threshold
    full = catalogue_index.refresh(settings, full=True)  # calibrates: the same threshold
    assert runs == [1] and full["threshold"] == first["threshold"]

    stricter = catalogue_index.refresh(settings.with_overrides(search_target_precision=0.99))
    assert runs == [1, 1] and "calibration" in stricter["timings"]
    kept = shop.engine.connect().execute(sa.text(
        "SELECT sha256 FROM kept_images WHERE product_id = 3 ORDER BY sha256")).scalars().all()
    shop.reject(kept[0])
    gone = catalogue_index.refresh(settings)
    assert runs == [1, 1, 1] and gone["removed_vectors"] == 1
    shop.photo(4, data=_jpeg(drawn_photo(4, 7)))  # one more photo of product 4
    added = catalogue_index.refresh(settings)
    assert runs == [1, 1, 1, 1] and added["embedded"] == 1


def test_nightly_chunks_are_compacted_into_one_stored_chunk_that_readers_load_whole(
        settings, shop, monkeypatch):
    """With more nights' chunks than COMPACT_ABOVE_CHUNKS (here 2), the refresh stores the
    small ones rewritten as one chunk: a reader with an empty cache downloads one chunk and
    finds every photo; the night's cached copy holds only that chunk."""
    from modeling import search_index

    monkeypatch.setattr(search_index, "COMPACT_ABOVE_CHUNKS", 2)
    catalogue_index.refresh(settings)
    _add_product(shop, 3)
    second = catalogue_index.refresh(settings)
    assert len(_built(settings, second["index_id"])._chunks) == 2  # noqa: SLF001
    _add_product(shop, 4)
    third = catalogue_index.refresh(settings)

    reader = _built(settings, third["index_id"])
    assert len(reader._chunks) == 1 and len(reader) == third["vectors"] == 13  # noqa: SLF001
    full = catalogue_index.refresh(settings, full=True)
    assert sorted(reader.sources()) == sorted(_built(settings, full["index_id"]).sources())
    cached = catalogue_index.cache_dir(settings) / third["index_id"] / "chunks"
    assert len(list(cached.glob("*.npz"))) == 1


def _built(settings, index_id: str):
    """The stored version, read by a reader with an empty cache (what ``serve`` would load)."""
    from modeling.search_index import SearchIndex

    fresh_cache = catalogue_index.cache_dir(settings).with_name(f"reader-{index_id}")
    return SearchIndex.load(catalogue_index.download(settings, index_id, fresh_cache), settings)


def test_an_incremental_refresh_stores_the_same_index_as_a_full_rebuild(settings, shop):
    """Products, every source's vector and the threshold: the calibration sample (capped below
    the eligible photos here) is chosen by source, not by the order vectors were added in."""
    capped = settings.with_overrides(search_calibration_queries=10)
    _add_product(shop, 3, photos=range(6))
    catalogue_index.refresh(capped)
    _add_product(shop, 4, photos=range(4))  # 16 review photos can be queries now: 10 are
    incremental = catalogue_index.refresh(capped)
    full = catalogue_index.refresh(capped, full=True)
    assert (incremental["mode"], full["mode"]) == ("incremental", "full")
    assert incremental["calibration_queries"] == full["calibration_queries"] == 10
    assert incremental["threshold"] == full["threshold"] is not None
    a, b = _built(settings, incremental["index_id"]), _built(settings, full["index_id"])
    assert a.products == b.products and a.threshold == b.threshold
    assert sorted(a.sources()) == sorted(b.sources()) and len(a) == 17
    vectors_a, vectors_b = a.vectors_by_sha(str), b.vectors_by_sha(str)
    for source, vector in vectors_b.items():
        np.testing.assert_array_equal(vectors_a[source], vector, err_msg=source)
    photo = shop.engine.connect().execute(sa.text(
        "SELECT sha256 FROM kept_images WHERE product_id = 4 LIMIT 1")).scalar_one()
    assert a.search_vectors(vectors_b[photo], 3) == b.search_vectors(vectors_b[photo], 3)


def test_a_refresh_uploads_only_its_new_chunk_and_keeps_its_version_in_the_cache(
        settings, shop, monkeypatch):
    """The delta: the parent's chunks are neither re-uploaded nor re-hashed, the exact ANN is
    not stored (rebuilt from the chunks when loaded), and the version just built is the local
    cache's copy, so the next night reads its parent without downloading it."""
    from shoplens.store import ObjectStore

    first = catalogue_index.refresh(settings)
    _add_product(shop, 3)
    put, got = [], []
    real_put, real_get = ObjectStore.put_bytes, ObjectStore.get_bytes
    monkeypatch.setattr(ObjectStore, "put_bytes",
                        lambda self, key, *a, **k: put.append(key) or real_put(self, key, *a, **k))
    monkeypatch.setattr(ObjectStore, "get_bytes",
                        lambda self, key, *a, **k: got.append(key) or real_get(self, key, *a, **k))
    second = catalogue_index.refresh(settings)
    prefix = f"search-indexes/{second['index_id']}/"
    new_chunks = [k for k in put if k.startswith("search-indexes/chunks/")]
    assert len(new_chunks) == 1  # 3 new photos: one chunk; the parent's are not sent again
    assert not any(k.endswith(".faiss") for k in put)
    assert {k[len(prefix):] for k in put if k.startswith(prefix)} >= {"index.json", "products.json"}
    assert not any(k.startswith("search-indexes/") for k in got)  # the parent came from the cache
    assert (catalogue_index.cache_dir(settings) / second["index_id"] / "index.json").is_file()

    got.clear()
    third = catalogue_index.refresh(settings)  # nothing new: nothing read from the store at all
    assert third["parent_id"] == second["index_id"] and got == []
    stored = _built(settings, second["index_id"])  # a reader with an empty cache
    assert len(stored) == second["vectors"] and stored.config()["ann"] == "Flat"
    assert stored.product_count() == 3 and first["vectors"] + 3 == len(stored)


def test_a_damaged_frozen_network_is_made_again_and_one_the_converter_refuses_runs_on_keras(
        settings, tmp_path, monkeypatch, caplog):
    """The frozen network is an ONNX file: one damaged in the cache (a disk error, a copy cut
    short) is frozen again with the same features; where the converter cannot handle the
    backbone, the embedder runs the Keras network instead and says so, storing nothing."""
    photos = [drawn_photo(pid, v) for pid in (1, 2) for v in range(3)]
    folder = tmp_path / "networks"
    features = Embedder("efficientnet_lite0", 32, settings=settings).cache_network(
        folder).features_decoded(photos)
    (network,) = folder.glob(f"*{embedding.NETWORK_SUFFIX}")
    assert json.loads(network.with_suffix(".json").read_text())["format"] == "onnx"
    network.write_bytes(b"not a network")
    again = Embedder("efficientnet_lite0", 32, settings=settings).cache_network(folder)
    np.testing.assert_allclose(again.features_decoded(photos), features, rtol=1e-5,
                               atol=1e-6 * np.abs(features).max())
    assert network.read_bytes() != b"not a network"

    def refused(*args, **kwargs):
        raise ValueError("unsupported op")

    monkeypatch.setattr(embedding, "onnx_network", refused)
    keras_features = Embedder("efficientnet_lite0", 32, settings=settings).features_decoded(photos)
    fallback = Embedder("efficientnet_lite0", 32, settings=settings).cache_network(
        tmp_path / "refused")
    np.testing.assert_array_equal(fallback.features_decoded(photos), keras_features)
    assert not (tmp_path / "refused").exists() or not list((tmp_path / "refused").iterdir())
    assert "cannot be converted to ONNX" in caplog.text


def test_a_refresh_runs_the_frozen_network_unpadded_and_keras_pads_batch_work_to_one_shape(
        settings, shop, monkeypatch):
    """The refresh runs the frozen network on each flush as it is (no padded rows: the network is
    not traced per shape); the Keras network, traced once per batch shape, pads batch work to
    the fixed size; a single query is not padded."""
    shapes = []
    real = Embedder._network

    def recording(self):
        run = real(self)
        return lambda x: shapes.append(x.shape[0]) or run(x)

    monkeypatch.setattr(Embedder, "_network", recording)
    catalogue_index.refresh(settings)  # 7 photos in flushes of 4 and 3
    _add_product(shop, 3)
    catalogue_index.refresh(settings)  # 3 photos
    assert sorted(shapes) == [3, 3, 4]

    embedder = Embedder("efficientnet_lite0", 32, settings=settings)
    photos = [drawn_photo(1, v) for v in range(3)]
    shapes.clear()
    padded = embedder.embed_decoded(photos, fixed_batch=True)
    single = embedder.embed_decoded(photos[:1])
    assert shapes == [embedding._BATCH, 1]
    np.testing.assert_allclose(padded[:1], single, atol=1e-5)


def test_the_frozen_network_embeds_as_the_keras_one_and_is_made_once_per_network(
        settings, tmp_path, monkeypatch):
    """A process that embeds a few photos loads the network frozen by an earlier one instead of
    building Keras again; the features agree with the Keras network's within float noise and do
    not depend on the batch; another image size is another frozen network."""
    photos = [drawn_photo(pid, v) for pid in (1, 2) for v in range(3)]
    keras_features = Embedder("efficientnet_lite0", 32, settings=settings).features_decoded(photos)
    folder = tmp_path / "networks"
    first = Embedder("efficientnet_lite0", 32, settings=settings).cache_network(folder)
    frozen = first.features_decoded(photos, fixed_batch=True)
    np.testing.assert_allclose(frozen, keras_features, rtol=1e-4, atol=1e-4 * np.abs(
        keras_features).max())
    assert len(list(folder.glob(f"*{embedding.NETWORK_SUFFIX}"))) == 1

    built = count_keras_builds(monkeypatch)
    later = Embedder("efficientnet_lite0", 32, settings=settings).cache_network(folder)
    assert later.feature_dim == keras_features.shape[1] and built == []
    # Within float noise, not to the bit: a TensorFlow graph's kernels depended on the batch size
    # on an AMD EPYC (relative 4e-4 on these random-weight features, values near 1e-13); the
    # ONNX network has been equal to the bit there, but its kernels are chosen per CPU too.
    same = dict(rtol=1e-3, atol=1e-6 * np.abs(frozen).max())
    np.testing.assert_allclose(later.features_decoded(photos[:2], fixed_batch=True), frozen[:2],
                               **same)
    np.testing.assert_allclose(later.features_decoded(photos[2:5], fixed_batch=True), frozen[2:5],
                               **same)
    np.testing.assert_allclose(later.features_decoded(photos[5:]), frozen[5:], **same)  # alone
    assert built == []

    Embedder("efficientnet_lite0", 48, settings=settings).cache_network(folder).prepare_network()
    assert len(list(folder.glob(f"*{embedding.NETWORK_SUFFIX}"))) == 2 and len(built) == 1


def test_a_newly_promoted_embedding_model_gets_a_full_build(settings, shop, embedded, tmp_path):
    from modeling.registry import upload

    first = catalogue_index.refresh(settings)
    model_dir = Embedder("efficientnet_lite0", 32, settings=settings).save(tmp_path / "emb")
    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO models (id, dataset_version, profile, status, artifact_prefix, kind)"
            " VALUES ('e1', 'v0001', 'offline', 'complete', 'models/e1/', 'embedding')"))
        conn.execute(sa.text("INSERT INTO model_promotions (model_id, reason) VALUES ('e1', 'test')"))
    upload(settings, "e1", model_dir)
    embedded.clear()
    stats = catalogue_index.refresh(settings)
    assert stats["mode"] == "full" and stats["model_id"] == "e1" and stats["parent_id"] is None
    assert stats["embedded"] == 7 and sum(embedded) == 7
    again = catalogue_index.refresh(settings)
    assert again["mode"] == "incremental" and again["parent_id"] == stats["index_id"]
    assert first["index_id"] != stats["index_id"]


def test_a_product_newly_ranked_in_the_replica_is_searchable_after_the_next_crawl_and_refresh(
        replica, s3_settings, manifest_url, tmp_path, monkeypatch, embedded):
    """The real crawl of the replica shop stores each ranked product's catalogue image; a product
    that enters the best-N the next night is enrolled by it (before any review photo of it is
    kept) and found by it, with only the new catalogue images embedded."""
    shop = replica([3, 3, 3, 3])
    settings = crawl_settings(shop, s3_settings, manifest_url, best_n=2).with_overrides(
        model_init="random", search_image_size=32, search_aggregation="max",
        search_cache_dir=str(tmp_path / "cache"))
    crawl_run(settings, "night-1")
    first = catalogue_index.refresh(settings, "night-1")
    with engine_for(manifest_url).connect() as conn:
        before = dict(conn.execute(sa.text("SELECT product_id, object_key FROM catalogue_images")).all())
    assert first["products"] == len(before) == 2 and first["embedded"] == 2

    tonight = settings.with_overrides(best_n=3)
    crawl_run(tonight, "night-2")
    with engine_for(manifest_url).connect() as conn:
        after = dict(conn.execute(sa.text("SELECT product_id, object_key FROM catalogue_images")).all())
    [new_product] = set(after) - set(before)
    embedded.clear()
    second = catalogue_index.refresh(tonight, "night-2")
    assert second["mode"] == "incremental" and second["embedded"] == 1 and sum(embedded) == 1
    photo = tmp_path / "catalogue.jpg"
    photo.write_bytes(ObjectStore(settings).get_bytes(after[new_product]))
    code, [line], _ = _search_cli([str(photo)], monkeypatch, tonight)
    assert code == 0 and line["top"][0]["product_id"] == new_product


# --- retention ------------------------------------------------------------------------------------
def _stored(settings, prefix: str) -> set[str]:
    return set(ObjectStore(settings).list_keys(prefix))


def test_refreshes_keep_the_newest_versions_and_prune_the_rest_with_their_unlisted_chunks(
        settings, shop, tmp_path):
    """Each night adds a version; with search_keep_versions = 2 the third refresh marks the
    first 'pruned' and deletes its files and the chunks no kept version lists, while both kept
    versions still load whole from the store into an empty cache."""
    from modeling.search_index import SearchIndex

    kept2 = settings.with_overrides(search_keep_versions=2)
    first = catalogue_index.refresh(kept2)
    _add_product(shop, 3)
    second = catalogue_index.refresh(kept2)
    kept = shop.engine.connect().execute(sa.text(
        "SELECT sha256 FROM kept_images WHERE product_id = 2 ORDER BY sha256")).scalars().all()
    shop.reject(kept[0])  # the vectors are copied into a new chunk: the first one is unlisted
    third = catalogue_index.refresh(kept2)
    assert third["pruned"]["pruned"] == [first["index_id"]]

    statuses = {r["id"]: r["status"] for r in catalogue_index.list_indexes(settings)}
    assert statuses == {first["index_id"]: "pruned", second["index_id"]: "complete",
                        third["index_id"]: "complete"}
    assert _stored(settings, f"search-indexes/{first['index_id']}/") == set()
    listed = set()
    for built in (second, third):
        fresh = catalogue_index.download(settings, built["index_id"], tmp_path / built["index_id"])
        listed.update(json.loads((fresh / "index.json").read_text())["chunks"])
        assert len(SearchIndex.load(fresh, settings)) == built["vectors"]
    assert {k.rsplit("/", 1)[1] for k in _stored(settings, catalogue_index.CHUNK_PREFIX)} == listed
    assert not (tmp_path / "cache" / first["index_id"]).exists()


def test_pruning_leaves_chunks_alone_while_a_build_is_in_progress_and_finishes_later(
        settings, shop):
    first = catalogue_index.refresh(settings)
    kept = shop.engine.connect().execute(sa.text(
        "SELECT sha256 FROM kept_images WHERE product_id = 2 ORDER BY sha256")).scalars().all()
    shop.reject(kept[0])
    second = catalogue_index.refresh(settings)  # vectors copied to a new chunk: the first's unlisted
    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(sa.text("INSERT INTO search_indexes (id, status, artifact_prefix) "
                             "VALUES ('in-progress', 'building', 'search-indexes/in-progress/')"))
    chunks_before = _stored(settings, catalogue_index.CHUNK_PREFIX)

    during = catalogue_index.prune(settings, keep=1)
    assert during["pruned"] == [first["index_id"]]
    assert during["chunks_skipped"] == "1 index build(s) in progress"
    assert _stored(settings, catalogue_index.CHUNK_PREFIX) == chunks_before
    assert _stored(settings, f"search-indexes/{first['index_id']}/") == set()

    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(sa.text("UPDATE search_indexes SET status = 'failed' WHERE id = 'in-progress'"))
    after = catalogue_index.prune(settings, keep=1)
    assert after["pruned"] == [] and after["chunks_skipped"] is None
    assert catalogue_index.current_index_id(settings) == second["index_id"]
    assert _stored(settings, catalogue_index.CHUNK_PREFIX) < chunks_before
    assert catalogue_index.prune(settings, keep=1)["removed_chunks"] == 0  # idempotent


def _age(path, days: float) -> None:
    then = time.time() - days * 86400
    os.utime(path, (then, then))


def test_frozen_networks_unused_for_two_weeks_leave_the_cache_with_their_leftovers(tmp_path):
    """A network's metadata goes with its network file, whose modification time is its last use;
    what an interrupted freeze left is deleted once as old; the rest stays."""
    from shoplens.vision.embedding import prune_frozen_networks

    folder = tmp_path / "networks"
    folder.mkdir()
    files = {name: folder / name for name in (
        "lite0-224-old.onnx", "lite0-224-old.json",          # unused for 20 days
        "lite0-224-used.onnx", "lite0-224-used.json",        # loaded yesterday
        ".lite0-224-crash.json.123", "lite0-224-crash.json",     # a freeze that died: old
        ".lite0-224-writing.onnx.456")}                      # a freeze under way
    for path in files.values():
        path.write_bytes(b"x")
    for name in ("lite0-224-old.onnx", "lite0-224-old.json", "lite0-224-used.json",
                 ".lite0-224-crash.json.123", "lite0-224-crash.json"):
        _age(files[name], 20)
    _age(files["lite0-224-used.onnx"], 1)

    assert prune_frozen_networks(folder) == [
        ".lite0-224-crash.json.123", "lite0-224-crash.json", "lite0-224-old.json",
        "lite0-224-old.onnx"]
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lite0-224-writing.onnx.456", "lite0-224-used.json", "lite0-224-used.onnx"]
    assert prune_frozen_networks(folder) == []
    assert prune_frozen_networks(tmp_path / "never-made") == []


def test_a_refresh_marks_the_network_it_loads_as_used_and_prunes_those_left_unused(
        settings, shop, tmp_path):
    """After a TensorFlow upgrade the old frozen network is never loaded again: the refresh's
    retention deletes it two weeks on, while the network it has just loaded stays, however
    old its file was."""
    catalogue_index.refresh(settings)
    networks = tmp_path / "cache" / catalogue_index.NETWORK_CACHE
    ours = sorted(p.name for p in networks.iterdir())
    for path in networks.iterdir():
        _age(path, 30)
    for name in ("lite0-224-before-upgrade.graph.pb", "lite0-224-before-upgrade.json"):
        (networks / name).write_bytes(b"x")
        _age(networks / name, 15)

    _add_product(shop, 3)
    night = catalogue_index.refresh(settings)  # new photos: the network is loaded
    assert night["embedded"] == 3 and night["pruned"]["removed_network_files"] == 2
    assert sorted(p.name for p in networks.iterdir()) == ours


def test_the_prune_command_reports_what_it_removed_and_refuses_to_keep_nothing(
        settings, shop, monkeypatch, capsys):
    from shoplens import cli

    _env(monkeypatch, settings)
    monkeypatch.setenv("SHOPLENS_PROGRESS", "off")
    catalogue_index.refresh(settings)
    newest = catalogue_index.refresh(settings)
    assert cli.main(["index", "prune", "--keep", "0"]) == 2
    assert "--keep must be >= 1" in capsys.readouterr().err
    assert cli.main(["index", "prune", "--keep", "1"]) == 0
    assert capsys.readouterr().out.startswith("kept 1 search index version(s); pruned 1")
    assert catalogue_index.current_index_id(settings) == newest["index_id"]


# --- the commands ---------------------------------------------------------------------------------
def test_index_refresh_and_list_commands(settings, shop, monkeypatch, capsys):
    from shoplens import cli

    _env(monkeypatch, settings)
    monkeypatch.setenv("SHOPLENS_PROGRESS", "off")
    assert cli.main(["index", "list"]) == 0
    assert "no search index yet" in capsys.readouterr().err
    assert cli.main(["index", "refresh", "--json"]) == 0
    built = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert built["vectors"] == 7
    assert cli.main(["index", "list", "--json"]) == 0
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["id"] == built["index_id"] and row["current"] and row["status"] == "complete"
    assert cli.main(["index", "list"]) == 0
    assert capsys.readouterr().out.startswith(f"* {built['index_id']}  complete 2 products, 7 vectors")


def test_search_without_an_index_says_there_is_none_yet(settings, tmp_path, monkeypatch):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(_jpeg(drawn_photo(1, 0)))
    code, lines, err = _search_cli([str(photo)], monkeypatch, settings)
    assert code == 2 and lines == [] and "no search index yet" in err


# --- the service ----------------------------------------------------------------------------------
def test_queries_embed_with_the_network_the_refresh_froze_and_never_build_keras(
        settings, shop, monkeypatch):
    """The service, the search and identify commands load the index for queries with its
    embedder on the frozen network the refresh left in the index cache: answering a photo
    builds no Keras network (about 1.5 s per process or reload otherwise)."""
    from modeling.search_service import CurrentIndexHolder

    catalogue_index.refresh(settings)
    built = count_keras_builds(monkeypatch)
    index = CurrentIndexHolder(settings, reload_seconds=0).current()
    vector = index.embedder.embed_decoded([drawn_photo(1, 0)])[0]
    assert index.answer(vector, 1)["top"][0]["product_id"] == 1
    assert built == []
    assert list((catalogue_index.cache_dir(settings) / catalogue_index.NETWORK_CACHE).glob(
        f"*{embedding.NETWORK_SUFFIX}"))


def test_serve_answers_from_the_current_index_and_picks_up_a_newer_one(settings, shop):
    from fastapi.testclient import TestClient

    from modeling.search_service import CurrentIndexHolder, create_app

    first = catalogue_index.refresh(settings)
    holder = CurrentIndexHolder(settings, reload_seconds=0)
    with TestClient(create_app(holder, settings)) as client:
        def search(pid, variant):
            response = client.post("/search", files={"photo": ("p.jpg", _jpeg(drawn_photo(pid, variant)),
                                                                "image/jpeg")})
            assert response.status_code == 200, response.text
            return response.json()

        body = search(1, 2)
        assert body["index"]["id"] == first["index_id"]
        best = body["top"][0]
        assert best["product_id"] == 1 and best["name"] == "red ellipse" and best["price"] == 1000
        assert best["url"].endswith("/productions/1/selling")
        assert best["thumbnail_url"] == "thumbnails/1"
        thumb = client.get("/" + best["thumbnail_url"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.content[:2] == b"\xff\xd8"
        assert client.get("/thumbnails/2").status_code == 404  # no catalogue image

        _add_product(shop, 3)
        second = catalogue_index.refresh(settings)
        body = search(3, 0)
        assert body["index"]["id"] == second["index_id"] and body["top"][0]["product_id"] == 3


def test_identify_over_the_shop_index_matches_a_detected_chair_only_among_chair_categories(
        settings, shop, tmp_path):
    """The nightly index records each product's shop category, so ``identify`` (without
    ``--gallery``: the current index) applies ``identify_category_classes``: a detected chair is
    never matched to a product whose category is mapped to another class, even the one the photo
    shows; an unmapped category matches any object."""
    from modeling.identify_cli import main as identify_main
    from shoplens.vision.detector import Box

    shop.product(3, category_id="sofas", name="green triangle sofa")
    for v in range(3):
        shop.photo(3, data=_jpeg(drawn_photo(3, v)))
    shop.product(4, category_id="lamps", name="orange ellipse lamp")
    shop.photo(4, data=_jpeg(drawn_photo(4, 0)))
    built = catalogue_index.refresh(settings)
    index_dir = catalogue_index.download(settings, built["index_id"],
                                         catalogue_index.cache_dir(settings))
    details = json.loads((index_dir / "products.json").read_text())
    assert {p["product_id"]: p["category"] for p in details} == {
        1: "10120000", 2: "10120000", 3: "sofas", 4: "lamps"}
    assert {p["category_name"] for p in details} == {"10120000", "sofas", "lamps"}

    photo = tmp_path / "sofa.jpg"
    photo.write_bytes(_jpeg(drawn_photo(3, 1)))
    mapped = settings.with_overrides(identify_category_classes={"10120000": "chair",
                                                                "sofas": "couch"})

    def identify(detected):
        class Stub:
            def detect(self, image, original_size=None):
                return detected

        out, err = io.StringIO(), io.StringIO()
        assert identify_main([str(photo)], out=out, err=err, settings=mapped,
                             detector=Stub()) == 0, err.getvalue()
        [line] = [json.loads(x) for x in out.getvalue().splitlines()]
        [obj] = line["objects"]
        return [t["product_id"] for t in obj["top"]]

    # Nothing detected: the whole photo, over every product, finds the sofa it shows first.
    assert identify([])[0] == 3
    # Detected as a chair: chairs (category 10120000) and the unmapped lamp only.
    assert set(identify([Box("chair", 0.9, 0.0, 0.0, 64.0, 64.0)])) == {1, 2, 4}
    assert set(identify([Box("couch", 0.9, 0.0, 0.0, 64.0, 64.0)])) == {3, 4}


def test_the_demo_ends_with_one_example_search_and_a_copy_of_the_index(
        settings, shop, monkeypatch, tmp_path, capsys):
    from shoplens.dev.demo import _example_search

    built = catalogue_index.refresh(settings)
    _env(monkeypatch, settings)
    monkeypatch.setenv("SHOPLENS_PROGRESS", "off")
    _example_search(tmp_path)
    out = capsys.readouterr().out
    assert f"[demo] search index {built['index_id']}: a kept photo of product" in out
    ranked = [line.split()[:2] for line in out.splitlines() if line.startswith("   ")]
    assert [rank for rank, _ in ranked] == ["1.", "2."]  # two products enrolled: top-3 has two
    # The query is a kept photo of the product ranked first.
    assert out.split("a kept photo of product ")[1].split()[0] == ranked[0][1]
    assert (tmp_path / "search-index" / "index.json").is_file()


def test_serve_without_an_index_says_there_is_none_yet_or_that_the_manifest_is_down(
        settings, monkeypatch, capsys):
    from modeling.search_service import main

    _env(monkeypatch, settings)
    assert main(["--port", "1"]) == 2
    assert "no search index yet" in capsys.readouterr().err
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", "postgresql+psycopg2://nobody@127.0.0.1:9/x")
    assert main(["--port", "1"]) == 3
    assert "manifest is unreachable" in capsys.readouterr().err
