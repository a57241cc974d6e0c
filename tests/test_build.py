"""The dataset build against a real PostgreSQL manifest and a real S3 store (SeaweedFS)."""
from __future__ import annotations

import hashlib
import io
import json
import uuid

import pyarrow.parquet as pq
import pytest
import sqlalchemy as sa

from build_fixtures import ManifestWriter, migrate_for_build
from conftest import _admin_engine, PG_SERVER
from dataset.build import stage as build
from dataset.build import checks, export
from dataset.build.diff import diff_versions
from shoplens import export_layout as layout
from shoplens.export_layout import DatasetError, materialise, read_shard
from shoplens.lineage import LineageError, lineage
from shoplens.manifest import engine_for
from shoplens.store import ObjectStore


@pytest.fixture
def env(fresh_database, s3_settings):
    migrate_for_build(fresh_database)
    settings = s3_settings.with_overrides(
        manifest_url=fresh_database, dataset_min_photos_per_product=3,
        dataset_max_photos_per_product=10, dataset_images_per_shard=4)
    return settings, ManifestWriter(fresh_database, settings)


@pytest.fixture
def second_env(s3_settings):
    """Another manifest database and bucket, for builds that must not share state."""
    name = f"shoplens_test_{uuid.uuid4().hex[:10]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_SERVER}/{name}"
    migrate_for_build(url)
    settings = s3_settings.with_overrides(
        manifest_url=url, s3_bucket=f"t-{uuid.uuid4().hex[:12]}",
        dataset_min_photos_per_product=3, dataset_max_photos_per_product=10,
        dataset_images_per_shard=4)
    ObjectStore(settings).ensure_bucket()
    yield settings, ManifestWriter(url, settings)
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def populate(writer: ManifestWriter) -> dict[str, list[str]]:
    """Three products that qualify, one with too few photos, one capped, plus rejected,
    overridden and near-duplicate photos that must stay out."""
    photos: dict[str, list[str]] = {}
    for product_id, count in ((101, 8), (102, 7), (103, 6), (104, 2), (105, 14)):
        writer.product(product_id, name=f"product {product_id}")
        photos[str(product_id)] = writer.photos(product_id, count)
    photos["rejected"] = [writer.photo(101, passed=False) for _ in range(2)]
    photos["force_kept"] = [writer.photo(102, passed=False, override="keep")]
    photos["force_rejected"] = [writer.photo(103, override="reject")]
    photos["duplicates"] = [writer.photo(101, cluster_of=photos["101"][0]),
                            writer.photo(102, cluster_of=photos["102"][0])]
    return photos


def stored_files(settings, version_id: str) -> dict[str, bytes]:
    store = ObjectStore(settings)
    prefix = export.version_prefix(version_id)
    return {k[len(prefix):]: store.get_bytes(k) for k in store.list_keys(prefix)}


def members(settings, version_id: str) -> dict[str, tuple[int, str]]:
    with engine_for(settings.manifest_url).connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT sha256, label, split FROM dataset_members WHERE version_id = :v"),
            {"v": version_id}).all()
    return {s.strip(): (label, split) for s, label, split in rows}


def parse_shards(tmp_path, files: dict[str, bytes]) -> list[dict]:
    out = []
    for name, data in sorted(files.items()):
        if not name.startswith("tfrecords/"):
            continue
        path = tmp_path / name.replace("/", "_")
        path.write_bytes(data)
        for encoded, sha256, label in read_shard(path):
            out.append({"shard": name, "split": name.split("/")[1].split("-")[0],
                        "encoded": encoded, "sha256": sha256, "label": label})
    return out


