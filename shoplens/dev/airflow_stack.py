"""A real local Airflow 3 deployment: api-server, scheduler, dag-processor, triggerer and Celery
workers (Redis broker), metadata in PostgreSQL, everything bound to 127.0.0.1.

Used by ``make demo`` and by the end-to-end tests; the Docker images run the very same
``airflow`` commands (see ``docker/``). Each process is recorded by PID and stopped by PID.

    python -m shoplens.dev.airflow_stack up   [--home .run/airflow] [--workers 1] [--concurrency 2]
    python -m shoplens.dev.airflow_stack trigger shoplens_nightly --conf '{"best_n": 5}' --wait
    python -m shoplens.dev.airflow_stack down [--home .run/airflow]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shoplens.dev.services import LOCALHOST, stop_pid, wait_for_port

REPO = Path(__file__).resolve().parents[2]
ADMIN_USER = "admin"
SHOP_POOL = "shop"
# Set in each worker's environment: the worker's name, which its task instances report as host.
WORKER_NAME_ENV = "SHOPLENS_AIRFLOW_WORKER"


def worker_hostname(name: str | None = None) -> str:
    """``[core] hostname_callable`` of the dev workers: ``<worker name>@<host>``, the worker's
    Celery node name, so that two workers on one machine show apart in each task instance's
    ``hostname`` (the machine's name alone is the same for both)."""
    name = name or os.environ.get(WORKER_NAME_ENV)
    return f"{name}@{socket.getfqdn()}" if name else socket.getfqdn()


@dataclass
class AirflowStack:
    home: Path
    db_url: str  # SQLAlchemy URL of the Airflow metadata database
    api_port: int
    broker_url: str = "redis://127.0.0.1:6379/0"
    executor: str = "CeleryExecutor"
    shop_pool_slots: int = field(default_factory=lambda: int(os.environ.get("SHOPLENS_CRAWL_PARALLELISM", "2")))
    worker_concurrency: int = 2  # task slots per Celery worker
    extra_env: dict[str, str] = field(default_factory=dict)
    password: str = ""
    pids: dict[str, int] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _token: str | None = None

    # ---------------------------------------------------------------- environment
    @property
    def api_url(self) -> str:
        return f"http://{LOCALHOST}:{self.api_port}"

    def env(self) -> dict[str, str]:
        self.home.mkdir(parents=True, exist_ok=True)
        secret_file = self.home / "jwt_secret"
        if not secret_file.exists():
            secret_file.write_text(secrets.token_urlsafe(32))
        pw_file = self.home / "passwords.json"
        if not pw_file.exists():
            pw_file.write_text(json.dumps({ADMIN_USER: self.password or secrets.token_urlsafe(12)}))
        self.password = json.loads(pw_file.read_text())[ADMIN_USER]
        result_backend = "db+" + self.db_url.replace("postgresql+psycopg2://", "postgresql://")
        env = dict(os.environ)
        env.update({
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.db_url,
            "AIRFLOW__API__HOST": LOCALHOST,
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": self.api_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text().strip(),
            "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "600",
            # Fast feedback for short local runs; production keeps Airflow's defaults.
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        })
        env.update(self.extra_env)
        return env

    def airflow(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(Path(sys.executable).with_name("airflow")), *args], env=self.env(),
                              check=check, timeout=timeout, capture_output=True, text=True)

    # ---------------------------------------------------------------- lifecycle
    def init_db(self) -> None:
        from shoplens.manifest.db import ensure_database

        ensure_database(self.db_url)
        proc = self.airflow("db", "migrate", check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        # The pool caps how many crawl tasks hit the shop at once, whatever the number of workers.
        self.airflow("pools", "set", SHOP_POOL, str(self.shop_pool_slots),
                     "Crawl tasks allowed to run against the shop at the same time")

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> int:
        logs = self.home / "procs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen([str(Path(sys.executable).with_name("airflow")), *args],
                                env={**self.env(), **(env or {})},
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=str(REPO))
        self._procs[name] = proc
        self.pids[name] = proc.pid
        self._save_pids()
        return proc.pid

    def _save_pids(self) -> None:
        (self.home / "pids.json").write_text(json.dumps(self.pids))

    def start(self, workers: dict[str, str] | None = None, triggerer: bool = True,
              timeout: float = 180) -> "AirflowStack":
        """Start every component; ``workers`` maps worker name -> comma-separated queues."""
        self.init_db()
        self._spawn("api-server", ["api-server", "--host", LOCALHOST, "--port", str(self.api_port)])
        self._spawn("scheduler", ["scheduler", "--skip-serve-logs"])
        self._spawn("dag-processor", ["dag-processor"])
        if triggerer:
            self._spawn("triggerer", ["triggerer", "--skip-serve-logs"])
        for name, queues in (workers or {"worker-1": "default,training"}).items():
            self.start_worker(name, queues)
        wait_for_port(self.api_port, timeout, proc=self._procs["api-server"])
        self._wait_healthy(timeout)
        return self

    def start_worker(self, name: str, queues: str = "default,training", concurrency: int | None = None) -> int:
        # Each worker its own Celery node name so that two workers on one machine are two nodes,
        # and its task instances report that name as their hostname.
        slots = concurrency or self.worker_concurrency
        return self._spawn(name, ["celery", "worker", "--skip-serve-logs", "--queues", queues,
                                  "--celery-hostname", f"{name}@%h", "--concurrency", str(slots)],
                           env={WORKER_NAME_ENV: name,
                                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "shoplens.dev.airflow_stack.worker_hostname"})

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill one component and every process under it (Celery pool, task runners, crawls),
        as when its machine dies, e.g. to test recovery."""
        import psutil

        pid = self.pids.pop(name)
        try:
            victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            victims = []
        for proc in victims:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        self._save_pids()

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/api/v2/monitor/health", timeout=5) as r:
                    health = json.loads(r.read())
                if health.get("scheduler", {}).get("status") == "healthy" and \
                        health.get("dag_processor", {}).get("status") == "healthy":
                    return
                last = health
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last = exc
            time.sleep(1)
        raise TimeoutError(f"Airflow not healthy after {timeout:.0f}s: {last}\n{self.logs_tail()}")

    def logs_tail(self, lines: int = 40) -> str:
        out = []
        for log in sorted((self.home / "procs").glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """SIGTERM every component, then SIGKILL whatever is left of their process trees
        (task runners may sit in sessions of their own)."""
        import psutil

        if not self.pids and (self.home / "pids.json").exists():
            self.pids = json.loads((self.home / "pids.json").read_text())
        descendants: list[psutil.Process] = []
        for pid in self.pids.values():
            try:
                descendants += psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for pid in self.pids.values():
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for name, pid in list(self.pids.items()):
            stop_pid(pid, timeout=20)
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pids.pop(name)
        _, alive = psutil.wait_procs(descendants, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        self._save_pids()

    # ---------------------------------------------------------------- REST API
    def token(self) -> str:
        """A REST API token, fetched once and reused until the API refuses it."""
        if self._token is None:
            self._token = self._fetch_token()
        return self._token

    def _fetch_token(self) -> str:
        body = json.dumps({"username": ADMIN_USER, "password": self.password}).encode()
        req = urllib.request.Request(f"{self.api_url}/auth/token", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["access_token"]

    def api(self, method: str, path: str, payload: dict | None = None, _relogin: bool = True) -> dict:
        data = json.dumps(payload).encode() if payload is not None else None
        req = urllib.request.Request(f"{self.api_url}/api/v2{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token()}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                raw = r.read()
                return json.loads(raw) if raw else {}
        except urllib.error.HTTPError as exc:
            if exc.code == 401 and _relogin:  # the token expired: log in again, once
                self._token = None
                return self.api(method, path, payload, _relogin=False)
            raise RuntimeError(f"{method} {path} -> {exc.code}: {exc.read()[:500]!r}") from exc

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.api("GET", f"/dags/{dag_id}")
                return
            except RuntimeError:
                time.sleep(2)
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f}s\n{self.logs_tail()}")

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        self.wait_for_dag(dag_id)
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        run = self.api("POST", f"/dags/{dag_id}/dagRuns",
                       {"conf": conf or {}, "logical_date": None})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{urllib.request.quote(run_id)}")["state"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 900,
                     progress: Callable[[str], None] | None = None) -> str:
        """The run's final state; ``progress`` gets a line for each of its task instances as it
        ends (:class:`TaskProgress`), so a long run shows where it is."""
        deadline = time.monotonic() + timeout
        state = "unknown"
        tasks = TaskProgress()
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if progress is not None:
                for line in tasks.lines(self.task_instances(dag_id, run_id)):
                    progress(line)
            if state in ("success", "failed"):
                return state
            time.sleep(3)
        raise TimeoutError(f"run {run_id} still {state} after {timeout:.0f}s\n{self.logs_tail()}")

    def task_instances(self, dag_id: str, run_id: str, page: int = 200) -> list[dict]:
        """Every task instance of the run (a night maps up to ~1,000 batches: read page by page,
        in a fixed order so that the pages neither overlap nor skip)."""
        q = urllib.request.quote(run_id)
        out: list[dict] = []
        while True:
            got = self.api("GET", f"/dags/{dag_id}/dagRuns/{q}/taskInstances"
                                  f"?order_by=id&limit={page}&offset={len(out)}")["task_instances"]
            out += got
            if len(got) < page:
                return out


class TaskProgress:
    """One line for each task instance of a run as it reaches a final state, in the order they
    ended: ``dedup_hash[2] success 4s`` (a mapped task's index in brackets). Each call
    gives only what ended since the previous one."""

    FINAL = ("success", "failed", "upstream_failed", "skipped", "removed")

    def __init__(self) -> None:
        self._reported: dict[tuple[str, int], str] = {}

    def lines(self, task_instances: list[dict]) -> list[str]:
        ended = [ti for ti in task_instances if ti.get("state") in self.FINAL
                 and self._reported.get(self._key(ti)) != ti["state"]]
        out = []
        for ti in sorted(ended, key=lambda t: (t.get("end_date") or "", t["task_id"],
                                               self._key(t)[1])):
            key = self._key(ti)
            self._reported[key] = ti["state"]
            name = ti["task_id"] + (f"[{key[1]}]" if key[1] >= 0 else "")
            took = f" {ti['duration']:.0f}s" if ti.get("duration") is not None else ""
            out.append(f"{name} {ti['state']}{took}")
        return out

    @staticmethod
    def _key(ti: dict) -> tuple[str, int]:
        index = ti.get("map_index")
        return ti["task_id"], -1 if index is None else int(index)


def default_stack(home: Path, api_port: int = 8780) -> AirflowStack:
    db = os.environ.get("SHOPLENS_AIRFLOW_DB_URL",
                        "postgresql+psycopg2://postgres@127.0.0.1:5432/shoplens_airflow")
    broker = os.environ.get("SHOPLENS_AIRFLOW_BROKER_URL", "redis://127.0.0.1:6379/5")
    return AirflowStack(home=home, db_url=db, api_port=api_port, broker_url=broker)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoplens.dev.airflow_stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up")
    up.add_argument("--workers", type=int, default=1, help="Celery workers (each its own node)")
    up.add_argument("--concurrency", type=int, default=2, help="task slots per worker")
    trig = sub.add_parser("trigger")
    trig.add_argument("dag_id")
    trig.add_argument("--conf", default="{}")
    trig.add_argument("--wait", action="store_true")
    trig.add_argument("--timeout", type=float, default=1800)
    sub.add_parser("down")
    for p in (up, trig, sub.choices["down"]):
        p.add_argument("--home", type=Path, default=Path(".run/airflow"))
        p.add_argument("--api-port", type=int, default=8780)
    args = parser.parse_args(argv)
    stack = default_stack(args.home.resolve(), args.api_port)
    if args.cmd == "up":
        stack.worker_concurrency = args.concurrency
        workers = {f"worker-{i + 1}": "default,training" for i in range(args.workers)}
        stack.start(workers=workers)
        print(f"Airflow UI: {stack.api_url}  (user {ADMIN_USER}, password in {args.home}/passwords.json)")
    elif args.cmd == "trigger":
        stack.env()
        run_id = stack.trigger(args.dag_id, json.loads(args.conf))
        print(f"triggered {args.dag_id} run {run_id}")
        if args.wait:
            state = stack.wait_for_run(args.dag_id, run_id, args.timeout,
                                       progress=lambda line: print(f"  {line}", flush=True))
            print(f"run {run_id}: {state}")
            return 0 if state == "success" else 1
    else:
        stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
