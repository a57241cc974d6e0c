"""Every example query in docs/manifest.md runs on a populated PostgreSQL manifest and returns
the documented columns and the answer the manifest's contents imply."""
from __future__ import annotations

import re
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import sqlalchemy as sa

from build_fixtures import ManifestWriter, migrate_for_build
from conftest import PG_SERVER, _admin_engine
from dataset.build import stage as build
from dataset.build.diff import diff_versions
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.store import ObjectStore

DOC = Path(__file__).resolve().parents[1] / "docs" / "manifest.md"
QUERY = re.compile(
    r"^### (Q\d+)\. (?P<title>.+?)\nColumns: `(?P<columns>[^`]+)`\n\n```sql\n(?P<sql>.*?)```",
    re.MULTILINE | re.DOTALL)


def documented_queries() -> list[tuple[str, str, list[str], str]]:
    return [(m.group(1), m.group("title"), [c.strip() for c in m.group("columns").split(",")],
             m.group("sql")) for m in QUERY.finditer(DOC.read_text())]


def test_the_doc_has_at_least_ten_example_queries():
    queries = documented_queries()
    assert len(queries) >= 10
    assert len({q[0] for q in queries}) == len(queries)
    # every fenced SQL block in the examples section was parsed (none silently skipped)
    examples = DOC.read_text().split("## Example queries", 1)[1]
    assert examples.count("```sql") == len(queries)


@pytest.fixture(scope="module")
def manifest(seaweedfs):
    """Two complete versions: the second after a crawl that adds photos and a product, and a
    filter run that drops another product below the minimum."""
    name = f"shoplens_test_{uuid.uuid4().hex[:10]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_SERVER}/{name}"
    migrate_for_build(url)
    settings = Settings().with_overrides(
        s3_endpoint=seaweedfs.endpoint, s3_access_key=seaweedfs.access_key,
        s3_secret_key=seaweedfs.secret_key, s3_bucket=f"t-{uuid.uuid4().hex[:12]}",
        manifest_url=url, dataset_min_photos_per_product=3, dataset_images_per_shard=16)
    ObjectStore(settings).ensure_bucket()
    writer = ManifestWriter(url, settings)

    photos = {}
    for product_id in range(301, 320):  # 19 products: labels 0..18, 318 gets label 17
        category = "10120000" if product_id % 2 else "16220000"
        writer.product(product_id, category_id=category, name=f"제품 {product_id}")
        photos[product_id] = writer.photos(product_id, 6 if product_id == 318 else 3)
    rejected = [writer.photo(302, passed=False), writer.photo(303, passed=False),
                writer.photo(304, passed=False, failed_rule="single_product")]
    cross_product_copy = writer.photo(305, cluster_of=photos[306][0])
    build.run(settings, "nightly-1")

    writer.crawl_run("crawl-2")
    added = writer.photos(318, 4)
    writer.product(320, name="제품 320")
    added += writer.photos(320, 3)
    writer.reject(photos[301][0])  # product 301 falls below the minimum of 3
    build.run(settings, "nightly-2")
    with engine_for(url).begin() as conn:  # what the modeling stage records after training
        conn.execute(sa.text(
            "INSERT INTO models (id, dataset_version, profile, artifact_prefix, status)"
            " VALUES ('model-a', 'v0001', 'fast', 'models/model-a/', 'complete'),"
            "        ('model-b', 'v0002', 'full', 'models/model-b/', 'training')"))

    yield SimpleNamespace(settings=settings, url=url, photos=photos, added=added,
                          rejected=rejected, cross_product_copy=cross_product_copy)
    engine_for(url).dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run_query(m, sql: str) -> tuple[list[str], list[dict]]:
    sample_image = m.photos[318][0]
    # psql variables (:'name') become bind parameters
    sql = re.sub(r":'(\w+)'", r":\1", sql)
    with engine_for(m.url).connect() as conn:
        result = conn.execute(sa.text(sql), {"sha256": sample_image})
        return list(result.keys()), [dict(r) for r in result.mappings()]