def test_a_build_exports_the_contract_layout(env, tmp_path):
    settings, writer = env
    photos = populate(writer)

    stats = build.run(settings, "run-1")

    assert stats["version_id"] == "v0001" and stats["parent_version"] is None
    assert stats["uri"] == f"s3://{settings.s3_bucket}/datasets/v0001/"
    assert stats["excluded_products"] == [{"product_id": 104, "photos": 2}]
    assert stats["capped_products"] == [{"product_id": 105, "photos": 14, "selected": 10}]
    # 8 + (7 + 1 force-kept) + 6 + capped 10; rejected, force-rejected and duplicates stay out
    assert stats["counts"]["images"] == 32
    assert stats["counts"]["labels"] == 4

    files = stored_files(settings, "v0001")
    table = pq.read_table(io.BytesIO(files["manifest.parquet"]))
    assert table.schema.names == ["sha256", "object_key", "label", "product_id", "product_name",
                                  "category_id", "split", "review_id", "source_url", "crawl_run",
                                  "width", "height", "format"]
    assert str(table.schema.field("label").type) == "int32"
    assert str(table.schema.field("product_id").type) == "int64"
    rows = table.to_pylist()
    order = {"train": 0, "val": 1, "test": 2}
    assert rows == sorted(rows, key=lambda r: (order[r["split"]], r["label"], r["sha256"]))
    shas = {r["sha256"] for r in rows}
    assert set(photos["force_kept"]) <= shas
    assert not shas & set(photos["rejected"] + photos["force_rejected"] + photos["duplicates"]
                          + photos["104"])
    assert {r["product_id"]: r["label"] for r in rows} == {101: 0, 102: 1, 103: 2, 105: 3}

    labels = json.loads(files["labels.json"])
    assert labels["num_classes"] == 4
    assert [entry["product_id"] for entry in labels["labels"]] == [101, 102, 103, 105]

    version = json.loads(files["version.json"])
    assert version["version_id"] == "v0001" and version["parent_version"] is None
    assert version["content_hash"] == stats["content_hash"]
    assert version["params"]["build"]["min_photos_per_product"] == 3
    assert version["params"]["filter_run"]["rule_version"] == "rules-test"
    assert version["code_version"].startswith("git:")
    for name, digest in version["files"].items():
        assert hashlib.sha256(files[name]).hexdigest() == digest["sha256"]
    assert set(files) == set(version["files"]) | {"version.json"}

    records = parse_shards(tmp_path, files)
    by_sha = {r["sha256"]: r for r in rows}
    assert sorted(r["sha256"] for r in records) == sorted(by_sha)
    store = ObjectStore(settings)
    for rec in records:
        row = by_sha[rec["sha256"]]
        assert rec["label"] == row["label"] and rec["split"] == row["split"]
        assert rec["encoded"] == store.get_bytes(row["object_key"])
    shard_names = sorted({r["shard"] for r in records})
    train_count = sum(1 for r in rows if r["split"] == "train")
    n_train = -(-train_count // 4)
    assert f"tfrecords/train-00000-of-{n_train:05d}.tfrecord" in shard_names


def test_two_builds_from_the_same_manifest_are_byte_identical(env, second_env):
    outputs = []
    for settings, writer in (env, second_env):
        populate(writer)
        stats = build.run(settings, "nightly-1")
        outputs.append((stats, stored_files(settings, stats["version_id"])))
    (stats_a, files_a), (stats_b, files_b) = outputs

    assert stats_a["content_hash"] == stats_b["content_hash"]
    assert set(files_a) == set(files_b)
    for name in files_a:
        if name != "version.json":
            assert files_a[name] == files_b[name], name
    version_a, version_b = (json.loads(f["version.json"]) for f in (files_a, files_b))
    for volatile in ("created_at", "uri"):  # when it was built and into which bucket
        version_a.pop(volatile), version_b.pop(volatile)
    assert version_a == version_b


def test_rebuilding_an_unchanged_manifest_makes_no_new_version_and_rematerialises_exactly(env, tmp_path):
    settings, writer = env
    populate(writer)
    first = build.run(settings, "run-1")

    again = build.run(settings, "run-2")

    assert again["unchanged"] and again["version_id"] == first["version_id"]
    assert export.verify_export(settings, "v0001") == []
    rebuilt = export.rematerialise(settings, "v0001", tmp_path / "re")
    stored = stored_files(settings, "v0001")
    for name in rebuilt:
        assert (tmp_path / "re" / name).read_bytes() == stored[name], name
    # a changed byte in the store is noticed
    ObjectStore(settings).put_bytes("datasets/v0001/labels.json", b"{}")
    assert export.verify_export(settings, "v0001") == [
        "labels.json: stored bytes differ from the manifest's"]


def test_a_new_crawl_keeps_every_label_and_split_and_diff_reports_exactly_the_additions(env):
    settings, writer = env
    populate(writer)
    build.run(settings, "run-1")
    before = members(settings, "v0001")

    writer.crawl_run("crawl-2")
    added = writer.photos(101, 2) + writer.photos(103, 3)
    for product_id in (107, 106):
        writer.product(product_id, category_id="16220000")
        added += writer.photos(product_id, 4)
    stats = build.run(settings, "run-2")

    after = members(settings, "v0002")
    assert stats["version_id"] == "v0002" and stats["parent_version"] == "v0001"
    assert {s: after[s] for s in before} == before
    assert set(after) - set(before) == set(added)

    d = diff_versions(settings, "v0001", "v0002")
    assert sorted(d["images_added"]) == sorted(added)
    assert d["images_removed"] == [] and d["relabelled"] == [] and d["moved"] == []
    assert d["products_added"] == [{"label": 4, "product_id": 106, "name": "product 106"},
                                   {"label": 5, "product_id": 107, "name": "product 107"}]
    assert d["products_dropped"] == []
    assert {c["product_id"]: c["delta"] for c in d["label_count_changes"]} == {
        101: 2, 103: 3, 106: 4, 107: 4}


def test_a_dropped_product_keeps_its_label_reserved(env):
    settings, writer = env
    photos = populate(writer)
    build.run(settings, "run-1")

    for sha in photos["103"][:4]:  # a later filter run rejects most of product 103's photos
        writer.reject(sha)
    writer.product(108)
    writer.photos(108, 3)
    stats = build.run(settings, "run-2")

    assert {"product_id": 103, "photos": 2} in stats["excluded_products"]
    d = diff_versions(settings, "v0001", "v0002")
    assert d["products_dropped"] == [{"label": 2, "product_id": 103, "name": "product 103"}]
    assert d["products_added"] == [{"label": 4, "product_id": 108, "name": "product 108"}]
    assert sorted(d["images_removed"]) == sorted(photos["103"])


def test_near_duplicate_clusters_stay_in_one_split_across_versions(env):
    settings, writer = env
    reps, dups = [], []
    for product_id in (201, 202, 203):
        writer.product(product_id)
        for _ in range(8):
            rep = writer.photo(product_id)
            reps.append(rep)
            dups.append([writer.photo(product_id, cluster_of=rep) for _ in range(2)])
    build.run(settings, "run-1")

    # dedup re-runs and picks another member as representative of every cluster
    for rep, cluster in zip(reps, dups):
        writer.make_representative(cluster[0], rep)
    stats = build.run(settings, "run-2")

    assert stats["counts"]["images_following_cluster"] == len(reps)
    with engine_for(settings.manifest_url).connect() as conn:
        spanning = conn.execute(sa.text("""
            SELECT d.cluster_id, array_agg(DISTINCT m.split)
            FROM dataset_members m JOIN image_dedup d ON d.sha256 = m.sha256
            GROUP BY d.cluster_id HAVING count(DISTINCT m.split) > 1""")).all()
        leakage_view = conn.execute(sa.text("SELECT count(*) FROM dataset_split_leakage")).scalar()
    assert spanning == [] and leakage_view == 0
    assert set(members(settings, "v0002").values()) >= {(0, "train"), (0, "val"), (0, "test")}


def test_quality_checks_catch_planted_leakage_and_a_label_without_train_photos(env):
    settings, writer = env
    populate(writer)
    build.run(settings, "run-1")
    assert all(r.passed for r in checks.run_sql_checks(settings, "v0001"))

    with engine_for(settings.manifest_url).begin() as conn:
        # plant a near-copy of a train photo in test, and move all of label 2 out of train
        conn.execute(sa.text("""
            UPDATE dataset_members SET cluster_id = (
                SELECT cluster_id FROM dataset_members WHERE version_id = 'v0001'
                AND split = 'train' ORDER BY sha256 LIMIT 1)
            WHERE sha256 = (SELECT sha256 FROM dataset_members WHERE version_id = 'v0001'
                            AND split = 'test' ORDER BY sha256 LIMIT 1)"""))
        conn.execute(sa.text(
            "UPDATE dataset_members SET split = 'val' WHERE label = 2 AND split = 'train'"))

    failed = {r.name for r in checks.run_sql_checks(settings, "v0001") if not r.passed}
    assert failed == {"no_cluster_spans_two_splits", "every_label_has_a_train_photo"}


def test_a_missing_object_fails_the_build_and_publishes_nothing(env):
    settings, writer = env
    photos = populate(writer)
    store = ObjectStore(settings)
    with engine_for(settings.manifest_url).connect() as conn:
        lost_key = conn.execute(sa.text("SELECT object_key FROM images WHERE sha256 = :s"),
                                {"s": photos["101"][3]}).scalar_one()
    lost_bytes = store.get_bytes(lost_key)
    store.remove(lost_key)

    with pytest.raises(checks.DataQualityError, match="1 member object"):
        build.run(settings, "run-1")

    with engine_for(settings.manifest_url).connect() as conn:
        status, error = conn.execute(sa.text(
            "SELECT status, error FROM dataset_versions WHERE version_id = 'v0001'")).one()
    assert status == "failed" and lost_key in error
    assert list(store.list_keys("datasets/")) == []
    assert build.latest_version_id(settings) is None

    store.put_bytes(lost_key, lost_bytes)
    stats = build.run(settings, "run-1")  # the retried task
    assert stats["version_id"] == "v0002" and stats["parent_version"] is None
    assert build.run(settings, "run-1")["reused"] is True


def test_a_build_on_a_manifest_no_migration_has_run_on_says_to_migrate(fresh_database, s3_settings):
    """An un-migrated manifest is a one-line BuildError naming the fix, not a missing-table crash."""
    settings = s3_settings.with_overrides(manifest_url=fresh_database)
    with pytest.raises(build.BuildError, match="never migrated.*apply the migrations"):
        build.run(settings, "run-1")


def test_lineage_goes_back_to_the_source_and_forward_to_models(env, tmp_path):
    settings, writer = env
    photos = populate(writer)
    build.run(settings, "run-1")
    sha = photos["102"][0]

    story = lineage(settings, sha[:12])

    assert story["sha256"] == sha
    assert [(v["version_id"], v["label"]) for v in story["versions"]] == [("v0001", 1)]
    assert story["image"]["source_url"].startswith("http://127.0.0.1:8612/reviews/")
    assert story["review"]["id"] == story["image"]["review_id"]
    assert story["product"]["id"] == 102
    assert story["crawl_run"]["run_key"] == "crawl-1"
    assert sorted(d["rule"] for d in story["rule_decisions"]) == [
        "min_side", "product_occupancy", "single_product"]
    assert story["verdict"]["verdict"] == "keep"
    assert story["models"] == []  # nothing trained yet

    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO models (id, dataset_version, profile, artifact_prefix, status)"
            " VALUES ('m-1', 'v0001', 'fast', 'models/m-1/', 'complete'),"
            "        ('m-other', 'v0099', 'fast', 'models/m-other/', 'complete')"))
    assert [m["id"] for m in lineage(settings, sha)["models"]] == ["m-1"]
    with pytest.raises(LineageError, match="not in version v0009"):
        lineage(settings, sha, version="v0009")

    local = materialise(settings, "v0001", tmp_path / "v0001")
    stored = stored_files(settings, "v0001")
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == sorted(stored)


