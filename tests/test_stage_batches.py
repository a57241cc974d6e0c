"""Dedup hashing and filter detection in planned batches: what a mapped Airflow task runs.

The plan cuts the night's photos into sha256 ranges; each batch is one transaction of upserts, so
a batch can be retried, re-run or run in any order (by any worker) and the manifest ends the same
as one process running the whole stage.
"""
from __future__ import annotations

import random

import pytest
import sqlalchemy as sa

from dataset.dedup import stage as dedup
from dataset.filter import stage as filter_stage
from shoplens.vision.detector import Detector
from shoplens import batches
from shoplens.batches import Batch
from shoplens.manifest import engine_for
from tests.conftest import shared_path
from tests.test_dedup_stage import Crawl, jpeg, photo


# --------------------------------------------------------------------------------------------
# Planning (no services)
# --------------------------------------------------------------------------------------------
def shas(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return sorted(f"{rng.getrandbits(256):064x}" for _ in range(n))


def test_a_plan_is_deterministic_and_puts_every_photo_in_exactly_one_batch():
    """Same input, same plan; the ranges tile the whole sha256 space (first open below, last open
    above), so each planned photo, and any photo stored after planning, is in one batch."""
    todo = shas(1003)
    plan = batches.plan(todo, stage="dedup", run_key="night", size=100, version="v1")
    assert plan == batches.plan(list(todo), stage="dedup", run_key="night", size=100, version="v1")
    assert [b.planned for b in plan] == [100] * 10 + [3]
    assert plan[0].lo is None and plan[-1].hi is None
    assert all(a.hi == b.lo for a, b in zip(plan, plan[1:]))
    for sha in todo + shas(200, seed=1) + ["0" * 64, "f" * 64]:
        assert sum(b.covers(sha) for b in plan) == 1, sha
    assert [sum(b.covers(s) for s in todo) for b in plan] == [b.planned for b in plan]
    assert {(b.index, b.count) for b in plan} == {(k, 11) for k in range(11)}


def test_a_huge_night_grows_its_batches_instead_of_exceeding_the_mapping_limit():
    plan = batches.plan(shas(5000), stage="filter", run_key="n", size=10, version="v", max_batches=7)
    assert len(plan) <= 7 and sum(b.planned for b in plan) == 5000


def test_nothing_to_do_plans_no_batch_and_unsorted_input_is_refused():
    assert batches.plan([], stage="dedup", run_key="n", size=10, version="v") == []
    with pytest.raises(ValueError, match="sorted"):
        batches.plan(["b" * 64, "a" * 64], stage="dedup", run_key="n", size=10, version="v")


def test_a_batch_travels_as_a_plain_dict_and_selects_its_range_in_sql():
    """An XCom value is JSON: the dict form rebuilds the same batch."""
    batch = batches.plan(shas(30), stage="dedup", run_key="n", size=10, version="v")[1]
    assert Batch.of(batch.as_dict()) == batch
    condition = str(batch.where(sa.column("sha256")).compile(compile_kwargs={"literal_binds": True}))
    assert f"sha256 >= '{batch.lo}'" in condition and f"sha256 < '{batch.hi}'" in condition


# --------------------------------------------------------------------------------------------
# Dedup batches against a real manifest and object store
# --------------------------------------------------------------------------------------------
@pytest.fixture
def crawl(manifest_url, s3_settings):
    return Crawl(manifest_url, s3_settings)


@pytest.fixture
def settings(manifest_url, s3_settings):
    return s3_settings.with_overrides(manifest_url=manifest_url, dedup_hash_batch=3, dedup_embedding=True,
                                      filter_detect_batch=3,
                                      detector_model_path=str(shared_path("models", "yolox_nano.onnx")))


@pytest.fixture
def night(crawl):
    """Ten photos, two of them near-duplicates of others, across two products."""
    photos = [jpeg(photo(k)) for k in range(8)]
    photos += [jpeg(photo(1), quality=50), jpeg(photo(5).resize((160, 120)))]
    return [crawl.add(data, product=1 + k % 2) for k, data in enumerate(photos)]


def rows(settings, table: str, without: tuple[str, ...]) -> dict[str, dict]:
    """Every row of ``table`` by sha256 (and rule), without the columns that name when or by which
    run the row was written."""
    with engine_for(settings.manifest_url).connect() as conn:
        found = conn.execute(sa.text(f"SELECT * FROM {table}")).mappings().all()
    keyed = {}
    for row in found:
        key = row["sha256"] + (f"/{row['rule']}" if "rule" in row else "")
        keyed[key] = {k: v for k, v in row.items() if k not in without}
    return keyed


def hash_rows(settings):
    return rows(settings, "image_hashes", ("computed_at",))


def cluster_rows(settings):
    return rows(settings, "image_dedup", ("decided_at",))


def test_the_dedup_plan_covers_every_unhashed_photo_once(settings, night):
    plan = dedup.plan_batches(settings, "crawl-1")
    assert [b.planned for b in plan] == [3, 3, 3, 1]
    assert {b.version for b in plan} == {dedup.work_version(settings)}
    assert sorted(night) == sorted(sha for sha in night for b in plan if b.covers(sha))
    assert plan == dedup.plan_batches(settings, "crawl-1")


def test_rerunning_a_hash_batch_writes_the_same_rows(settings, night):
    """A retried or duplicated batch (a worker killed after its commit) changes nothing."""
    batch = dedup.plan_batches(settings, "crawl-1")[1]
    first = dedup.hash_batch(settings, batch.as_dict())
    after_first = hash_rows(settings)
    again = dedup.hash_batch(settings, batch.as_dict())
    assert first["hashed"] == 3 and again["hashed"] == 0
    assert hash_rows(settings) == after_first
    assert set(after_first) == {sha for sha in night if batch.covers(sha)}


def test_a_hash_batch_failing_midway_leaves_no_row_of_it(settings, night, monkeypatch):
    """The batch's rows are written in one transaction at its end: a crash (here a worker error
    on the batch's second photo) writes nothing, and the retry does the whole batch."""
    batch = dedup.plan_batches(settings, "crawl-1")[0]
    real, calls = dedup.hashes_of_image, []

    def crash_on_second(image, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError("worker killed")
        return real(image, **kwargs)

    monkeypatch.setattr(dedup, "hashes_of_image", crash_on_second)
    with pytest.raises(MemoryError):
        dedup.hash_batch(settings, batch)
    assert hash_rows(settings) == {} and rows(settings, "image_embeddings", ()) == {}
    monkeypatch.setattr(dedup, "hashes_of_image", real)
    assert dedup.hash_batch(settings, batch)["hashed"] == 3


def test_batches_in_any_order_then_decide_give_the_rows_of_one_run(settings, night, crawl):
    """Batches taken by different workers in any order end in the same hashes and clusters as
    ``run`` doing plan + every batch + decide in one process."""
    plan = dedup.plan_batches(settings, "crawl-1")
    shuffled = plan[::-1]
    random.Random(5).shuffle(shuffled)
    results = [dedup.hash_batch(settings, b) for b in shuffled]
    stats = dedup.decide(settings, "crawl-1", results)
    sharded = hash_rows(settings), cluster_rows(settings)
    assert stats["hashed"] == len(night) and stats["batches"] == len(plan)
    assert stats["duplicates"] == 2

    with crawl.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM image_dedup"))
        conn.execute(sa.text("DELETE FROM image_hashes"))
        conn.execute(sa.text("DELETE FROM image_embeddings"))
    whole = dedup.run(settings, "crawl-1")
    assert (hash_rows(settings), cluster_rows(settings)) == sharded
    assert {k: whole[k] for k in ("hashed", "clusters", "duplicates", "batches")} == \
        {k: stats[k] for k in ("hashed", "clusters", "duplicates", "batches")}


# --------------------------------------------------------------------------------------------
# Filter batches (the real detector)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def detector():
    return Detector(shared_path("models", "yolox_nano.onnx"), min_score=0.05, threads=1)


class FailingDetector:
    """The real detector, failing on its n-th image."""

    def __init__(self, inner: Detector, fail_at: int):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.version, self.min_score = inner.version, inner.min_score

    def detect_fitted(self, *args):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("onnxruntime crashed")
        return self.inner.detect_fitted(*args)


def detection_rows(settings):
    return rows(settings, "detections", ("created_at", "run_id"))


def decision_rows(settings):
    return rows(settings, "rule_decisions", ("id", "decided_at", "run_id"))


def test_a_detect_batch_failing_midway_leaves_no_row_and_its_rerun_writes_the_same_rows(
        settings, night, detector):
    plan = filter_stage.plan_batches(settings, "night-1", detector.version)
    assert sorted(night) == sorted(sha for sha in night for b in plan if b.covers(sha))
    with pytest.raises(RuntimeError, match="onnxruntime crashed"):
        filter_stage.detect_batch(settings, plan[0], FailingDetector(detector, fail_at=3))
    assert detection_rows(settings) == {}
    assert filter_stage.detect_batch(settings, plan[0], detector)["inspected"] == 3
    done = detection_rows(settings)
    assert filter_stage.detect_batch(settings, plan[0], detector)["inspected"] == 0
    assert detection_rows(settings) == done and len(done) == 3


def test_a_batch_planned_for_another_detector_is_refused(settings, night, detector):
    batch = filter_stage.plan_batches(settings, "night-1", "yolox_nano-older+decoder")[0]
    with pytest.raises(RuntimeError, match="plan again"):
        filter_stage.detect_batch(settings, batch, detector)


def test_filter_batches_in_any_order_then_decide_give_the_rows_of_one_run(settings, night, crawl,
                                                                        detector):
    plan = filter_stage.plan_batches(settings, "night-1", detector.version)
    results = [filter_stage.detect_batch(settings, b, detector) for b in reversed(plan)]
    stats = filter_stage.decide(settings, "night-1", results)
    sharded = detection_rows(settings), decision_rows(settings)
    assert stats["inspected"] == stats["decided"] == len(night)

    with crawl.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM rule_decisions"))
        conn.execute(sa.text("DELETE FROM detections"))
    whole = filter_stage.run(settings, "night-1", detector=detector)
    assert (detection_rows(settings), decision_rows(settings)) == sharded
    assert whole["kept_images"] == stats["kept_images"]
