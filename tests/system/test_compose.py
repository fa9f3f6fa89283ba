"""docker-compose.yml, proven without Docker: checked statically, then each service's own command
and environment run as local processes (redis-server with the compose flags, gunicorn, a worker)
and a job driven through them over HTTP."""

from __future__ import annotations

import io
import json
import re
import secrets
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service import defaults as service_defaults
from service.demo import demo_images, demo_model
from tests.redis_proc import free_port
from tests.system.procs import Proc, _env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    out = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            out[name.strip()] = value.strip()
    return out


def interpolate(value, env: dict[str, str]):
    """Apply compose's ${VAR}, ${VAR:-default}, ${VAR:?error} to value (str, list or dict)."""
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        got = env.get(name)
        if op in (":-", "-") and not got:
            return arg
        if op in (":?", "?") and not got:
            raise AssertionError(f"{name} is required: {arg}")
        return got or ""

    return VAR.sub(one, value)


def seconds(duration: str) -> float:
    """Parse a compose duration such as 660s, 11m or 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(duration))
    assert parts, duration
    return sum(float(n) * units[u] for n, u in parts)


# --- static checks ------------------------------------------------------------------------------


def test_services_and_profiles():
    assert set(SERVICES) == {"redis", "api", "worker", "rq-dashboard"}
    assert SERVICES["rq-dashboard"]["profiles"] == ["dashboard"]
    assert all("profiles" not in SERVICES[s] for s in ("redis", "api", "worker"))


def test_redis_is_private_durable_and_password_protected():
    redis = SERVICES["redis"]
    assert "ports" not in redis and "expose" not in redis
    assert redis["networks"] == ["backend"]
    assert COMPOSE["networks"]["backend"]["internal"] is True
    flags = redis["command"]
    assert flags[0] == "redis-server"
    pairs = dict(zip(flags[1::2], flags[2::2], strict=True))
    assert pairs["--appendonly"] == "yes" and pairs["--appendfsync"] == "everysec"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert pairs["--requirepass"].startswith("${REDIS_PASSWORD:?")  # no default password
    assert any(v.endswith(":/data") for v in redis["volumes"]) and pairs["--dir"] == "/data"
    assert "redis-data" in COMPOSE["volumes"]
    assert redis["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_api_is_published_and_checked_on_readiness():
    api = SERVICES["api"]
    assert api["ports"] and api["networks"] == ["backend", "frontend"]
    assert api["command"][0] == "gunicorn" and api["command"][-1] == "service.wsgi:app"
    assert "/v2/health/ready" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "PROMETHEUS_MULTIPROC_DIR" in api["environment"]
    assert any(t.startswith(api["environment"]["PROMETHEUS_MULTIPROC_DIR"]) for t in api["tmpfs"])


def test_workers_scale_restart_and_outlive_their_longest_job():
    worker = SERVICES["worker"]
    assert worker["command"] == ["convq", "worker"]
    assert worker["restart"] == "unless-stopped"
    assert "container_name" not in worker and "ports" not in worker  # --scale needs both absent
    env = interpolate(worker["environment"], {"REDIS_PASSWORD": "x"})
    assert env["CONVQ_THREADS"] == "1"
    longest = int(env["CONVQ_JOB_TIMEOUT"]) + int(env["CONVQ_TIMEOUT_GRACE"])
    assert seconds(worker["stop_grace_period"]) > longest
    assert worker["networks"] == ["backend"]


def test_api_and_workers_share_one_blob_volume():
    dirs = set()
    for name in ("api", "worker"):
        env = interpolate(SERVICES[name]["environment"], {"REDIS_PASSWORD": "x"})
        mounts = dict(v.split(":", 1) for v in SERVICES[name]["volumes"])
        assert mounts.get("blobs") == env["CONVQ_BLOB_DIR"], (name, mounts, env)
        dirs.add(env["CONVQ_BLOB_DIR"])
    assert len(dirs) == 1 and "blobs" in COMPOSE["volumes"]
    # The image makes the mount point, owned by its user (a new volume copies that), but does
    # not set CONVQ_BLOB_DIR: a container on another host must not silently keep blobs apart.
    docker = (ROOT / "Dockerfile").read_text()
    assert re.search(rf"chown convq:convq .*{re.escape(dirs.pop())}", docker)
    assert "CONVQ_BLOB_DIR" not in docker


def test_every_variable_is_documented_in_env_example():
    documented = set(env_example())
    used = {m.group(1) for m in VAR.finditer((ROOT / "docker-compose.yml").read_text())}
    assert used <= documented, used - documented
    assert documented <= used, documented - used  # nothing documented that compose ignores
    service_vars = {f"CONVQ_{n}" for n in vars(service_defaults) if n.isupper()}
    code = "".join(p.read_text() for p in (ROOT / "worker").glob("*.py"))
    worker_vars = set(re.findall(r"\"(CONVQ_[A-Z_]+)\"", code))
    assert service_vars | worker_vars <= documented, (service_vars | worker_vars) - documented
    table = set(re.findall(r"^\| `([A-Z_]+)`", (ROOT / "docs/configuration.md").read_text(), re.M))
    assert documented <= table, documented - table
    assert service_vars | worker_vars <= table, (service_vars | worker_vars) - table


def test_dockerfile_builds_a_warm_non_root_image():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    user = text.index("\nUSER convq")
    assert "NUMBA_CACHE_DIR=" in text and "pip install ." in text
    assert text.index("RUN convq warmup") > user  # the cache is written by the runtime user
    assert "useradd" in text


# --- the stack as local processes ---------------------------------------------------------------


def localise(command: list[str]) -> list[str]:
    """Run a compose command here: the same program, from this Python."""
    if command[0] == "convq":
        return [
            sys.executable,
            "-c",
            "import sys; sys.argv[0] = 'convq'; from service.cli import main; sys.exit(main())",
            *command[1:],
        ]
    if command[0] == "gunicorn":
        return [sys.executable, "-m", "gunicorn", *command[1:]]
    raise AssertionError(f"no local stand-in for {command[0]}")


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture
def stack(redis_server_factory, tmp_path):
    """redis-server, gunicorn and one worker, each from its compose command and environment."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is required (apt-get install redis-server)")
    env = {**env_example(), "REDIS_PASSWORD": secrets.token_hex(16)}

    flags = interpolate(SERVICES["redis"]["command"], env)[1:]
    pairs = dict(zip(flags[::2], flags[1::2], strict=True))
    password = pairs.pop("--requirepass")
    pairs.pop("--dir")  # the test server keeps its data in its own temporary directory
    extra = [x for kv in pairs.items() for x in kv]
    redis = redis_server_factory(*extra, password=password, aof=True)

    procs: list[Proc] = []

    def service_env(name: str) -> dict:
        own = interpolate(SERVICES[name]["environment"], env)
        own["REDIS_URL"] = own["REDIS_URL"].replace("@redis:6379", f"@127.0.0.1:{redis.port}")
        own["CONVQ_BLOB_DIR"] = str(tmp_path / "blobs")  # the shared volume, here
        return own

    port = free_port()
    api_env = service_env("api")
    api_env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path / "metrics")  # the tmpfs, here
    (tmp_path / "metrics").mkdir()
    api_cmd = interpolate(SERVICES["api"]["command"], env)
    api_cmd[api_cmd.index("--bind") + 1] = f"127.0.0.1:{port}"
    worker_cmd = localise(interpolate(SERVICES["worker"]["command"], env))
    try:
        procs.append(Proc(localise(api_cmd), _env(None, api_env), tmp_path / "api.log"))
        procs.append(Proc(worker_cmd, _env(None, service_env("worker")), tmp_path / "worker.log"))
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, procs)
        yield base, redis, procs
    finally:
        for p in procs:
            p.stop(timeout=20)
            p.close()