def test_a_crash_during_export_leaves_a_failed_version_and_no_files(env, monkeypatch):
    settings, writer = env
    populate(writer)
    real_finish = export.finish_export

    def finish_then_crash(settings_, version_id):
        real_finish(settings_, version_id)  # every file written, then the worker dies
        raise RuntimeError("worker lost before marking the version complete")

    monkeypatch.setattr(export, "finish_export", finish_then_crash)
    with pytest.raises(RuntimeError, match="worker lost"):
        build.run(settings, "run-1")
    monkeypatch.setattr(export, "finish_export", real_finish)

    assert list(ObjectStore(settings).list_keys("datasets/")) == []
    assert build.latest_version_id(settings) is None
    assert build.run(settings, "run-1")["version_id"] == "v0002"


def test_a_retry_abandons_the_version_a_killed_build_left_behind(env):
    settings, writer = env
    populate(writer)
    build.run(settings, "run-1")
    with engine_for(settings.manifest_url).begin() as conn:  # as if killed mid-export
        conn.execute(sa.text("UPDATE dataset_versions SET status = 'building'"))
    ObjectStore(settings).put_bytes("datasets/v0001/tfrecords/stray.tfrecord", b"partial")

    stats = build.run(settings, "run-1")

    assert stats["version_id"] == "v0002" and stats["parent_version"] is None
    with engine_for(settings.manifest_url).connect() as conn:
        assert conn.execute(sa.text(
            "SELECT status FROM dataset_versions WHERE version_id = 'v0001'")).scalar() == "failed"
    assert all(k.startswith("datasets/v0002/") for k in ObjectStore(settings).list_keys("datasets/"))


