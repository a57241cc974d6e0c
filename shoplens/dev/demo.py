"""``make demo`` (``shoplens demo``): the whole nightly pipeline end to end on embedded defaults.

Starts (bound to 127.0.0.1) PostgreSQL/Redis if the machine has none, SeaweedFS as the S3
server, the replica shop with its generated photo set, and a real Airflow (api-server, scheduler,
dag-processor, triggerer, one Celery worker); triggers the nightly DAG over the REST API, waits for
it and for the retraining it triggers, prints the summary and one example search (a kept photo's
top-3 from the search index the night built), and stops everything it started.
Running it twice works: the second night is incremental.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shoplens.cli import argument_parser, command
from shoplens.dev.airflow_stack import TaskProgress, default_stack
from shoplens.dev.services import LOCALHOST, down, stop_pid, up, wait_for_port

REPLICA_PORT, CDN_PORT, AIRFLOW_PORT = 8611, 8612, 8780


def demo_env(s3_endpoint: str) -> dict[str, str]:
    env = {
        "SHOPLENS_SHOP_BASE_URL": f"http://{LOCALHOST}:{REPLICA_PORT}",
        "SHOPLENS_ALLOWED_HOSTS": f"{LOCALHOST}:{CDN_PORT}",
        "SHOPLENS_S3_ENDPOINT": s3_endpoint,
        "SHOPLENS_MANIFEST_URL": os.environ.get(
            "SHOPLENS_MANIFEST_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/shoplens_demo"),
        # The replica is ours and local: be quick, but keep every politeness mechanism switched on.
        "SHOPLENS_DOWNLOAD_DELAY": os.environ.get("SHOPLENS_DOWNLOAD_DELAY", "0.02"),
        "SHOPLENS_CONCURRENT_PER_HOST": os.environ.get("SHOPLENS_CONCURRENT_PER_HOST", "8"),
    }
    # Low-resolution training of the offline ensemble so that the demo stays within ~15 minutes;
    # any of these can be overridden from the caller's environment.
    demo_training = {"SHOPLENS_MODEL_PROFILE": "offline", "SHOPLENS_MODEL_IMAGE_SIZE": "96",
                     "SHOPLENS_MODEL_HEAD_EPOCHS": "15", "SHOPLENS_MODEL_VIEWS_PER_IMAGE": "1",
                     "SHOPLENS_MODEL_FINETUNE_EPOCHS": "3", "SHOPLENS_MODEL_FINETUNE_BLOCKS": "2",
                     "SHOPLENS_DATASET_MIN_PHOTOS_PER_PRODUCT": "5"}
    for key, value in demo_training.items():
        env[key] = os.environ.get(key, value)
    env["SHOPLENS_DETECTOR_MODEL_PATH"] = str(detector_model())
    return env


def detector_model() -> Path:
    """The YOLOX-Nano file: configured, else the developers' ../shared copy, else downloaded."""
    from shoplens.config import Settings

    configured = Path(Settings.from_env().detector_model_path).expanduser()
    shared = Path(__file__).resolve().parents[3] / "shared" / "models" / "yolox_nano.onnx"
    if "SHOPLENS_DETECTOR_MODEL_PATH" in os.environ or configured.exists():
        return configured
    if shared.exists():
        return shared
    print(f"[demo] detector model not found at {configured}; fetching the official release asset")
    if subprocess.run([sys.executable, "-m", "shoplens", "models", "fetch"]).returncode != 0:
        raise SystemExit("the filter stage needs the YOLOX-Nano model: run "
                         "'shoplens models fetch' on a connected machine, or set "
                         "SHOPLENS_DETECTOR_MODEL_PATH to a copy of yolox_nano.onnx")
    return configured


