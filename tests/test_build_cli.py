"""The dataset build's command line, its version summary and the data-quality checks' names."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from build_fixtures import ManifestWriter, migrate_for_build
from dataset.build import stage as build
from dataset.build import cli as build_cli
from dataset.build import checks, diff
from shoplens import lineage, ops
from shoplens import summary as run_summary
from shoplens.manifest import engine_for


@pytest.fixture
def built(fresh_database, s3_settings, monkeypatch):
    """Two versions, and the environment variables a CLI user would have set."""
    migrate_for_build(fresh_database)
    settings = s3_settings.with_overrides(manifest_url=fresh_database,
                                          dataset_min_photos_per_product=3)
    for field, value in (("manifest_url", fresh_database), ("s3_endpoint", settings.s3_endpoint),
                         ("s3_access_key", settings.s3_access_key),
                         ("s3_secret_key", settings.s3_secret_key),
                         ("s3_bucket", settings.s3_bucket),
                         ("dataset_min_photos_per_product", "3")):
        monkeypatch.setenv(f"SHOPLENS_{field.upper()}", value)
    writer = ManifestWriter(fresh_database, settings)
    photos = {}
    for product_id in (11, 12, 13):
        writer.product(product_id, name=f"의자 {product_id}")
        photos[product_id] = writer.photos(product_id, 5)
    build.run(settings, "run-1")
    writer.product(14, name="식탁 | 4인용")
    photos[14] = writer.photos(14, 4)
    build.run(settings, "run-2")
    return settings, photos


def test_diff_cli_prints_the_changes(built, capsys):
    assert diff.main(["v0001", "v0002"]) == 0
    out = capsys.readouterr().out
    assert "images added: 4" in out and "images removed: 0" in out
    assert "label 3: product 14 식탁 | 4인용" in out

    assert diff.main(["v0001", "v0002", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["images_added"]) == 4
    assert diff.main(["v0001", "v0007"]) == 2
    assert "no dataset version 'v0007'" in capsys.readouterr().err


def test_lineage_cli_prints_the_story_and_rejects_unknown_images(built, capsys):
    settings, photos = built
    sha = photos[12][1]
    assert lineage.main([sha, "--dataset-version", "v0002"]) == 0
    story = json.loads(capsys.readouterr().out)
    assert story["product"]["name"] == "의자 12" and story["versions"][0]["version_id"] == "v0002"
    assert lineage.main(["0" * 64]) == 2
    assert "no image" in capsys.readouterr().err
    assert lineage.main(["not-a-sha"]) == 2


def test_build_cli_builds_checks_verifies_and_summarises(built, capsys, tmp_path):
    assert build_cli.main(["--run-key", "run-3"]) == 0
    assert json.loads(capsys.readouterr().out)["unchanged"] is True

    assert build_cli.main(["--check", "v0002"]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out and "ok   dataset_members.no_cluster_spans_two_splits" in out

    assert build_cli.main(["--verify", "v0002"]) == 0
    assert "equal a re-materialisation" in capsys.readouterr().out

    assert build_cli.main(["--materialise", "v0002", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "manifest.parquet").exists()
    capsys.readouterr()

    assert build_cli.main(["--summary"]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("### Dataset version v0002 (complete, parent v0001)")
    assert build_cli.main(["--verify", "v0042"]) == 2  # an unknown version is bad input
    assert "no dataset version 'v0042'" in capsys.readouterr().err


def version_markdown(settings, version_id=None) -> str:
    with engine_for(settings.manifest_url).connect() as conn:
        return run_summary.version_markdown(run_summary.version_counts(conn, version_id))


def test_version_markdown_counts_per_split_and_product(built):
    """A version's dataset card: images per split with the total, then per product and split."""
    settings, _ = built
    text = version_markdown(settings, "v0001")
    lines = text.splitlines()
    assert "| **total** | **15** |" in lines
    split_rows = {l.split("|")[1].strip(): int(l.split("|")[2]) for l in lines
                  if l.startswith("| t") or l.startswith("| v")}
    assert sum(split_rows.values()) == 15 and set(split_rows) == {"train", "val", "test"}
    assert any(l.startswith("| 0 | 11 | 의자 11 | 10120000 |") and l.endswith("| 5 |") for l in lines)
    assert "식탁 \\| 4인용" in version_markdown(settings)  # latest version; pipes escaped
    with pytest.raises(LookupError, match="no dataset version 'v0042'"):
        version_markdown(settings, "v0042")


def test_quality_checks_are_plain_sql_that_name_what_they_found(built):
    """Every check runs as SQL on the manifest (no Airflow), passes on a good version, and a
    failing one reports what it found; a malformed version id is refused before any SQL."""
    settings, _ = built
    results = checks.run_sql_checks(settings, "v0002")
    assert len({(r.table, r.name) for r in results}) == len(results) == 21  # as before
    assert all(r.passed for r in results), [r for r in results if not r.passed]
    with engine_for(settings.manifest_url).begin() as conn:
        conn.execute(sa.text("DELETE FROM dataset_members WHERE version_id = 'v0002' AND "
                             "product_id = 11 AND split <> 'train'"))  # 3 photos left of 5
        conn.execute(sa.text("DELETE FROM dataset_members WHERE version_id = 'v0002' AND "
                             "product_id = 12 AND split = 'train'"))  # 2 photos, none in train
    failed = {r.name: r.actual for r in checks.run_sql_checks(settings, "v0002") if not r.passed}
    assert failed == {"products_meet_min_photos": "1 product(s) under 3",
                      "every_label_has_a_train_photo": "labels 4, with a train photo 3"}
    with pytest.raises(ValueError, match="not a dataset version id"):
        checks.run_sql_checks(settings, "v1; DROP TABLE images")


def test_the_build_stage_and_its_checks_import_no_airflow():
    """The stage stays testable and runnable without Airflow installed."""
    code = ("import sys, dataset.build.stage, dataset.build.checks; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.strip() == "[]"


def test_the_run_summary_names_the_runs_version_or_says_there_is_none(built):
    """The build section of the one run summary: the run's version with its split sizes, or
    the latest complete version when the run built none."""
    settings, _ = built
    lines = run_summary.for_run(settings, "run-2").lines()
    # 5 photos per product split 3/1/1 by the quota rule, product 14's 4 photos 3/1/0
    assert ("   dataset: v0002 complete (parent v0001): 19 images, 4 labels; "
            "train 12 / val 4 / test 3") in lines
    assert f"   dataset: s3://{settings.s3_bucket}/datasets/v0002/" in lines
    ops.run_stage(settings, "run-3", "build", build.run, settings, "run-3")  # nothing new
    assert "   dataset: no new version this run (latest v0002, 19 images)" in \
        run_summary.for_run(settings, "run-3").lines()