# --- the export as shard jobs (what the nightly DAG maps over workers) ------------------------


def decided_version(settings, writer, run_key="night-1"):
    """A version decided and stored (status building) with its shard jobs, nothing exported."""
    populate(writer)
    decided = build.decide(settings, run_key)
    return decided["build"]["version_id"], decided["shards"]


def version_status(settings, version_id: str) -> str:
    with engine_for(settings.manifest_url).connect() as conn:
        return conn.execute(sa.text("SELECT status FROM dataset_versions WHERE version_id = :v"),
                            {"v": version_id}).scalar_one()


def test_shard_jobs_are_planned_from_the_stored_members_the_same_way_every_time(env):
    """One job per shard of the layout's shard plan, named as the one-process writer names
    them, and each job's members (read by row range) are exactly that shard's records."""
    settings, writer = env
    version_id, jobs = decided_version(settings, writer)

    with engine_for(settings.manifest_url).connect() as conn:
        snapshot = export.load_snapshot(conn, version_id)
        planned = export.planned_shards(conn, version_id)
        expected = layout.shard_plan(snapshot.members, 4)
        for relpath, bounds in planned.items():
            shard = export.shard_members(conn, version_id, *bounds)
            assert [m["sha256"] for m in shard] == [m["sha256"] for m in expected[relpath]]
    assert [job["shards"] for job in jobs] == [[relpath] for relpath in expected]
    assert jobs == [j.as_dict() for j in export.plan_shard_jobs(settings, version_id)]
    assert len(expected) > 3 and version_status(settings, version_id) == "building"