@command()
def main(argv: list[str] | None = None) -> int:
    """The whole nightly pipeline end to end on embedded defaults (local services, real Airflow)"""
    parser = argument_parser("python -m shoplens.dev.demo", __doc__, json_flag=False)
    parser.add_argument("--state-dir", type=Path, default=Path(".run"))
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args(argv)
    state = args.state_dir.resolve()
    started = time.monotonic()
    replica = None
    stack = None
    try:
        env_s3 = up(state, 8327)
        env = demo_env(env_s3["SHOPLENS_S3_ENDPOINT"])
        env["SHOPLENS_SEARCH_CACHE_DIR"] = os.environ.get("SHOPLENS_SEARCH_CACHE_DIR",
                                                          str(state / "search-cache"))
        os.environ.update(env)
        from shoplens.config import Settings
        from shoplens.store import ObjectStore

        ObjectStore(Settings.from_env()).ensure_bucket()
        print(f"[demo] S3 (SeaweedFS) on {env['SHOPLENS_S3_ENDPOINT']}, manifest {env['SHOPLENS_MANIFEST_URL']}")
        replica_log = open(state / "replica.log", "ab")
        replica = subprocess.Popen(
            [sys.executable, "-m", "crawler.replica", "--port", str(REPLICA_PORT),
             "--cdn-port", str(CDN_PORT), "--seed", "0", "--ground-truth", str(state / "ground_truth.json")],
            stdout=replica_log, stderr=subprocess.STDOUT, start_new_session=True)
        (state / "replica.pid").write_text(str(replica.pid))
        wait_for_port(REPLICA_PORT, 180, proc=replica)
        print(f"[demo] replica shop on {env['SHOPLENS_SHOP_BASE_URL']}")

        stack = default_stack(state / "airflow", AIRFLOW_PORT)
        stack.extra_env.update(env)
        # The demo triggers its night itself; unpausing a scheduled DAG would add last night's run.
        stack.extra_env["SHOPLENS_NIGHTLY_SCHEDULE"] = ""
        stack.start(workers={"worker-1": "default,training"})
        print(f"[demo] Airflow UI on {stack.api_url} (user admin, password in {state}/airflow/passwords.json)")
        stack.wait_for_dag("shoplens_train")
        stack.api("PATCH", "/dags/shoplens_train", {"is_paused": False})
        trainings_before = _train_run_ids(stack)
        run_id = stack.trigger("shoplens_nightly", {})
        print(f"[demo] triggered shoplens_nightly {run_id}; each task as it ends:")
        state_nightly = stack.wait_for_run("shoplens_nightly", run_id, args.timeout,
                                           progress=_print_progress)
        print(f"[demo] shoplens_nightly: {state_nightly}")
        train_state = None
        if state_nightly == "success":
            train_state = _wait_for_training(stack, trainings_before, args.timeout)
            print(f"[demo] shoplens_train: {train_state}")
        from shoplens import summary

        # The report link points at this stack's UI.
        print(summary.for_run(Settings.from_env().with_overrides(ui_base_url=stack.api_url),
                              run_id).text())
        if state_nightly == "success":
            _example_search(state)
        print(f"[demo] finished in {time.monotonic() - started:.0f}s")
        return 0 if state_nightly == "success" and train_state in (None, "success") else 1
    finally:
        if stack is not None:
            stack.stop()
        if replica is not None:
            stop_pid(replica.pid)
            (state / "replica.pid").unlink(missing_ok=True)
        down(state)


def _example_search(state: Path) -> None:
    """Search one kept review photo (the first by sha256) with ``shoplens search`` in the index
    the night built and print its top-3; keep a copy of that index in ``state``/search-index for
    ``make serve`` (which runs without these services)."""
    import json
    import shutil

    import sqlalchemy as sa

    from shoplens.config import Settings
    from shoplens.manifest import engine_for
    from shoplens.store import ObjectStore

    settings = Settings.from_env()
    with engine_for(settings.manifest_url).connect() as conn:
        photo = conn.execute(sa.text("SELECT product_id, object_key FROM kept_images "
                                     "ORDER BY sha256 LIMIT 1")).first()
        current = conn.execute(sa.text("SELECT id FROM current_search_index")).scalar()
    if photo is None or current is None:
        print("[demo] no example search: no kept photo or no search index")
        return
    path = state / ("example-query" + Path(photo.object_key).suffix)
    path.write_bytes(ObjectStore(settings).get_bytes(photo.object_key))
    done = subprocess.run([sys.executable, "-m", "shoplens", "search", "--top", "3", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"[demo] example search failed: {done.stderr.strip()[-500:]}")
        return
    answer = json.loads(done.stdout.splitlines()[0])
    print(f"[demo] search index {current}: a kept photo of product {photo.product_id} "
          f"({photo.object_key}) -> top-3"
          + ("" if answer["confident"] else " (no confident match)"))
    for rank, hit in enumerate(answer["top"], 1):
        print(f"   {rank}. {hit['product_id']} {hit['name']}  score {hit['score']:.3f}")
    cached = Path(os.environ["SHOPLENS_SEARCH_CACHE_DIR"]) / current
    if cached.is_dir():
        shutil.rmtree(state / "search-index", ignore_errors=True)
        shutil.copytree(cached, state / "search-index")
        print(f"[demo] index copied to {state / 'search-index'} for `make serve`")


def _train_run_ids(stack) -> set[str]:
    runs = stack.api("GET", "/dags/shoplens_train/dagRuns?limit=100")["dag_runs"]
    return {r["dag_run_id"] for r in runs}


def _print_progress(line: str) -> None:
    print(f"[demo]   {line}", flush=True)


def _wait_for_training(stack, before: set[str], timeout: float) -> str | None:
    """State of the training run that this night's dataset version triggered (its tasks printed
    as they end)."""
    deadline = time.monotonic() + timeout
    tasks: dict[str, TaskProgress] = {}
    while time.monotonic() < deadline:
        runs = stack.api("GET", "/dags/shoplens_train/dagRuns?limit=100")["dag_runs"]
        new = [r for r in runs if r["dag_run_id"] not in before]
        for r in new:
            progress = tasks.setdefault(r["dag_run_id"], TaskProgress())
            for line in progress.lines(stack.task_instances("shoplens_train", r["dag_run_id"])):
                _print_progress(f"shoplens_train {line}")
        if new and all(r["state"] in ("success", "failed") for r in new):
            return "success" if all(r["state"] == "success" for r in new) else "failed"
        time.sleep(5)
    return "timeout"


if __name__ == "__main__":
    raise SystemExit(main())
