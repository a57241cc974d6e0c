"""The nightly filter stage on a real manifest (PostgreSQL) and object store (SeaweedFS)."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys

import pytest
import sqlalchemy as sa
from PIL import Image

from dataset.filter import stage
from shoplens.vision.detector import Detector
from dataset.filter.overrides import OverrideError, set_override
from shoplens.manifest import engine_for
from shoplens.store import ObjectStore
from tests.conftest import REPO, shared_path

ROOM = ("datasets", "ikea", "images", "room_scenes",
        "ikea-a-bed-that-folds-away-to-be-a-sofa-by-day__1364309472525-s4.jpg")


class CountingDetector:
    """The real detector, counting calls; ``forbid()`` makes any further call fail the test."""

    def __init__(self, model):
        self.inner = Detector(model, min_score=0.05)
        self.version, self.min_score = self.inner.version, self.inner.min_score
        self.calls, self.forbidden = 0, False

    def detect_fitted(self, *args):
        assert not self.forbidden, "the detector must not run for this"
        self.calls += 1
        return self.inner.detect_fitted(*args)


@pytest.fixture(scope="module")
def model_path():
    return shared_path("models", "yolox_nano.onnx")


@pytest.fixture
def settings(s3_settings, manifest_url, model_path):
    return s3_settings.with_overrides(manifest_url=manifest_url, detector_model_path=str(model_path))


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def studio_photo(fill: float) -> bytes:
    """A dark object on a white studio backdrop covering ``fill`` of the frame by its extent."""
    image = Image.new("RGB", (400, 400), (250, 250, 250))
    side = int(400 * fill ** 0.5)
    image.paste((60, 40, 30), ((400 - side) // 2, (400 - side) // 2,
                               (400 - side) // 2 + side, (400 - side) // 2 + side))
    return jpeg(image)


def seed(settings, photos: dict[str, bytes], first_id: int = 1) -> dict[str, str]:
    """Crawl-stage rows and stored objects for ``photos`` (name -> bytes); returns name -> sha."""
    engine = engine_for(settings.manifest_url)
    store = ObjectStore(settings)
    shas = {}
    with engine.begin() as conn:
        run_id = conn.execute(sa.text(
            "INSERT INTO crawl_runs (run_key, shop_base_url) VALUES (:k, 'http://shop') "
            "ON CONFLICT (run_key) DO UPDATE SET status = 'running' RETURNING id"),
            {"k": f"crawl-{first_id}"}).scalar_one()
        conn.execute(sa.text(
            "INSERT INTO categories (id, name, first_seen_run, last_seen_run) "
            "VALUES ('10120000', 'bed', :r, :r) ON CONFLICT DO NOTHING"), {"r": run_id})
        conn.execute(sa.text(
            "INSERT INTO products (id, category_id, name, source_url, first_seen_run, last_seen_run) "
            "VALUES (1, '10120000', 'p', 'http://shop/p/1', :r, :r) ON CONFLICT DO NOTHING"),
            {"r": run_id})
        for offset, (name, data) in enumerate(photos.items()):
            review_id = first_id + offset
            sha = hashlib.sha256(data).hexdigest()
            key, _ = store.put_image(data, "jpeg", sha)
            conn.execute(sa.text(
                "INSERT INTO reviews (id, product_id, source_url, first_seen_run) "
                "VALUES (:id, 1, 'http://shop/r', :r)"), {"id": review_id, "r": run_id})
            conn.execute(sa.text(
                "INSERT INTO images (sha256, object_key, size_bytes, width, height, format, "
                "source_url, review_id, product_id, first_seen_run) VALUES (:sha, :key, :size, "
                "400, 400, 'jpeg', 'http://cdn/x', :rid, 1, :r)"),
                {"sha": sha, "key": key, "size": len(data), "rid": review_id, "r": run_id})
            shas[name] = sha
    return shas


def verdicts(settings) -> dict[str, tuple[str, list[str], bool]]:
    with engine_for(settings.manifest_url).connect() as conn:
        return {r.sha256: (r.verdict, list(r.reasons), r.overridden) for r in conn.execute(
            sa.text("SELECT sha256, verdict, reasons, overridden FROM image_verdicts"))}


@pytest.fixture
def seeded(settings):
    photos = {"filled": studio_photo(0.8), "small": studio_photo(0.1),
              "room": shared_path(*ROOM).read_bytes(), "corrupt": b"\xff\xd8 not really a jpeg"}
    return seed(settings, photos)


def test_run_decides_every_rule_and_writes_a_report_with_each_reason(settings, seeded, model_path):
    detector = CountingDetector(model_path)
    stats = stage.run(settings, "night-1", detector=detector)

    assert stats["inspected"] == 4 and detector.calls == 3  # the corrupt file is never detected
    got = verdicts(settings)
    assert got[seeded["filled"]] == ("keep", [], False)
    assert got[seeded["small"]] == ("reject", ["occupancy"], False)
    assert got[seeded["room"]][0] == "reject" and "multi_product" in got[seeded["room"]][1]
    assert got[seeded["corrupt"]] == ("reject", ["unreadable"], False)
    assert stats["rejected_by_rule"]["multi_product"] >= 1 and stats["kept_images"] == 1

    store = ObjectStore(settings)
    assert stats["report_key"] == "reports/night-1/filter.html"
    assert stats["report_url"].endswith("/shoplens/runs/night-1/filter-report")  # the UI, not S3
    page = store.get_bytes(stats["report_key"]).decode()
    for reason in ("occupancy", "multi_product", "unreadable"):
        assert f'id="{reason}"' in page
    assert "data:image/jpeg;base64," in page

    with engine_for(settings.manifest_url).connect() as conn:
        row = conn.execute(sa.text(
            "SELECT d.passed, d.score, d.rule_version, d.detector_version, d.params, r.run_key "
            "FROM rule_decisions d JOIN filter_runs r ON r.id = d.run_id "
            "WHERE d.sha256 = :s AND d.rule = 'occupancy'"), {"s": seeded["small"]}).one()
    assert row.passed is False and row.score == pytest.approx(0.1, abs=0.03)
    assert row.detector_version == detector.version and row.run_key == "night-1"
    assert row.params["min_occupancy"] == 0.5


def test_threshold_change_redecides_from_stored_detections_without_the_detector(settings, seeded, model_path):
    stage.run(settings, "night-1", detector=CountingDetector(model_path))
    assert verdicts(settings)[seeded["small"]][0] == "reject"

    idle = CountingDetector(model_path)
    idle.forbidden = True
    stats = stage.run(settings.with_overrides(filter_min_occupancy=0.05), "night-2", detector=idle)

    assert stats["inspected"] == 0 and stats["decided"] == 4 and idle.calls == 0
    assert verdicts(settings)[seeded["small"]] == ("keep", [], False)
    with engine_for(settings.manifest_url).connect() as conn:
        history = conn.execute(sa.text(
            "SELECT passed FROM rule_decisions WHERE sha256 = :s AND rule = 'occupancy' "
            "ORDER BY run_id"), {"s": seeded["small"]}).scalars().all()
    assert history == [False, True]  # the first decision stays in the history

    # Same thresholds again: nothing to decide.
    assert stage.run(settings.with_overrides(filter_min_occupancy=0.05), "night-3",
                     detector=idle)["decided"] == 0


def test_a_new_rules_version_redecides_every_image_without_the_detector(settings, seeded, model_path,
                                                                       monkeypatch):
    stage.run(settings, "night-1", detector=CountingDetector(model_path))
    idle = CountingDetector(model_path)
    idle.forbidden = True
    assert stage.run(settings, "night-2", detector=idle)["decided"] == 0  # nothing changed

    monkeypatch.setattr(stage.rules, "RULES_VERSION", "rules-next")
    stats = stage.run(settings, "night-3", detector=idle)

    assert stats["inspected"] == 0 and stats["decided"] == 4 and idle.calls == 0
    with engine_for(settings.manifest_url).connect() as conn:
        versions = conn.execute(sa.text(
            "SELECT DISTINCT d.rule_version FROM rule_decisions d JOIN filter_runs r "
            "ON r.id = d.run_id WHERE r.run_key = 'night-3'")).scalars().all()
    assert versions == ["rules-next"]


def test_incremental_run_inspects_only_new_images(settings, model_path):
    seed(settings, {"a": studio_photo(0.8)})
    detector = CountingDetector(model_path)
    assert stage.run(settings, "night-1", detector=detector)["inspected"] == 1
    new = seed(settings, {"b": studio_photo(0.7), "c": studio_photo(0.05)}, first_id=100)
    stats = stage.run(settings, "night-2", detector=detector)
    assert stats["inspected"] == 2 and detector.calls == 3 and stats["decided"] == 2
    with engine_for(settings.manifest_url).connect() as conn:
        inspected = set(conn.execute(sa.text(
            "SELECT sha256 FROM detections d JOIN filter_runs r ON r.id = d.run_id "
            "WHERE r.run_key = 'night-2'")).scalars())
    assert inspected == set(new.values())


def test_overrides_win_over_automatic_decisions(settings, seeded, model_path):
    stage.run(settings, "night-1", detector=CountingDetector(model_path))
    set_override(settings.manifest_url, seeded["small"], "keep", "close-up crop is fine", "alice")
    set_override(settings.manifest_url, seeded["filled"], "reject", "shows the box only", "bob")
    got = verdicts(settings)
    assert got[seeded["small"]] == ("keep", ["override: close-up crop is fine"], True)
    assert got[seeded["filled"]] == ("reject", ["override: shows the box only"], True)
    # A later run does not undo an override.
    stage.run(settings.with_overrides(filter_min_occupancy=0.9), "night-2",
              detector=CountingDetector(model_path))
    assert verdicts(settings)[seeded["small"]][:2] == ("keep", ["override: close-up crop is fine"])
    with pytest.raises(OverrideError, match="reason"):
        set_override(settings.manifest_url, seeded["small"], "keep", "  ")
    with pytest.raises(OverrideError, match="no image"):
        set_override(settings.manifest_url, "0" * 64, "keep", "x")


def test_override_cli_writes_the_table(settings, seeded):
    env = {"SHOPLENS_MANIFEST_URL": settings.manifest_url, "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "dataset", "override", seeded["room"], "--keep",
                           "--reason", "one product set"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert verdicts(settings)[seeded["room"]] == ("keep", ["override: one product set"], True)
    refused = subprocess.run([sys.executable, "-m", "dataset", "override", seeded["room"], "--reject"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "reason is required" in refused.stderr


def test_kept_images_lists_kept_photos_that_are_not_duplicates(settings, seeded, model_path):
    copy = seed(settings, {"copy": studio_photo(0.79)}, first_id=50)["copy"]  # a near-duplicate
    stage.run(settings, "night-1", detector=CountingDetector(model_path))
    kept_sql = sa.text("SELECT sha256 FROM kept_images ORDER BY sha256")
    with engine_for(settings.manifest_url).begin() as conn:
        for sha in seeded.values():
            conn.execute(sa.text(
                "INSERT INTO image_dedup (sha256, cluster_id, threshold) VALUES (:s, :s, 25)"),
                {"s": sha})
        assert conn.execute(kept_sql).scalars().all() == [seeded["filled"]]  # copy: not deduped yet
        conn.execute(sa.text(
            "INSERT INTO image_dedup (sha256, cluster_id, duplicate_of, distance, threshold) "
            "VALUES (:c, :s, :s, 1, 25)"), {"c": copy, "s": seeded["filled"]})
        assert verdicts(settings)[copy][0] == "keep"
        assert conn.execute(kept_sql).scalars().all() == [seeded["filled"]]


def noise_photo() -> bytes:
    """Cluttered everywhere (no plain border) and nothing the detector can name."""
    import numpy as np
    pixels = np.random.default_rng(5).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    return jpeg(Image.fromarray(pixels))


def test_cli_prints_one_json_object_per_image(tmp_path, model_path):
    filled, small, noise = tmp_path / "filled.jpg", tmp_path / "small.jpg", tmp_path / "noise.jpg"
    filled.write_bytes(studio_photo(0.8))
    small.write_bytes(studio_photo(0.1))
    noise.write_bytes(noise_photo())
    banana = shared_path("datasets", "grocery", "train", "Fruit", "Banana", "Banana_001.jpg")
    images = [str(filled), str(small), str(banana), str(noise)]
    done = subprocess.run(
        [sys.executable, "-m", "dataset", "filter", "--json", *images],
        cwd=REPO, env={"SHOPLENS_DETECTOR_MODEL_PATH": str(model_path), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["image"] for line in lines] == images
    for line in lines:
        assert set(line) == {"image", "verdict", "reasons", "occupancy", "products", "boxes"}
        assert isinstance(line["occupancy"], float)
    # No product found on a cluttered background: occupancy 0.0, and the rule passes (default).
    assert lines[3]["occupancy"] == 0.0 and lines[3]["products"] == 0
    assert "occupancy" not in lines[3]["reasons"]
    assert lines[0]["verdict"] == "keep" and lines[0]["occupancy"] == pytest.approx(0.8, abs=0.05)
    assert lines[1]["verdict"] == "reject" and lines[1]["reasons"] == ["occupancy"]
    assert lines[2]["products"] == 1 and lines[2]["boxes"][0]["label"] == "banana"
    assert set(lines[2]["boxes"][0]) == {"label", "score", "box"}


def _run_with_terminal_stderr(args: list[str], env: dict) -> tuple[int, str, str]:
    """Run a command whose stderr is a pseudo-terminal (as in an interactive shell) and stdout a
    pipe; returns (exit code, stdout, what the terminal showed)."""
    import os
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    shown = b""
    while True:  # drain the terminal while the command runs: a full pty would block it
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the command exited and closed its end
                chunk = b""
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    out = proc.stdout.read().decode()
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, out, shown.decode(errors="replace")


def test_cli_shows_a_progress_bar_on_a_terminal_and_none_in_json_mode(tmp_path, model_path):
    """On a terminal the text mode draws a bar on stderr while the verdicts go to stdout; --json
    draws none, so stderr carries no bar characters."""
    photos = []
    for k, fill in enumerate((0.8, 0.1, 0.5)):
        photos.append(tmp_path / f"p{k}.jpg")
        photos[-1].write_bytes(studio_photo(fill))
    env = {"SHOPLENS_DETECTOR_MODEL_PATH": str(model_path), "PATH": "/usr/bin:/bin",
           "TERM": "xterm", "COLUMNS": "120"}
    base = [sys.executable, "-m", "dataset", "filter"]
    code, out, terminal = _run_with_terminal_stderr(base + [str(p) for p in photos], env)
    assert code == 0, terminal
    assert len(out.splitlines()) == 3 and "━" not in out  # the bar stays off stdout
    assert "━" in terminal and "3/3" in terminal and "filter" in terminal

    code, out, terminal = _run_with_terminal_stderr(base + ["--json"] + [str(p) for p in photos], env)
    assert code == 0, terminal
    assert [json.loads(line)["image"] for line in out.splitlines()] == [str(p) for p in photos]
    assert "━" not in terminal and "3/3" not in terminal and terminal.strip() == ""
