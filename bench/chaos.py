"""Load and chaos: many small jobs from concurrent clients while workers and Redis get killed.

Bounded in jobs and time, loopback only. Starts its own redis-server (AOF) and worker
processes and the API (`convq api`); clients submit over HTTP (`--via redis`: to the queue).
Every ~K seconds a random worker is SIGKILLed and restarted; Redis is killed and restarted once.
Prints: submitted, finished, failed (reasons), lost, wrong results, submit latency, Redis memory.

    python bench/chaos.py --jobs 1000 --clients 8 --workers 2
"""

from __future__ import annotations

import argparse
import collections
import io
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import Model  # noqa: E402
from tests.redis_proc import RedisServer  # noqa: E402
from tests.system.procs import start_api, start_worker  # noqa: E402
from worker.contract.connection import connect  # noqa: E402
from worker.contract.queue import job_status, make_queue, submit  # noqa: E402
from worker.contract.store import Store  # noqa: E402

DONE = ("finished", "failed")
BLOB_DIR: str | None = None


def tiny_model() -> Model:
    rng = np.random.default_rng(0)
    spec = {
        "name": "chaos",
        "input": {"channels": 1},
        "layers": [
            {"name": "c", "type": "conv", "filters": 4, "size": 3, "pad": 1},
            {"name": "r", "type": "relu"},
            {"name": "p", "type": "maxpool", "size": 2},
        ],
    }
    return Model.from_arrays(
        spec,
        {
            "c.w": rng.standard_normal((4, 3, 3, 1)).astype(np.float32),
            "c.b": rng.standard_normal(4).astype(np.float32),
        },
    )


class Client:
    """Submit and poll either over HTTP (the API) or straight through Redis."""

    def __init__(self, url: str, base: str | None, version: int):
        self.base = base
        self.version = version
        self.redis = connect(url)
        self.store = Store(self.redis, result_ttl=ARGS.result_ttl, input_ttl=600, blob_dir=BLOB_DIR)
        self.queue = make_queue(self.redis)
        if base:
            import requests

            self.http = requests.Session()

    def submit(self, image: np.ndarray) -> str:
        if not self.base:
            return submit(
                self.queue,
                self.store,
                model="chaos",
                version=self.version,
                images=image[None],
                outputs=["p"],
                owner=None,
            )
        buf = io.BytesIO()
        np.save(buf, image, allow_pickle=False)
        resp = self.http.post(
            f"{self.base}/v2/models/chaos/jobs",
            timeout=10,
            files={"images": ("x.npy", buf.getvalue())},
            data={"outputs": "p"},
        )
        if resp.status_code != 202:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
        return resp.json()["id"]

    def status(self, job_id: str) -> dict | None:
        return job_status(self.queue, job_id)


