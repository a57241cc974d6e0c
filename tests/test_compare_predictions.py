"""benchmarks/compare_predictions.py: photo-by-photo comparison of two train_grocery results."""
from __future__ import annotations

import json

import pytest

from benchmark_modules import load_benchmark

compare_predictions = load_benchmark("compare_predictions")


def prediction(photo, label, top3):
    return {"photo": photo, "label": label, "top3": top3}


BEFORE = [
    prediction("val/a/1.jpg", 0, [0, 1, 2]),  # right
    prediction("val/a/2.jpg", 0, [1, 0, 2]),  # wrong, in top 3
    prediction("val/b/1.jpg", 1, [2, 3, 4]),  # wrong, not in top 3
    prediction("val/b/2.jpg", 1, [1, 2, 3]),  # right
]
AFTER = [
    prediction("val/b/2.jpg", 1, [2, 3, 4]),  # broken at top 1 and top 3
    prediction("val/a/1.jpg", 0, [0, 1, 2]),
    prediction("val/a/2.jpg", 0, [0, 1, 2]),  # fixed at top 1
    prediction("val/b/1.jpg", 1, [2, 1, 3]),  # fixed at top 3 only
]


def test_counts_what_the_second_run_fixes_and_breaks_photo_by_photo_whatever_the_order():
    result = compare_predictions.compare(BEFORE, AFTER)

    assert result["n"] == 4
    assert result["top1"] == {"before": 2, "after": 2,
                              "fixed": ["val/a/2.jpg"], "broken": ["val/b/2.jpg"]}
    assert result["top3"] == {"before": 3, "after": 3,
                              "fixed": ["val/b/1.jpg"], "broken": ["val/b/2.jpg"]}


def test_refuses_runs_tested_on_different_photos():
    with pytest.raises(ValueError, match="not tested on the same photos: 1 photo"):
        compare_predictions.compare(BEFORE, AFTER[:3])


def test_refuses_runs_that_disagree_on_a_photos_label():
    relabelled = [dict(p, label=5) if p["photo"] == "val/a/1.jpg" else p for p in AFTER]
    with pytest.raises(ValueError, match="1 with different labels"):
        compare_predictions.compare(BEFORE, relabelled)


def test_cli_writes_the_comparison_and_names_a_results_file_without_predictions(tmp_path, capsys):
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    before.write_text(json.dumps({"test_predictions": BEFORE}))
    after.write_text(json.dumps({"test_predictions": AFTER}))
    out = tmp_path / "cmp" / "out.json"

    assert compare_predictions.main([str(before), str(after), "--results", str(out)]) == 0
    assert "top1: 2/4 -> 2/4  fixed 1, broken 1" in capsys.readouterr().out
    assert json.loads(out.read_text())["top3"]["fixed"] == ["val/b/1.jpg"]

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"ensemble": {}}))
    with pytest.raises(SystemExit, match="has no test_predictions"):
        compare_predictions.main([str(old), str(after)])
