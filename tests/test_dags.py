"""The DAG files: they import cleanly, stay thin, and wire the stages in the documented order."""
import ast
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert {"shoplens_nightly", "shoplens_train"} <= set(dagbag.dags)


def test_nightly_runs_crawl_then_dedup_filter_build(dagbag):
    dag = dagbag.dags["shoplens_nightly"]
    order = ["start_run", "crawl_categories", "finish_crawl", "dedup_plan", "dedup_hash", "dedup",
             "filter_plan", "filter_detect", "filter_photos", "build_plan", "export_shard",
             "build_dataset"]
    for upstream, downstream in zip(order, order[1:]):
        assert downstream in dag.get_task(upstream).downstream_task_ids, (upstream, downstream)
    assert dag.catchup is False
    assert dag.timetable.expression == "0 2 * * *"


def test_the_search_index_is_refreshed_after_the_filter_and_before_the_run_summary(dagbag):
    """New kept photos reach search the same night; a dataset build failing its data-quality
    checks does not hold the refresh back (it is not downstream of the build)."""
    dag = dagbag.dags["shoplens_nightly"]
    refresh = dag.get_task("refresh_search_index")
    assert set(refresh.upstream_task_ids) == {"filter_photos"}
    assert "run_summary" in refresh.downstream_task_ids
    assert refresh.retries >= 1 and refresh.on_failure_callback


def test_crawl_is_mapped_over_the_planned_category_groups_and_capped(dagbag):
    """One task instance (one crawl process) per category group that start_run plans."""
    crawl = dagbag.dags["shoplens_nightly"].get_task("crawl_categories")
    assert type(crawl).__name__.endswith("MappedOperator")
    assert set(crawl.op_kwargs_expand_input.value) == {"category_ids"}
    assert set(crawl.upstream_task_ids) == {"start_run"}
    assert crawl.pool == "shop"
    from shoplens.dev.airflow_stack import AirflowStack
    from shoplens.config import Settings

    assert crawl.max_active_tis_per_dagrun == Settings.from_env().crawl_parallelism
    assert AirflowStack(home=REPO, db_url="", api_port=0).shop_pool_slots == crawl.max_active_tis_per_dagrun
    assert crawl.retries >= 1


@pytest.mark.parametrize("plan, batches, decide, key", [
    ("dedup_plan", "dedup_hash", "dedup", "batch"),
    ("filter_plan", "filter_detect", "filter_photos", "batch"),
    ("build_plan", "export_shard", "build_dataset", "job")])
def test_per_photo_work_is_mapped_over_the_planned_batches_and_decided_once(dagbag, plan, batches,
                                                                            decide, key):
    """Hashing, detection and the dataset export run as one mapped task instance per planned
    batch or shard job (any worker takes any, a retry redoes one); the step over everything
    stored (clustering, rules, completing the version) is one task that also runs when the plan
    had nothing to do (a zero-length map is skipped, not failed)."""
    dag = dagbag.dags["shoplens_nightly"]
    mapped = dag.get_task(batches)
    assert type(mapped).__name__.endswith("MappedOperator")
    assert set(mapped.upstream_task_ids) == {plan}
    assert set(mapped.op_kwargs_expand_input.value) == {key}
    assert mapped.retries >= 1
    decision = dag.get_task(decide)
    assert not type(decision).__name__.endswith("MappedOperator")
    assert set(decision.upstream_task_ids) == {batches}
    assert decision.trigger_rule == "none_failed"


def test_the_build_plan_hands_on_only_its_shard_jobs_and_fails_bad_data_without_retries(
        dagbag, manifest_url, monkeypatch):
    """build_plan records the build's decision as stage 'build_plan' and passes on (to XCom,
    which maps export_shard) the small shard jobs only; a data-quality failure is final."""
    from airflow.sdk.exceptions import AirflowFailException

    from dataset.build import stage
    from dataset.build.checks import DataQualityError
    from shoplens import ops
    from shoplens.config import Settings

    jobs = [{"version_id": "v0004", "index": 0, "count": 1,
             "shards": ["tfrecords/train-00000-of-00001.tfrecord"]}]
    monkeypatch.setattr(stage, "decide", lambda settings, run_key: {
        "build": {"version_id": "v0004", "counts": {"images": 12}}, "shards": jobs})
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    task = dagbag.dags["shoplens_nightly"].get_task("build_plan")
    monkeypatch.setitem(task.python_callable.__globals__, "get_current_context",
                        lambda: {"run_id": "scheduled__2026-01-05", "params": {}})
    assert task.python_callable({"kept": 12}) == jobs
    [row] = ops.stage_metrics(Settings(manifest_url=manifest_url), "scheduled__2026-01-05")
    assert (row["stage"], row["volume"]) == ("build_plan", {"build.counts.images": 12})

    def bad_data(settings, run_key):
        raise DataQualityError("dataset version v0004 failed 1 data-quality check(s)")

    monkeypatch.setattr(stage, "decide", bad_data)
    with pytest.raises(AirflowFailException, match="failed 1 data-quality check"):
        task.python_callable({"kept": 12})


