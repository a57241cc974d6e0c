"""shoplens nightly: crawl -> dedup -> filter -> build a dataset version, and refresh the search
index beside the build (a failed dataset check keeps no new product out of search).

Thin by design: each task calls one step of a stage package (testable without Airflow), the
decisions through ``ops.run_stage`` (duration, volume). Hashing, detection and the dataset export
are mapped over planned batches / shards (a retry redoes one). Params override the defaults.
"""
from __future__ import annotations

import os
from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from shoplens.assets import DATASET_VERSION
from shoplens.ops import FailureAlert

# Crawls at once: the DAG's cap per run; the `shop` pool (same size) caps them across runs.
CRAWL_PARALLELISM = int(os.environ.get("SHOPLENS_CRAWL_PARALLELISM", "2"))
_RETRY_S = float(os.environ.get("SHOPLENS_TASK_RETRY_DELAY", "20"))  # first retry; e2e tests: 2
default_args = {"retries": 2, "retry_delay": timedelta(seconds=_RETRY_S), "retry_exponential_backoff": True,
                "max_retry_delay": timedelta(minutes=10), "on_failure_callback": FailureAlert()}


def _settings():  # from the worker's SHOPLENS_* environment, overridden by this run's Params
    from shoplens.config import Settings
    params = get_current_context()["params"]
    keys = ("categories", "best_n", "photo_cap_per_product", "shop_base_url")
    return Settings.from_env().with_overrides(**{k: params.get(k) for k in keys if params.get(k)})


def _stage(name: str, entry, *args, settings=None, **kwargs):  # recording the stage's metrics
    from shoplens import ops
    settings, run_key = settings or _settings(), get_current_context()["run_id"]
    return ops.run_stage(settings, run_key, name, entry, settings, *args, run_key, **kwargs)


@dag(
    dag_id="shoplens_nightly",
    # Nightly at 02:00 KST; SHOPLENS_NIGHTLY_SCHEDULE overrides it ("" = manual/API runs only).
    schedule=os.environ.get("SHOPLENS_NIGHTLY_SCHEDULE", "0 2 * * *") or None,
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"), tags=["shoplens"],
    catchup=False, max_active_runs=1, default_args=default_args, on_failure_callback=FailureAlert(),
    params={
        "categories": Param(None, type=["null", "array"], items={"type": "string", "pattern": "^[0-9]+$"},
                            description="Category ids to crawl; empty = configured defaults"),
        "best_n": Param(None, type=["null", "integer"], minimum=1, description="Best-N products per category"),
        "photo_cap_per_product": Param(None, type=["null", "integer"], minimum=1),
        "shop_base_url": Param(None, type=["null", "string"], description="Shop base URL; empty = configured"),
    },
)
def shoplens_nightly():
    @task
    def start_run() -> list[list[str]]:  # the category groups: one crawl process each
        from crawler import plan_groups, start_run as begin
        begin(settings := _settings(), get_current_context()["run_id"])
        return plan_groups(settings)

    @task(max_active_tis_per_dagrun=CRAWL_PARALLELISM, pool="shop")
    def crawl_categories(category_ids: list[str]) -> dict:
        from crawler import crawl_categories as crawl
        # Each crawl process gets its share of the per-host budget; a failed category fails it.
        return _stage(f"crawl:{','.join(category_ids)}", crawl, category_ids,
                      settings=_settings().share_of_shop(CRAWL_PARALLELISM))

    @task
    def finish_crawl(per_group: list[dict]) -> dict:
        from crawler import finish_run
        return _stage("crawl", finish_run)

    @task
    def dedup_plan(_crawl: dict) -> list[dict]:
        from dataset.dedup import stage
        return [b.as_dict() for b in stage.plan_batches(_settings(), get_current_context()["run_id"])]

    @task
    def dedup_hash(batch: dict) -> dict:
        from dataset.dedup import stage
        return stage.hash_batch(_settings(), batch)

    @task(trigger_rule="none_failed")  # runs after zero batches (a night without new photos) too
    def dedup(hashed: list[dict]) -> dict:
        from dataset.dedup import stage
        return _stage("dedup", stage.decide, hashing=list(hashed))

    @task
    def filter_plan(_dedup: dict) -> list[dict]:
        from dataset.filter import stage
        return [b.as_dict() for b in stage.plan_batches(_settings(), get_current_context()["run_id"])]

    @task
    def filter_detect(batch: dict) -> dict:
        from dataset.filter import stage
        return stage.detect_batch(_settings(), batch)

    @task(trigger_rule="none_failed")
    def filter_photos(detected: list[dict]) -> dict:
        from dataset.filter import stage
        return _stage("filter", stage.decide, detection=list(detected))

    @task  # the version's members, splits and checks (stored); its shard jobs
    def build_plan(_filter: dict) -> list[dict]:
        from dataset.build import stage
        from dataset.build.checks import DataQualityError
        try:
            return _stage("build_plan", stage.decide)["shards"]
        except DataQualityError as exc:  # the data is wrong: a retry would fail the same way
            raise AirflowFailException(str(exc)) from exc

    @task
    def export_shard(job: dict) -> dict:
        from dataset.build import export
        return export.export_shard(_settings(), job)

    @task(outlets=[DATASET_VERSION], trigger_rule="none_failed")  # also after zero shard jobs
    def build_dataset(_exported: list[dict]) -> dict:
        from dataset.build import stage
        stats = _stage("build", stage.finish)
        get_current_context()["outlet_events"][DATASET_VERSION].extra = {
            "version": stats["version_id"], "uri": stats["uri"], "unchanged": stats["unchanged"]}
        return stats

    @task(trigger_rule="all_done", retries=0)  # fails the version a failed shard job left
    def close_build(_exported: list[dict]) -> dict:
        from dataset.build import stage
        return _stage("close_build", stage.abandon_incomplete)

    @task
    def refresh_search_index(_filter: dict) -> dict:
        from modeling import catalogue_index
        return _stage("search_index", catalogue_index.refresh)

    @task  # the teardown: it runs after a failure too; the stages decide the run's state
    def run_summary() -> dict:
        from shoplens import ops
        return ops.summarize_dag_run(_settings(), get_current_context())

    categories = start_run()
    crawled = finish_crawl(crawl_categories.expand(category_ids=categories))
    deduped = dedup(dedup_hash.expand(batch=dedup_plan(crawled)))
    filtered = filter_photos(filter_detect.expand(batch=filter_plan(deduped)))
    exported = export_shard.expand(job=build_plan(filtered))
    built = [build_dataset(exported), close_build(exported), refresh_search_index(filtered)]
    built >> run_summary().as_teardown(setups=categories)


shoplens_nightly()
