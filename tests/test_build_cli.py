"""The dataset build's command line, README summary and the DAG-side check operators."""
from __future__ import annotations

import json

import pytest

from build_fixtures import ManifestWriter, migrate_for_build
from dataset.build import stage as build
from dataset.build import cli as build_cli
from dataset.build import checks, diff
from shoplens import lineage
from dataset.build.version_summary import readme_summary


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
    assert lineage.main([sha, "--version", "v0002"]) == 0
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
    assert build_cli.main(["--verify", "v0042"]) == 1
    assert "no dataset version 'v0042'" in capsys.readouterr().err


def test_readme_summary_counts_per_split_and_product(built):
    settings, _ = built
    text = readme_summary(settings, "v0001")
    lines = text.splitlines()
    assert "| **total** | **15** |" in lines
    split_rows = {l.split("|")[1].strip(): int(l.split("|")[2]) for l in lines
                  if l.startswith("| t") or l.startswith("| v")}
    assert sum(split_rows.values()) == 15 and set(split_rows) == {"train", "val", "test"}
    assert any(l.startswith("| 0 | 11 | 의자 11 | 10120000 |") and l.endswith("| 5 |") for l in lines)
    assert "식탁 \\| 4인용" in readme_summary(settings)  # latest version; pipes escaped


def test_check_operators_for_a_dag_template_the_version_and_cover_every_check(built):
    settings, _ = built
    from airflow.sdk import DAG

    with DAG("dataset_checks_example", schedule=None):
        operators = checks.check_operators(
            settings, conn_id="shoplens_manifest",
            partition_clause="version_id = '{{ ti.xcom_pull(task_ids='build_dataset')['version_id'] }}'")
    assert [op.task_id for op in operators] == [
        "dataset_check_dataset_members", "dataset_check_dataset_version_label_counts",
        "dataset_check_dataset_members_columns"]
    assert all("partition_clause" in op.template_fields for op in operators)
    declared = {name for table in checks.table_checks(settings).values() for name in table}
    in_operators = {name for op in operators[:2] for name in op.checks}
    assert declared == in_operators
    assert "{{ ti.xcom_pull" in operators[0].sql  # the version is filled in at run time
    with pytest.raises(ValueError, match="not a dataset version id"):
        checks.partition_for("v1; DROP TABLE images")


def test_run_summary_lines_name_the_runs_version_or_say_there_is_none(built):
    settings, _ = built
    lines = build.summary_lines(settings, "run-2")
    # 5 photos per product split 3/1/1 by the quota rule, product 14's 4 photos 3/1/0
    assert lines[0] == ("dataset: v0002 complete (parent v0001): 19 images, 4 labels; "
                        "train 12 / val 4 / test 3")
    assert lines[1] == f"dataset: s3://{settings.s3_bucket}/datasets/v0002/"
    assert build.summary_lines(settings, "run-without-build") == [
        "dataset: no new version this run (latest v0002, 19 images)"]