def test_more_shards_than_mapped_tasks_are_grouped_into_consecutive_jobs(env):
    settings, writer = env
    version_id, jobs = decided_version(settings, writer)
    shards = [relpath for job in jobs for relpath in job["shards"]]

    grouped = export.plan_shard_jobs(settings, version_id, max_jobs=3)

    assert [job.count for job in grouped] == [3, 3, 3]
    assert [relpath for job in grouped for relpath in job.shards] == shards
    assert max(len(j.shards) for j in grouped) - min(len(j.shards) for j in grouped) <= 1


def test_shards_exported_in_any_order_or_twice_are_the_same_objects(env, tmp_path):
    """A retried (or duplicated) job PUTs the same bytes under the same key: the version equals
    a re-materialisation from the manifest whatever order and however often jobs ran."""
    settings, writer = env
    version_id, jobs = decided_version(settings, writer)
    for job in reversed(jobs):
        export.export_shard(settings, job)
    first = stored_files(settings, version_id)

    for job in jobs + jobs[:2]:  # forwards, and the first two once more
        export.export_shard(settings, job)
    stats = build.finish(settings, "night-1")

    assert stats["version_id"] == version_id and stats["files"]["shards"] == len(jobs)
    again = stored_files(settings, version_id)
    assert {k: again[k] for k in first} == first
    assert export.verify_export(settings, version_id) == []
    assert version_status(settings, version_id) == "complete"