def test_manual_runs_can_override_categories_best_n_caps_and_shop(dagbag):
    params = dagbag.dags["shoplens_nightly"].params
    assert {"categories", "best_n", "photo_cap_per_product", "shop_base_url"} <= set(params.keys())


def test_dataset_build_emits_the_asset_that_schedules_training(dagbag):
    from shoplens.assets import DATASET_VERSION

    build = dagbag.dags["shoplens_nightly"].get_task("build_dataset")
    assert DATASET_VERSION in build.outlets
    train_dag = dagbag.dags["shoplens_train"]
    assert train_dag.get_task("train_and_evaluate").queue == "training"
    # The search embedding trains next to the ensemble, on the same version, neither waiting.
    embedding = train_dag.get_task("train_embedding")
    assert embedding.queue == "training" and embedding.upstream_task_ids == {"pick_version"}
    assert "train_embedding" not in train_dag.get_task("train_and_evaluate").downstream_task_ids
    assert type(train_dag.timetable).__name__ == "AssetTriggeredTimetable"
    assert "shoplens_dataset_version" in repr(train_dag.timetable.asset_condition)


@pytest.mark.parametrize("path", sorted((REPO / "dags").glob("*.py")), ids=lambda p: p.name)
def test_dag_files_import_nothing_heavy_at_top_level(path):
    tree = ast.parse(path.read_text())
    top_imports = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_imports |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_imports.add(node.module.split(".")[0])
    assert not top_imports & {"tensorflow", "keras", "scrapy", "onnxruntime", "crawler", "dataset",
                              "modeling", "playwright", "numpy", "PIL"}
    assert len(path.read_text().splitlines()) < 150, "DAG files stay short; logic lives in packages"


def test_the_run_summary_always_runs_but_never_hides_a_failure(dagbag):
    dag = dagbag.dags["shoplens_nightly"]
    summary = dag.get_task("run_summary")
    assert summary.is_teardown and {"build_dataset", "refresh_search_index"} <= summary.upstream_task_ids
    assert dag.get_task("start_run").is_setup
    assert all(t.on_failure_callback for t in dag.tasks if t.task_id != "run_summary")


def test_training_alerts_on_failure_like_the_nightly(dagbag):
    from shoplens.ops import FailureAlert

    for dag_id in ("shoplens_nightly", "shoplens_train"):
        dag = dagbag.dags[dag_id]
        callbacks = dag.on_failure_callback
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        assert any(isinstance(c, FailureAlert) for c in callbacks), dag_id
    train = dagbag.dags["shoplens_train"]
    assert all(t.on_failure_callback for t in train.tasks)


def test_training_records_its_duration_and_volume_as_a_stage(dagbag, manifest_url, monkeypatch):
    """train_and_evaluate runs modeling.train.run through ops.run_stage: a 'train' row in
    run_metrics under the training DAG run's id, with the returned stats as volume, and the
    stats passed on to XCom unchanged."""
    import modeling
    from shoplens import ops
    from shoplens.config import Settings

    trained = []

    def fake_run(settings, version):  # stands in for minutes of TensorFlow
        trained.append((settings.manifest_url, version))
        return {"model_id": "m7", "dataset_version": version, "seconds": 12.5}

    monkeypatch.setattr(modeling, "train", SimpleNamespace(run=fake_run), raising=False)
    monkeypatch.setitem(sys.modules, "modeling.train", modeling.train)
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    task = dagbag.dags["shoplens_train"].get_task("train_and_evaluate")
    monkeypatch.setitem(task.python_callable.__globals__, "get_current_context",
                        lambda: {"run_id": "asset_triggered__2026-01-03"})
    stats = task.python_callable("v0007")
    assert stats == {"model_id": "m7", "dataset_version": "v0007", "seconds": 12.5}
    assert trained == [(manifest_url, "v0007")]
    [row] = ops.stage_metrics(Settings(manifest_url=manifest_url), "asset_triggered__2026-01-03")
    assert (row["stage"], row["status"], row["volume"]) == ("train", "success", {"seconds": 12.5})


def test_embedding_training_records_its_own_stage(dagbag, manifest_url, monkeypatch):
    """train_embedding runs modeling.train_embedding.run through ops.run_stage: a
    'train_embedding' row in run_metrics under the training DAG run's id, stats passed on."""
    import modeling
    from shoplens import ops
    from shoplens.config import Settings

    trained = []

    def fake_run(settings, version):  # stands in for the backbone and the head's training
        trained.append(version)
        return {"model_id": "m8", "kind": "embedding", "seconds": 3.5}

    fake = SimpleNamespace(run=fake_run)
    monkeypatch.setattr(modeling, "train_embedding", fake, raising=False)
    monkeypatch.setitem(sys.modules, "modeling.train_embedding", fake)
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    task = dagbag.dags["shoplens_train"].get_task("train_embedding")
    assert task.on_failure_callback
    monkeypatch.setitem(task.python_callable.__globals__, "get_current_context",
                        lambda: {"run_id": "asset_triggered__2026-01-04"})
    assert task.python_callable("v0008") == {"model_id": "m8", "kind": "embedding", "seconds": 3.5}
    assert trained == ["v0008"]
    [row] = ops.stage_metrics(Settings(manifest_url=manifest_url), "asset_triggered__2026-01-04")
    assert (row["stage"], row["status"], row["volume"]) == ("train_embedding", "success",
                                                            {"seconds": 3.5})


