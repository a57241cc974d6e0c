"""The shoplens page's manifest queries, against a real PostgreSQL manifest filled with SQL."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shoplens import summary as run_summary
from shoplens.manifest import engine_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
from shoplens_ui import queries  # noqa: E402

import ui_manifest  # noqa: E402


@pytest.fixture
def seeded(manifest_url):
    ui_manifest.seed(manifest_url)
    with engine_for(manifest_url).connect() as conn:
        yield conn


def test_versions_are_listed_newest_first_with_their_split_sizes(seeded):
    versions = queries.dataset_versions(seeded).data["versions"]
    assert [v["version_id"] for v in versions] == ["v0003", "v0002", "v0001"]
    v2 = versions[1]
    assert (v2["status"], v2["parent_version"], v2["images"], v2["labels"]) == ("complete", "v0001", 13, 3)
    assert (v2["train_images"], v2["val_images"], v2["test_images"]) == (6, 4, 3)
    assert versions[0]["status"] == "failed" and versions[0]["images"] == 0


def test_counts_per_split_and_product_default_to_the_newest_complete_version(seeded):
    counts = queries.version_counts(seeded).data
    assert counts["version_id"] == "v0002"  # v0003 failed
    by_product = {p["product_id"]: (p["train_images"], p["val_images"], p["test_images"], p["images"])
                  for p in counts["products"]}
    assert by_product == {101: (2, 2, 1, 5), 102: (3, 1, 1, 5), 201: (1, 1, 1, 3)}
    assert counts["totals"] == {"images": 13, "train_images": 6, "val_images": 4, "test_images": 3}
    older = queries.version_counts(seeded, "v0001").data
    assert {p["product_id"]: p["images"] for p in older["products"]} == {101: 6, 102: 5}


def test_latest_rejections_are_grouped_by_rule_with_bounded_samples(seeded):
    rej = queries.rejections(seeded, samples=2).data
    assert rej["run"]["run_key"] == ui_manifest.NIGHT1
    assert (rej["decided"], rej["rejected"]) == (24, 5)  # photo 1 failed two rules, counted once
    assert [(r["rule"], r["images"]) for r in rej["reasons"]] == [
        ("too_small", 3), ("second_product", 2), ("no_detection", 1)]
    too_small = rej["reasons"][0]["samples"]
    assert [s["sha256"] for s in too_small] == [ui_manifest.photo_sha(0), ui_manifest.photo_sha(1)]
    assert too_small[0]["reason"] == "too_small on photo 0"


def test_rejections_of_a_named_run_and_of_a_run_without_filter(seeded):
    assert queries.rejections(seeded, run_key=ui_manifest.NIGHT1).data["rejected"] == 5
    assert queries.rejections(seeded, run_key=ui_manifest.NIGHT2).data["run"] is None


def test_diff_of_the_last_two_complete_versions(seeded):
    diff = queries.version_diff(seeded).data
    assert (diff["old"], diff["new"]) == ("v0001", "v0002")
    assert diff["changes"] == {"added": 4, "removed": 2, "moved": 1, "relabelled": 0, "unchanged": 8}
    rows = {p["product_id"]: (p["old_images"], p["new_images"], p["added"], p["removed"], p["changed"])
            for p in diff["products"]}
    assert rows == {101: (6, 5, 1, 2, 1), 201: (0, 3, 3, 0, 0)}  # 102 did not change


def test_current_model_scores_come_from_its_newest_evaluation_with_history(seeded):
    models = queries.model_history(seeded).data
    current = models["current"]
    assert (current["model_id"], current["evaluated_on"]) == ("m1", "v0002")
    assert (current["top1"], current["top3"]) == (0.78, 0.93)  # ensemble, not a member's score
    assert [(e["evaluated_on"], e["top1"]) for e in models["evaluations"]] == [("v0002", 0.78), ("v0001", 0.80)]
    assert [(m["model_id"], m["top1"], m["promoted"]) for m in models["models"]] == [
        ("m2", 0.76, False), ("m1", 0.80, True)]


def test_recent_runs_list_the_recorded_nights(seeded):
    [night] = queries.recent_runs(seeded).data["runs"]
    assert night["run_key"] == ui_manifest.NIGHT1 and night["duration_seconds"] == 200
    assert night["volume"] == {"crawl.images_new": 24}


def test_the_page_counts_are_the_run_summarys_counts(seeded):
    """The page's rejection and version counts are the very numbers of the one run summary."""
    summary = run_summary.load(seeded, ui_manifest.NIGHT1)
    rejections = queries.rejections(seeded, run_key=ui_manifest.NIGHT1).data
    assert (rejections["decided"], rejections["rejected"]) == (
        summary.filter["decided"], summary.filter["rejected_images"]) == (24, 5)
    assert {r["rule"]: r["images"] for r in rejections["reasons"]} == \
        summary.filter["rejected_by_rule"] == {"too_small": 3, "second_product": 2, "no_detection": 1}
    counts = queries.version_counts(seeded, "v0001").data
    assert summary.build["version_id"] == "v0001"  # NIGHT1 built v0001
    assert counts["totals"] == {"images": summary.build["images"],
                                **{f"{s}_images": n for s, n in summary.build["splits"].items()}}
    assert [s for s in summary.stages] == ["crawl:10120000", "filter"]
    assert summary.status == "success" and summary.duration_seconds == 200


def test_an_empty_manifest_gives_empty_sections(manifest_url):
    with engine_for(manifest_url).connect() as conn:
        assert queries.dataset_versions(conn).data == {"versions": []}
        assert queries.version_counts(conn).data["version_id"] is None
        assert queries.rejections(conn).data["run"] is None
        assert queries.version_diff(conn).data == {"old": None, "new": None}
        assert queries.model_history(conn).data == {"current": None, "evaluations": [], "models": []}
        assert queries.recent_runs(conn).data == {"runs": []}
        assert queries.image_object_key(conn, "0" * 64) is None

