"""``python -m dataset dedup --json DIR`` prints the near-duplicate clusters of a folder of images."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from dataset.dedup.cli import main

REPO = Path(__file__).resolve().parents[1]


def photo(seed: int, size=(320, 240)) -> Image.Image:
    small = np.random.RandomState(seed).randint(0, 256, (6, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    photo(1).save(tmp_path / "a_original.jpg", quality=92)
    photo(1).resize((150, 112)).save(tmp_path / "a_resized.jpg", quality=60)
    (tmp_path / "sub").mkdir()
    ImageOps.expand(photo(1), border=20, fill=(0, 0, 0)).save(tmp_path / "sub" / "a_framed.png")
    photo(2).save(tmp_path / "b_original.jpg", quality=90)
    ImageEnhance.Brightness(photo(2)).enhance(0.88).save(tmp_path / "b_darker.jpg", quality=55)
    photo(3).save(tmp_path / "c_alone.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_json_lists_each_cluster_with_its_largest_image_first(folder, capsys):
    assert main(["--json", str(folder)]) == 0
    out, err = capsys.readouterr()
    clusters = [json.loads(line) for line in out.splitlines()]

    assert [sorted(Path(m["path"]).name for m in c["members"]) for c in clusters] == [
        ["a_framed.png", "a_original.jpg", "a_resized.jpg"], ["b_darker.jpg", "b_original.jpg"]]
    # The framed copy (360x280) is the largest file of cluster a.
    assert Path(clusters[0]["representative"]).name == "a_framed.png"
    assert clusters[0]["members"][0]["distance"] == 0 and clusters[0]["size"] == 3
    assert all(0 <= m["distance"] <= 25 for c in clusters for m in c["members"][1:])
    assert "notes.txt" in err and "not a decodable image" in err


def test_a_threshold_of_zero_keeps_only_identical_looking_images_together(folder, capsys):
    main(["--json", "--threshold", "0", str(folder)])
    clusters = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(m["distance"] == 0 for c in clusters for m in c["members"])


def test_the_module_entry_point_runs_and_rejects_a_missing_folder(folder, tmp_path):
    ran = subprocess.run([sys.executable, "-m", "dataset", "dedup", "--json", str(folder)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and len(ran.stdout.splitlines()) == 2
    bad = subprocess.run([sys.executable, "-m", "dataset", "dedup", str(tmp_path / "nope")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "is not a directory" in bad.stderr