def expect_q1(m, rows):
    assert sum(r["photos"] for r in rows) == 19 * 3 + 3 + 3 + 1 + 7
    assert {r["product_id"] for r in rows} == set(range(301, 321))


def expect_q2(m, rows):
    got = {(r["category_id"], r["reason"]): r["photos"] for r in rows}
    assert got == {("16220000", "product_occupancy"): 1, ("10120000", "product_occupancy"): 1,
                   ("16220000", "single_product"): 1, ("10120000", "single_product"): 1}


def expect_q3(m, rows):
    assert {r["sha256"] for r in rows} <= set(m.photos[318]) | set(m.added)
    with engine_for(m.url).connect() as conn:
        reviews = dict(conn.execute(sa.text("SELECT sha256, review_id FROM images")).all())
    assert all(reviews[r["sha256"]] == r["review_id"] for r in rows)


def expect_q4(m, rows):
    d = diff_versions(m.settings, "v0001", "v0002")
    assert {r["change"]: r["images"] for r in rows} == {"added": len(d["images_added"]),
                                                       "removed": len(d["images_removed"])}
    assert sorted(d["images_added"]) == sorted(m.added)
    assert {r["version_id"] for r in rows} == {"v0002"} and rows[0]["parent_version"] == "v0001"


def expect_q5(m, rows):
    assert len(rows) == 1 and rows[0]["product_id"] == 318 and rows[0]["crawl_run_key"] == "crawl-1"


def expect_q6(m, rows):
    assert sorted(r["rule"] for r in rows) == ["min_side", "product_occupancy", "single_product"]


def expect_q7(m, rows):
    assert [(r["version_id"], r["label"]) for r in rows] == [("v0001", 17), ("v0002", 17)]
    assert rows[0]["split"] == rows[1]["split"]


def expect_q8(m, rows):
    assert [(r["version_id"], r["status"], r["labels"]) for r in rows] == [
        ("v0001", "complete", 19), ("v0002", "complete", 19)]


def expect_q9(m, rows):
    assert [r["label"] for r in rows] == list(range(1, 20))
    assert all(r["train_images"] >= 1 for r in rows)


def expect_q10(m, rows):
    assert rows == [{"product_id": 301, "product_name": "제품 301", "kept_photos": 2}]


def expect_q11(m, rows):
    assert rows == [{"change": "dropped", "label": 0, "product_id": 301, "product_name": "제품 301"},
                    {"change": "added", "label": 19, "product_id": 320, "product_name": "제품 320"}]


def expect_q12(m, rows):
    assert [r["label"] for r in rows] == list(range(20))
    assert [r["in_latest"] for r in rows] == [False] + [True] * 19


def expect_q13(m, rows):
    assert [(r["run_key"], r["photos"], r["duplicates"], r["rejected"]) for r in rows] == [
        ("crawl-1", 19 * 3 + 3 + 3 + 1, 1, 4), ("crawl-2", 7, 0, 0)]  # 301 rejected later


def expect_q14(m, rows):
    assert len(rows) == 1 and sorted(rows[0]["product_ids"]) == [305, 306]


def expect_q15(m, rows):
    assert [(r["model_id"], r["dataset_version"]) for r in rows] == [
        ("model-a", "v0001"), ("model-b", "v0002")]


EXPECTATIONS = {f"Q{i}": globals()[f"expect_q{i}"] for i in range(1, 16)}


@pytest.mark.parametrize("query_id,title,columns,sql", documented_queries(),
                         ids=[q[0] for q in documented_queries()])
def test_documented_query_answers_its_question(manifest, query_id, title, columns, sql):
    got_columns, rows = run_query(manifest, sql)
    assert got_columns == columns
    assert rows, f"{query_id} ({title}) returned nothing on a populated manifest"
    EXPECTATIONS[query_id](manifest, rows)