def test_the_search_index_refresh_records_its_stage_metrics(dagbag, manifest_url, monkeypatch):
    """refresh_search_index runs modeling.catalogue_index.refresh(settings, run_key) through
    ops.run_stage: a 'search_index' row in run_metrics with the returned counts as volume."""
    from modeling import catalogue_index
    from shoplens import ops
    from shoplens.config import Settings

    calls = []

    def fake_refresh(settings, run_key):  # stands in for embedding the night's photos
        calls.append(run_key)
        return {"index_id": "si-1", "products": 3, "vectors": 10, "embedded": 3}

    monkeypatch.setattr(catalogue_index, "refresh", fake_refresh)
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    task = dagbag.dags["shoplens_nightly"].get_task("refresh_search_index")
    monkeypatch.setitem(task.python_callable.__globals__, "get_current_context",
                        lambda: {"run_id": "scheduled__2026-01-03", "params": {}})
    assert task.python_callable({"kept": 3})["vectors"] == 10
    assert calls == ["scheduled__2026-01-03"]
    [row] = ops.stage_metrics(Settings(manifest_url=manifest_url), "scheduled__2026-01-03")
    assert (row["stage"], row["status"]) == ("search_index", "success")
    assert row["volume"] == {"products": 3, "vectors": 10, "embedded": 3}


def test_a_shard_job_failing_for_good_fails_its_version_and_the_night(dagbag):
    """close_build runs once every shard job has ended, failed ones too (all_done), and fails the
    version they left; build_dataset (not run after a failed job) stays a leaf that decides the
    run's state, so the night fails even when close_build had nothing to do."""
    from airflow.models.dagrun import DagRun

    dag = dagbag.dags["shoplens_nightly"]
    close = dag.get_task("close_build")
    assert close.trigger_rule == "all_done" and close.retries == 0
    assert set(close.upstream_task_ids) == {"export_shard"}
    assert close.downstream_task_ids == {"run_summary"}
    assert dag.get_task("build_dataset").trigger_rule == "none_failed"

    @dataclass(frozen=True)
    class TI:
        task_id: str
        state: str | None = None

    leaves = DagRun._tis_for_dagrun_state(None, dag=dag, tis=[TI(t) for t in dag.task_ids])
    assert {ti.task_id for ti in leaves} == {"build_dataset", "close_build", "refresh_search_index"}


def test_the_run_summary_names_a_failed_batch_and_the_decisions_it_stopped(dagbag, manifest_url,
                                                                          monkeypatch):
    """A mapped batch records no stage row of its own: the teardown asks Airflow for the run's
    task states and the night's summary is failed, naming the batch by map index and the steps
    that never ran because of it (the decision waits for every batch: none_failed)."""
    from shoplens import ops
    from shoplens.config import Settings

    dag = dagbag.dags["shoplens_nightly"]
    run_id = "scheduled__2026-01-06"
    states = {"start_run": "success", "dedup_plan": "success", "dedup_hash_0": "success",
              "dedup_hash_1": "failed", "dedup_hash_2": "success", "dedup": "upstream_failed",
              "filter_plan": "upstream_failed", "run_summary": "running"}
    ti = SimpleNamespace(get_task_states=lambda dag_id, run_ids: {run_ids[0]: states}
                         if dag_id == "shoplens_nightly" else {})
    monkeypatch.setenv("SHOPLENS_MANIFEST_URL", manifest_url)
    task = dag.get_task("run_summary")
    monkeypatch.setitem(task.python_callable.__globals__, "get_current_context", lambda: {
        "run_id": run_id, "params": {}, "ti": ti, "dag": dag,
        "dag_run": SimpleNamespace(start_date=None)})

    summary = task.python_callable()

    missing = ["dedup (not run)", "dedup_hash[1]", "filter_plan (not run)"]
    assert (summary["status"], summary["failed_stages"]) == ("failed", missing)
    [row] = ops.stage_metrics(Settings(manifest_url=manifest_url), run_id)
    assert (row["stage"], row["status"], row["detail"]["failed_stages"]) == ("run", "failed", missing)
    assert dag.get_task("dedup").trigger_rule == dag.get_task("filter_photos").trigger_rule == "none_failed"


def test_failed_tasks_reads_map_indices_only_of_known_tasks():
    from shoplens.ops import failed_tasks

    ids = ["export_shard", "build_dataset", "step_2", "step"]
    assert failed_tasks({"export_shard_12": "failed", "build_dataset": "upstream_failed",
                         "step_2": "failed", "export_shard_3": "success", "close_build": None},
                        ids) == ["build_dataset (not run)", "export_shard[12]", "step_2"]