def test_a_version_is_not_readable_until_every_shard_is_stored(env, tmp_path):
    """Without one shard the finishing step fails naming it, writes no index file and leaves
    the version building; readers find no version. Exporting that shard and finishing again
    completes it."""
    settings, writer = env
    version_id, jobs = decided_version(settings, writer)
    lost = jobs[1]
    for job in jobs:
        if job is not lost:
            export.export_shard(settings, job)

    with pytest.raises(export.ExportError,
                       match=rf"{version_id} is incomplete: 1 of {len(jobs)} shard\(s\) missing "
                             rf"from the store \({lost['shards'][0]}\).*export_shard"):
        build.finish(settings, "night-1")

    assert version_status(settings, version_id) == "building"
    assert build.latest_version_id(settings) is None
    assert not {"version.json", "manifest.parquet", "labels.json"} & set(stored_files(settings, version_id))
    with pytest.raises(DatasetError, match="has no version.json"):
        materialise(settings, version_id, tmp_path / "early")
    assert not (tmp_path / "early").exists()

    export.export_shard(settings, lost)
    stats = build.finish(settings, "night-1")

    assert stats["version_id"] == version_id and not stats["unchanged"]
    assert build.latest_version_id(settings) == version_id
    assert export.verify_export(settings, version_id) == []
    assert materialise(settings, version_id, tmp_path / "done").is_dir()
    assert build.finish(settings, "night-1")["reused"] is True  # a retried finish changes nothing


def test_finishing_a_night_that_made_no_new_version_reports_the_unchanged_latest(env):
    settings, writer = env
    populate(writer)
    first = build.run(settings, "night-1")

    decided = build.decide(settings, "night-2")

    assert decided["shards"] == [] and decided["build"]["unchanged"]
    finished = build.finish(settings, "night-2")
    assert finished["unchanged"] and finished["version_id"] == first["version_id"]


def test_a_shard_job_of_an_abandoned_version_writes_nothing(env):
    """A re-run decide abandons the run's unfinished version; a late job of it stays out."""
    settings, writer = env
    version_id, jobs = decided_version(settings, writer)
    assert build.decide(settings, "night-1")["build"]["version_id"] != version_id

    with pytest.raises(export.ExportError, match=f"{version_id} is failed"):
        export.export_shard(settings, jobs[0])
    assert list(ObjectStore(settings).list_keys(export.version_prefix(version_id))) == []


# --- a night whose export did not finish ------------------------------------------------------


def version_row(settings, version_id: str) -> dict:
    with engine_for(settings.manifest_url).connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT status, error FROM dataset_versions WHERE version_id = :v"),
            {"v": version_id}).mappings().one())


