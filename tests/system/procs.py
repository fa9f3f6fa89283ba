"""Start and stop real convq processes (workers, the API) for the system tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis

from tests.redis_proc import free_port

ROOT = Path(__file__).resolve().parents[2]

# Fast failure detection so the fault tests finish in seconds, not minutes.
FAST_ENV = {
    "CONVQ_THREADS": "1",
    "CONVQ_HEARTBEAT": "1",
    "CONVQ_HEARTBEAT_GRACE": "4",
    "CONVQ_MAINTENANCE_INTERVAL": "1",
    "CONVQ_TIMEOUT_GRACE": "2",
    "OMP_WAIT_POLICY": "PASSIVE",
}


def _env(redis_url: str | None, extra: dict | None) -> dict:
    env = {**os.environ, **FAST_ENV, **(extra or {})}
    if redis_url:
        env["REDIS_URL"] = redis_url
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """One child process with its log file; stop() (SIGTERM), kill() (SIGKILL), wait()."""

    def __init__(self, args: list[str], env: dict, log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.popen = subprocess.Popen(
            args, env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def stop(self, timeout: float = 30.0) -> int | None:
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.wait(10)

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def children(self) -> list[int]:
        """Return the pids of this process's direct children (Linux /proc)."""
        try:
            raw = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in raw.split()]

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)
        for pid in self.children():
            _kill_quietly(pid)
        self._log.close()


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def pid_alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start_worker(
    redis_url: str,
    tmp_path: Path,
    *,
    env: dict | None = None,
    name: str = "worker",
    ready: bool = True,
    timeout: float = 60.0,
) -> Proc:
    """Start `convq worker` (python -m worker: the same main) and wait until it listens."""
    log_path = tmp_path / f"{name}-{time.monotonic_ns()}.log"
    proc = Proc([sys.executable, "-m", "worker"], _env(redis_url, env), log_path)
    if ready:
        wait_worker_registered(redis_url, proc, timeout)
    return proc


def worker_pids(redis_url: str) -> dict[str, int]:
    """Return {rq worker name: pid} of every worker registered in Redis right now."""
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    out = {}
    for key in client.smembers("rq:workers"):
        pid = client.hget(key, "pid")
        if pid and not client.hexists(key, "death"):
            out[key.decode().removeprefix("rq:worker:")] = int(pid)
    return out


def wait_worker_registered(redis_url: str, proc: Proc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"worker exited early:\n{proc.log()}")
        try:
            if proc.pid in worker_pids(redis_url).values():
                return
        except redis.RedisError:
            pass
        time.sleep(0.1)
    proc.kill()  # else it (and a horse still compiling) outlives the test and its Redis
    raise RuntimeError(f"worker did not register within {timeout} s:\n{proc.log()}")


def start_api(
    redis_url: str | None,
    tmp_path: Path,
    *,
    env: dict | None = None,
    command: str = "api",
    timeout: float = 60.0,
) -> tuple[Proc, str]:
    """Start `convq api` (or `convq up`) on a free loopback port; return (proc, base URL)."""
    import urllib.error
    import urllib.request

    port = free_port()
    args = [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'convq'; from service.cli import main; sys.exit(main())",
        command,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    proc = Proc(args, _env(redis_url, env), tmp_path / f"{command}-{port}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"convq {command} exited early:\n{proc.log()}")
        try:
            with urllib.request.urlopen(base + "/v2/health/live", timeout=1) as resp:
                if resp.status == 200:
                    return proc, base
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    proc.close()
    raise RuntimeError(f"convq {command} did not answer within {timeout} s")
