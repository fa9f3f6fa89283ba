"""Count the Redis round trips and time the API's own CPU for one request of each kind.

    python bench/api_requests.py [--rounds 200] [--blobs] [--profile infer|submit|result]

Runs the app in process (Flask test client) against a redis-server of its own on a free port,
with one embedded worker thread on its own connection; counts the round trips the API's
connection makes (one per command sent, one per pipeline) and the API's CPU time per request
(this thread only: the worker thread's compute is not in it).
With --profile, prints cProfile's top functions of that request kind.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.app import create_app  # noqa: E402
from tests.integration.apikit import load_body, v2_binary  # noqa: E402
from tests.redis_proc import RedisServer  # noqa: E402
from worker.contract.config import Settings  # noqa: E402
from worker.embedded import start_workers  # noqa: E402


class CountingConnection(redis.Connection):
    """A connection that counts the times it sends (one per command, one per pipeline)."""

    sent = 0
    commands: list[str] = []

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sent += 1
        CountingConnection.commands.append("|")
        return super().send_packed_command(command, check_health)

    def send_command(self, *args, **kwargs):
        CountingConnection.commands.append(_name(args))
        return super().send_command(*args, **kwargs)

    def pack_commands(self, commands):
        CountingConnection.commands.append("[" + ", ".join(_name(c) for c in commands) + "]")
        return super().pack_commands(commands)


def _name(args) -> str:
    return " ".join(str(a)[:48] for a in args[:2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--blobs", action="store_true", help="inputs and results in files")
    ap.add_argument("--profile", choices=("infer", "submit", "result"))
    ap.add_argument("--trace", action="store_true", help="print the commands of the last of each")
    args = ap.parse_args()
    server = RedisServer().start()
    try:
        run(server, args)
    finally:
        server.stop()


def run(server: RedisServer, args) -> None:
    blob_dir = tempfile.mkdtemp(prefix="convq-blobs-") if args.blobs else None
    settings = Settings(threads=1, retries=0, blob_dir=blob_dir)
    api_redis = redis.Redis.from_url(server.url, connection_class=CountingConnection)
    app = create_app({"TESTING": True, "REDIS": api_redis, "SETTINGS": settings})
    client = app.test_client()
    assert client.post("/v2/repository/models/tiny/load", json=load_body()).status_code == 200
    imgs = np.random.default_rng(1).integers(0, 256, (1, 9, 9, 3), dtype=np.uint8)
    body, headers = v2_binary(imgs)

    def infer():
        r = client.post("/v2/models/tiny/infer", data=body, headers=headers)
        assert r.status_code == 200, r.data
        r.close()

    def submit():
        r = client.post("/v2/models/tiny/jobs", data=body, headers=headers)
        assert r.status_code in (200, 201, 202), r.data
        return r.get_json()["id"]

    handle = start_workers(server.client(), settings, n=1)
    try:
        rows = {}
        for kind in ("infer", "submit", "result"):
            trips, cpu = [], []
            prof = cProfile.Profile() if args.profile == kind else None
            for _ in range(args.rounds):
                job = None
                if kind == "result":
                    job = submit()
                    _wait(client, job)
                CountingConnection.commands = []
                before, t0 = CountingConnection.sent, time.thread_time()
                if prof:
                    prof.enable()
                if kind == "infer":
                    infer()
                elif kind == "submit":
                    job = submit()
                else:
                    r = client.get(f"/v2/jobs/{job}/result")
                    assert r.status_code == 200, r.data
                    r.close()
                if prof:
                    prof.disable()
                cpu.append(time.thread_time() - t0)
                trips.append(CountingConnection.sent - before)
                if kind == "submit":
                    _wait(client, job)
            if args.trace:
                print(kind, " ".join(CountingConnection.commands).replace(" | ", "\n  "))
            rows[kind] = (statistics.median(trips), statistics.median(cpu) * 1000)
            if prof:
                pstats.Stats(prof).sort_stats("cumulative").print_stats(40)
    finally:
        handle.stop()
    print(f"{'request':<28}{'round trips':>12}{'CPU ms':>9}  (median of {args.rounds})")
    names = {
        "infer": "POST /infer (1 image)",
        "submit": "POST /jobs (1 image)",
        "result": "GET /jobs/{id}/result",
    }
    for kind, (n, ms) in rows.items():
        print(f"{names[kind]:<28}{n:>12.0f}{ms:>9.2f}")


def _wait(client, job_id: str) -> None:
    for _ in range(2000):
        if client.get(f"/v2/jobs/{job_id}").get_json()["status"] in ("finished", "failed"):
            return
        time.sleep(0.002)
    raise RuntimeError("job did not end")


if __name__ == "__main__":
    main()