def run_clients(url, base, version, images, latencies, accepted, rejected):
    """Each of ARGS.clients threads submits its share of images, retrying refused submits."""
    gap = ARGS.clients / ARGS.rate if ARGS.rate > 0 else 0.0

    def one(share):
        client = Client(url, base, version)
        next_at = time.monotonic()
        for i in share:
            next_at += gap
            time.sleep(max(0.0, next_at - time.monotonic()))
            for attempt in range(60):
                began = time.perf_counter()
                try:
                    job_id = client.submit(images[i])
                except Exception as exc:  # noqa: BLE001 - Redis restarting: count and retry
                    rejected[type(exc).__name__] += 1
                    time.sleep(min(0.1 * 2**attempt, 2.0))
                    continue
                latencies.append(time.perf_counter() - began)
                accepted[job_id] = i
                break

    shares = [list(range(k, len(images), ARGS.clients)) for k in range(ARGS.clients)]
    threads = [threading.Thread(target=one, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    return threads


def chaos(server, procs, start, stop: threading.Event, log: list):
    """Kill a random worker every ~kill_every s (and restart it); restart Redis once."""
    rng = random.Random(0)
    redis_done = False
    began = time.monotonic()
    while not stop.wait(ARGS.kill_every * rng.uniform(0.7, 1.3)):
        k = rng.randrange(len(procs))
        procs[k].kill()
        log.append(f"{time.monotonic() - began:5.1f} s  SIGKILL worker {k}")
        procs[k] = start(f"w{k}")
        if not redis_done and time.monotonic() - began > ARGS.kill_every * 1.5:
            server.restart()
            redis_done = True
            log.append(f"{time.monotonic() - began:5.1f} s  Redis killed and restarted (AOF)")


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="convq-chaos-"))
    server = RedisServer(aof=True).start()
    env = {"CONVQ_RESULT_TTL": str(ARGS.result_ttl), "CONVQ_THREADS": "1"}
    global BLOB_DIR
    if ARGS.store == "files":  # as compose runs it: one directory shared by API and workers
        BLOB_DIR = str(tmp / "blobs")
        env["CONVQ_BLOB_DIR"] = BLOB_DIR
    start = lambda name: start_worker(server.url, tmp, env=env, name=name)  # noqa: E731
    procs = [start(f"w{k}") for k in range(ARGS.workers)]
    api = base = None
    use_http = ARGS.via == "http"
    if use_http:
        api, base = start_api(server.url, tmp, env=env)
    model = tiny_model()
    store = Store(connect(server.url))
    version = store.put_model("chaos", model.spec, model.to_safetensors(), owner=None)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (ARGS.jobs, 8, 8), dtype=np.uint8)

    latencies: list[float] = []
    accepted: dict[str, int] = {}
    rejected: collections.Counter = collections.Counter()
    events: list[str] = []
    stop = threading.Event()
    began = time.monotonic()
    killer = threading.Thread(target=chaos, args=(server, procs, start, stop, events))
    killer.start()
    clients = run_clients(server.url, base, version, images, latencies, accepted, rejected)
    watcher = Client(server.url, None, version)
    expected = model.run(images[:, :, :, None], outputs=["p"])["p"]
    final: dict[str, dict | None] = {}
    ended: set[str] = set()
    wrong = missing = 0
    submitted_in = None
    try:
        deadline = None
        while True:
            if submitted_in is None and not any(t.is_alive() for t in clients):
                submitted_in = time.monotonic() - began
                deadline = time.monotonic() + ARGS.timeout
            pending = [j for j in list(accepted) if j not in ended]
            if submitted_in is not None and (not pending or time.monotonic() > deadline):
                break
            for job_id in pending:
                try:
                    status = watcher.status(job_id)
                except Exception:  # noqa: BLE001 - Redis may be restarting
                    break
                final[job_id] = status
                if not status or status["status"] not in DONE:
                    continue
                ended.add(job_id)
                if status["status"] == "finished":
                    # Check at once: the result lives only result_ttl seconds.
                    try:
                        got = watcher.store.result_array(job_id, "p")
                    except Exception:  # noqa: BLE001 - Redis restarting: look again later
                        ended.discard(job_id)
                        break
                    if got is None:
                        missing += 1
                    elif not np.array_equal(got[0], expected[accepted[job_id]]):
                        wrong += 1
            time.sleep(0.2)
        drained_in = time.monotonic() - began
    finally:
        stop.set()
        killer.join()

    finished = [j for j, s in final.items() if s and s["status"] == "finished"]
    failed = [j for j, s in final.items() if s and s["status"] == "failed"]
    reasons = collections.Counter(final[j]["error"] for j in failed)
    lost = [j for j in accepted if j not in finished and j not in failed]
    retried = sum(1 for j in finished if (final[j].get("attempt") or 1) > 1)
    mem_before = watcher.redis.info("memory")["used_memory"]
    time.sleep(ARGS.result_ttl + 5)
    mem_after = watcher.redis.info("memory")["used_memory"]
    keys_after = watcher.redis.dbsize()
    kinds = collections.Counter(
        ":".join(k.decode().split(":")[:2]) for k in watcher.redis.scan_iter(count=1000)
    )

    lat = sorted(latencies)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")  # noqa: E731
    print(
        f"\nconvq chaos: {ARGS.jobs} jobs, {ARGS.clients} clients, {ARGS.workers} workers, "
        f"via {'HTTP API' if base else 'Redis (no service.cli)'}"
    )
    for line in events:
        print("  " + line)
    rows = [
        ("submitted (accepted)", len(accepted)),
        ("submit attempts refused", dict(rejected) or 0),
        ("finished", len(finished)),
        ("  of which retried", retried),
        ("failed", len(failed)),
        ("lost (accepted, never ended)", len(lost)),
        ("wrong results", wrong),
        ("finished but result missing", missing),
        ("submit latency p50 / p95 ms", f"{p(0.5):.1f} / {p(0.95):.1f}"),
        ("all submitted after s", f"{submitted_in:.1f}"),
        ("all ended after s", f"{drained_in:.1f}"),
        ("Redis used_memory at end", f"{mem_before / 1e6:.2f} MB"),
        (
            f"Redis used_memory after result TTL ({ARGS.result_ttl} s)",
            f"{mem_after / 1e6:.2f} MB ({keys_after} keys)",
        ),
    ]
    if BLOB_DIR:
        files = list(Path(BLOB_DIR).iterdir())
        rows.append(
            (
                "blob files left (deleted past TTL + 300 s)",
                f"{len(files)}, {sum(f.stat().st_size for f in files) / 1e6:.2f} MB",
            )
        )
    for name, value in rows:
        print(f"  {name:<44} {value}")
    print("  keys left by kind:", ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    for reason, count in reasons.most_common():
        print(f"  failed x{count}: {reason}")
    if lost:
        print("  lost:", ", ".join(lost[:10]))
    for proc in procs:
        proc.close()
    if api:
        api.close()
    server.close()
    return 0 if not (lost or wrong or missing) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=25.0, help="submits per second, all clients")
    parser.add_argument("--kill-every", type=float, default=10.0)
    parser.add_argument("--result-ttl", type=int, default=30)
    parser.add_argument("--timeout", type=float, default=240.0, help="drain limit, seconds")
    parser.add_argument(
        "--via",
        choices=["http", "redis"],
        default="http",
        help="submit over the HTTP API (default) or straight to the RQ queue",
    )
    parser.add_argument(
        "--store",
        choices=["files", "redis"],
        default="files",
        help="job data in a shared CONVQ_BLOB_DIR (default, as compose) or Redis",
    )
    ARGS = parser.parse_args()
    sys.exit(main())