def test_a_shard_job_failing_for_good_leaves_a_failed_version_naming_the_missing_shard(env, tmp_path):
    """Once every shard job has ended and one never stored its shard, closing the build marks
    the version failed with that shard in its error, removes the shards that were stored and
    fails (again when re-run); nothing can read the version or bring it back."""
    settings, writer = env
    version_id, jobs = decided_version(settings, writer)
    lost = jobs[2]
    for job in jobs:
        if job is not lost:
            export.export_shard(settings, job)

    with pytest.raises(build.IncompleteBuild, match=rf"{version_id} of run night-1 is failed, "
                       rf"abandoned: its export did not finish: 1 of {len(jobs)} shard\(s\) "
                       rf"missing from the store \({lost['shards'][0]}\)"):
        build.abandon_incomplete(settings, "night-1")

    row = version_row(settings, version_id)
    assert row["status"] == "failed" and lost["shards"][0] in row["error"]
    assert stored_files(settings, version_id) == {}
    assert build.latest_version_id(settings) is None
    with pytest.raises(DatasetError):
        materialise(settings, version_id, tmp_path / "never")
    with pytest.raises(build.IncompleteBuild, match=lost["shards"][0]):
        build.abandon_incomplete(settings, "night-1")  # a re-run still says the night failed
    with pytest.raises(export.ExportError, match=f"{version_id} is failed"):
        export.export_shard(settings, lost)  # a late retry of the job writes nothing


def test_closing_a_build_whose_shards_are_all_stored_leaves_it_to_finish(env):
    """Every shard stored: the version is finish's to complete (it may be completing right now),
    so closing changes nothing before or after; nor on a night that made no version."""
    settings, writer = env
    version_id, jobs = decided_version(settings, writer)
    for job in jobs:
        export.export_shard(settings, job)

    assert build.abandon_incomplete(settings, "night-1") == {"abandoned": None}
    assert version_row(settings, version_id)["status"] == "building"
    build.finish(settings, "night-1")
    assert build.abandon_incomplete(settings, "night-1") == {"abandoned": None}
    assert version_row(settings, version_id)["status"] == "complete"
    assert build.abandon_incomplete(settings, "night-without-a-build") == {"abandoned": None}


def test_a_version_failing_its_checks_is_not_blamed_on_the_export(env):
    """build_plan already failed such a night with the checks' error; closing keeps that error."""
    settings, _ = env
    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(sa.text("INSERT INTO dataset_versions (version_id, seq, run_key, status, "
                             "code_version, content_hash, uri, error) VALUES ('v0001', 1, "
                             "'night-1', 'failed', 'git:x', repeat('0', 64), 's3://b/v0001', "
                             "'DataQualityError: 1 check failed')"))

    assert build.abandon_incomplete(settings, "night-1") == {"abandoned": None}
    assert version_row(settings, "v0001")["error"] == "DataQualityError: 1 check failed"


def test_a_later_build_abandons_versions_earlier_runs_left_building_but_not_a_young_one(env):
    """A version another run left building for longer than dataset_stale_build_hours is marked
    failed (naming both runs) and its files removed by the next decide; a younger one may be a
    concurrent run still exporting, so it is left alone."""
    settings, writer = env
    dead, dead_jobs = decided_version(settings, writer, run_key="night-1")
    export.export_shard(settings, dead_jobs[0])
    live = build.decide(settings, "manual-1")["build"]["version_id"]
    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(sa.text("UPDATE dataset_versions SET created_at = now() - interval '21 hours'"
                             " WHERE version_id = :v"), {"v": dead})

    third = build.decide(settings.with_overrides(dataset_stale_build_hours=20), "night-2")

    assert version_row(settings, dead) == {
        "status": "failed", "error": "abandoned by run night-2: still building after more than "
                                     "20 h; run night-1 ended without finishing it"}
    assert stored_files(settings, dead) == {}
    assert version_row(settings, live)["status"] == "building"
    assert third["build"]["version_id"] not in (dead, live)
