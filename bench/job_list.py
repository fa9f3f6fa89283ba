"""Time GET /v2/jobs page by page over one key's many jobs (issue goal: each page under 20 ms).

    python bench/job_list.py [--jobs 10000] [--limit 100] [--fakeredis]

Starts a private redis-server on a free loopback port (unless --fakeredis), loads the tiny test
model, queues --jobs 1-image jobs under one API key through the contract's submit (no worker:
they stay queued, as a big backlog would), then lists them through the Flask app page by page
and prints the median, p90 and max page time, and whether every job was seen exactly once.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fakeredis  # noqa: E402
import numpy as np  # noqa: E402
import redis as redis_lib  # noqa: E402

from service.app import create_app  # noqa: E402
from service.auth import owner_id  # noqa: E402
from tests.integration.apikit import load_body  # noqa: E402
from worker.contract.config import Settings  # noqa: E402
from worker.contract.queue import make_queue, submit  # noqa: E402
from worker.contract.store import Store  # noqa: E402

KEY = "bench-key-0123456789abcdef"


def _redis_server(tmp: str) -> tuple[subprocess.Popen, redis_lib.Redis]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--dir", tmp],
        stdout=subprocess.DEVNULL,
    )
    client = redis_lib.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc, client
        except redis_lib.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("redis-server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--fakeredis", action="store_true")
    args = p.parse_args()
    tmp = tempfile.mkdtemp()
    proc = None
    if args.fakeredis or shutil.which("redis-server") is None:
        redis = fakeredis.FakeRedis()
    else:
        proc, redis = _redis_server(tmp)
    try:
        settings = Settings(threads=1)
        app = create_app({"TESTING": True, "REDIS": redis, "SETTINGS": settings, "API_KEYS": KEY})
        client = app.test_client()
        auth = {"Authorization": f"Bearer {KEY}"}
        rv = client.post("/v2/repository/models/tiny/load", json=load_body(), headers=auth)
        assert rv.status_code == 200, rv.json
        queue, store = make_queue(redis), Store.from_settings(redis, settings)
        image = np.zeros((1, 9, 9, 3), np.uint8)
        began = time.perf_counter()
        for _ in range(args.jobs):
            submit(
                queue,
                store,
                model="tiny",
                version=1,
                images=image,
                outputs=None,
                owner=owner_id(KEY),
            )
        print(f"queued {args.jobs} jobs in {time.perf_counter() - began:.1f} s")
        times, seen, cursor = [], [], None
        while True:
            query = {"limit": args.limit, **({"cursor": cursor} if cursor else {})}
            t = time.perf_counter()
            rv = client.get("/v2/jobs", query_string=query, headers=auth)
            times.append(time.perf_counter() - t)
            assert rv.status_code == 200, rv.json
            seen += [j["id"] for j in rv.json["jobs"]]
            cursor = rv.json["next"]
            if cursor is None:
                break
        ms = sorted(1000 * t for t in times)
        print(
            f"{len(times)} pages of {args.limit} over {'fakeredis' if proc is None else 'redis'}: "
            f"median {statistics.median(ms):.2f} ms, p90 {ms[int(0.9 * (len(ms) - 1))]:.2f} ms, "
            f"max {ms[-1]:.2f} ms; {len(seen)} jobs listed, {len(set(seen))} distinct"
        )
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
