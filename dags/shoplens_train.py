"""shoplens training: retrain and evaluate the ensemble and the search embedding whenever a new
dataset version lands.

Data-aware: scheduled on the dataset-version Asset that the nightly build emits. Both tasks run
on the ``training`` queue so that a GPU worker can take them, side by side (neither needs the
other). Like the nightly DAG, training records its duration and volume through
``ops.run_stage`` (stages ``train`` and ``train_embedding``, under this DAG run's id) and
failures alert through ``FailureAlert``.
"""
from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

from shoplens.assets import DATASET_VERSION
from shoplens.ops import FailureAlert


@dag(
    dag_id="shoplens_train",
    schedule=[DATASET_VERSION],
    start_date=pendulum.datetime(2026, 1, 1, tz="Asia/Seoul"),
    catchup=False,
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(minutes=2),
                  "on_failure_callback": FailureAlert()},
    on_failure_callback=FailureAlert(),
    tags=["shoplens"],
    params={"dataset_version": Param("", type="string",
                                     description="Version to train on; empty = the triggering or latest version")},
)
def shoplens_train():
    @task.short_circuit
    def pick_version() -> str | None:
        """The version to train on; None (skip training) when the night produced no new version."""
        ctx = get_current_context()
        if ctx["params"].get("dataset_version"):
            return ctx["params"]["dataset_version"]
        for events in ctx["triggering_asset_events"].values():
            for event in reversed(list(events)):
                if event.extra.get("version"):
                    return None if event.extra.get("unchanged") else event.extra["version"]
        from dataset.build.stage import latest_version_id
        from shoplens.config import Settings

        return latest_version_id(Settings.from_env())

    @task(queue="training", execution_timeout=timedelta(hours=6))
    def train_and_evaluate(version: str) -> dict:
        from modeling import train
        from shoplens import ops
        from shoplens.config import Settings

        settings = Settings.from_env()
        return ops.run_stage(settings, get_current_context()["run_id"], "train", train.run,
                             settings, version)

    @task(queue="training", execution_timeout=timedelta(hours=2))
    def train_embedding(version: str) -> dict:
        from modeling import train_embedding as training
        from shoplens import ops
        from shoplens.config import Settings

        settings = Settings.from_env()
        return ops.run_stage(settings, get_current_context()["run_id"], "train_embedding",
                             training.run, settings, version)

    version = pick_version()
    train_and_evaluate(version)
    train_embedding(version)


shoplens_train()