def wait_ready(base: str, procs: list[Proc], timeout: float = 120.0) -> None:
    """Wait for the compose healthcheck's URL: Redis reachable and a worker alive."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.alive(), f"{p.popen.args[:4]} exited:\n{p.log()}"
        try:
            if requests.get(base + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "\n".join(p.log() for p in procs)
        time.sleep(0.25)


@pytest.mark.system
def test_a_job_runs_through_the_compose_stack(stack):
    base, redis, procs = stack
    # Redis runs as compose configures it.
    config = redis.client().config_get("*")
    assert config["appendonly"] == "yes" and config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"
    anonymous = redis.client()
    anonymous.connection_pool.connection_kwargs.pop("password", None)
    with pytest.raises(Exception, match="(?i)auth"):
        type(anonymous)(host="127.0.0.1", port=redis.port).ping()

    spec, arrays = demo_model()
    weights = io.BytesIO()
    np.savez(weights, **arrays)
    files = {"spec": ("spec.json", json.dumps(spec)), "weights": ("w.npz", weights.getvalue())}
    r = requests.post(f"{base}/v2/repository/models/demo/load", files=files, timeout=60)
    assert r.status_code == 200, r.text

    scene = dict(demo_images())["scene.png"]
    r = requests.post(
        f"{base}/v2/models/demo/jobs",
        files=[("images", ("scene.png", scene))],
        data={"outputs": "all"},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    deadline = time.monotonic() + 120
    while (status := requests.get(f"{base}/v2/jobs/{job}", timeout=10).json())["status"] not in (
        "finished",
        "failed",
    ):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "finished", status
    r = requests.get(
        f"{base}/v2/jobs/{job}/result", params={"output": "pool1", "format": "npy"}, timeout=30
    )
    pool1 = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert pool1.shape == (1, 27, 27, 96) and pool1.max() > 0
    # The maps are files in the shared volume; Redis holds only their names and shapes.
    blobs = Path(procs[0].log_path).parent / "blobs"
    files = sorted(p.name for p in blobs.iterdir())
    names = status["outputs"]
    assert files == [f"result-{job}.{i}" for i in range(len(names))], files  # input deleted
    assert (blobs / f"result-{job}.{names.index('pool1')}").read_bytes() == pool1.tobytes()
    client = redis.client()
    job_keys = list(client.scan_iter(f"convq:result:{job}*"))
    assert job_keys and max(client.memory_usage(k) for k in job_keys) < 4 << 10

    # /metrics from gunicorn's 2 workers adds up, and shows the worker's telemetry.
    for _ in range(20):
        requests.get(f"{base}/v2/health/live", timeout=10)
    text = requests.get(f"{base}/metrics", timeout=10).text
    assert metric(text, "convq_http_requests_total", route="/v2/health/live") == 20
    assert metric(text, "convq_jobs_ended_total", state="finished") == 1
    assert metric(text, "convq_job_compute_seconds_count") == 1
    assert metric(text, "convq_workers") == 1
    assert metric(text, "convq_redis_up") == 1
    assert len(list((Path(procs[0].log_path).parent / "metrics").glob("*.db"))) >= 1

    assert requests.delete(f"{base}/v2/jobs/{job}", timeout=10).status_code in (200, 204)
    assert list(blobs.iterdir()) == []
