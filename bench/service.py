"""Time the service end to end (HTTP in, activations out) against the engine alone.

    python bench/service.py [--quick] [--threads 2] [--rounds 5] [--latency 200] [--jobs 24]
                            [--tables 1,2,3,4,5] [--batch-rounds 3] [--batch-seconds 10]

Starts its own redis-server on a free loopback port, one `convq api` (gunicorn) and `convq
worker` processes, all on this machine, and prints five tables (--tables picks some, e.g. 4,5):
  1. a 32-image AlexNet conv1 job (227x227x3 -> 55x55x96) through POST /infer with binary
     tensors vs Model.run on the same batch in this process, same thread count, rounds
     alternating, medians; beside it the "Redis floor": the time the job's bytes alone take
     through Redis with the service's own Store calls;
  2. p50/p95 latency of a one-image 32x32 job (K32 F5 P2) through POST /infer;
  3. throughput (jobs/s) of 16-image demo jobs queued before 1 or 2 workers of 1 thread start;
  4. dynamic batching: one-image jobs from 64 concurrent clients on 2 workers, throughput and
     p50 latency (under load, and of one client alone) with batching on vs off, alternating.
  5. the 32-image pool1 job with each lean result (float16, uint8, stats, png) against the
     engine and the TCP floor of its own request and response bytes, with the goals.
Results move as raw bytes (the V2 binary tensor extension), never as JSON numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import requests  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import Model, set_threads  # noqa: E402
from service.demo import demo_model  # noqa: E402
from worker.horse import WARMUP_SECONDS  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """redis-server + convq api + convq workers as child processes; close() stops them all."""

    def __init__(self, threads: int, blobs: bool = True, blob_root: str | None = None):
        self.threads = threads  # of the one worker every table but 4 runs on
        self.dir = Path(tempfile.mkdtemp(prefix="convq-bench-"))
        self.redis_port = free_port()
        self.procs: list[subprocess.Popen] = []
        self.redis = self._spawn(
            [
                "redis-server",
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
            ],
            "redis",
        )
        self.url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.blob_dir: Path | None = None
        self.env = {
            **os.environ,
            "REDIS_URL": self.url,
            "CONVQ_THREADS": str(threads),
            "PYTHONPATH": str(ROOT),
            "CONVQ_API_PROCESSES": "1",
            "CONVQ_MAX_CONTENT_LENGTH": str(256 << 20),
        }
        if blobs:
            root = Path(tempfile.mkdtemp(dir=blob_root)) if blob_root else self.dir
            self.blob_dir = root / "blobs"
            self.env["CONVQ_BLOB_DIR"] = str(self.blob_dir)
        else:
            self.env.pop("CONVQ_BLOB_DIR", None)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self._spawn(
            [
                sys.executable,
                "-c",
                "import sys; from service.cli import main; sys.exit(main())",
                "api",
                "--port",
                str(port),
            ],
            "api",
        )
        self.workers: list[subprocess.Popen] = []
        self._wait(lambda: requests.get(self.base + "/v2/health/live", timeout=1).ok, "api")

    def _spawn(self, args: list[str], name: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.dir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env or getattr(self, "env", None),
            cwd=ROOT,
        )
        self.procs.append(proc)
        return proc

    @staticmethod
    def _wait(ready, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not come up")

    def add_worker(self, threads: int) -> None:
        self.add_workers(1, threads)

    def add_workers(self, n: int, threads: int, env: dict | None = None) -> None:
        """Start n workers at once (env: extra variables); return when all are registered."""
        env = {**self.env, "CONVQ_THREADS": str(threads), **(env or {})}
        for _ in range(n):
            self.workers.append(self._spawn([sys.executable, "-m", "worker"], "worker", env))
        want = len(self.workers)
        self._wait(
            lambda: (
                requests.get(self.base + "/v2/health/ready", timeout=5).json().get("workers", 0)
                >= want
            ),
            "worker",
            timeout=WARMUP_SECONDS,  # a cold Numba cache: the horse compiles every kernel first
        )

    def stop_workers(self) -> None:
        for proc in self.workers:
            proc.terminate()
            proc.wait(30)
        self.workers.clear()

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.blob_dir is not None:
            shutil.rmtree(self.blob_dir.parent, ignore_errors=True)

    def upload(self, name: str, spec: dict, arrays: dict) -> None:
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)
        rv = requests.post(
            f"{self.base}/v2/repository/models/{name}/load",
            timeout=120,
            files={"spec": ("spec.json", json.dumps(spec)), "weights": ("w.npz", buf.getvalue())},
        )
        rv.raise_for_status()


def binary_request(
    images: np.ndarray, outputs: list[str], options: dict | None = None
) -> tuple[bytes, dict]:
    raw = images.tobytes()
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "UINT8",
                    "shape": list(images.shape),
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "outputs": [
                {"name": o, "parameters": {"binary_data": True, **(options or {})}} for o in outputs
            ],
        }
    ).encode()
    return head + raw, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


LAST_TIMING: dict[str, float] = {}


def infer(
    session: requests.Session,
    base: str,
    model: str,
    body: bytes,
    headers: dict,
    name: str,
    shape: tuple,
) -> np.ndarray:
    """POST one binary V2 inference; return the named output (Server-Timing in LAST_TIMING)."""
    data, n = infer_bytes(session, base, model, body, headers)
    return np.frombuffer(data, np.float32, offset=n).reshape(shape)


def infer_bytes(
    session: requests.Session, base: str, model: str, body: bytes, headers: dict
) -> tuple[bytes, int]:
    """POST one binary V2 inference; return (response body, its JSON header's length)."""
    rv = session.post(
        f"{base}/v2/models/{model}/infer", data=body, headers=headers, timeout=600, stream=True
    )
    rv.raise_for_status()
    # One read of the whole body: requests' .content reads in 10 KB pieces, slow for 37 MB.
    data = rv.raw.read(decode_content=True)
    LAST_TIMING.clear()
    for part in rv.headers.get("Server-Timing", "").split(","):
        key, _, dur = part.strip().partition(";dur=")
        if dur:
            LAST_TIMING[key] = float(dur) / 1000
    return data, int(rv.headers.get("Inference-Header-Content-Length", len(data)))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.1f}"


def redis_floor(stack: Stack, images: np.ndarray, output: np.ndarray, rounds: int) -> float:
    """Return the median seconds the job's bytes take through Redis alone, by the same Store
    calls the service makes: input SET (API) + GET (worker), result SET (worker) + slices (API).
    """
    from worker.contract.connection import connect
    from worker.contract.store import Store

    store = Store(connect(stack.url))
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        store.put_input("floor", images)
        store.get_input("floor")
        store.put_result("floor", {"x": output})
        for _piece in store.result_slices("floor", "x"):
            pass
        times.append(time.perf_counter() - t)
    store.delete_job("floor")
    return statistics.median(times)


_SINK = """
import socket, sys
srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
buf = bytearray(1 << 22)
while True:
    conn, _ = srv.accept()
    want, reply = (int(v) for v in conn.recv(64).split())
    got = 0
    while got < want:
        got += conn.recv_into(buf)
    out = bytes(reply)
    conn.sendall(out)
    conn.close()
"""


def tcp_floor(sent: int, received: int, rounds: int) -> float:
    """Return the median seconds to send `sent` bytes to another process over loopback TCP and
    receive `received` bytes back, with no HTTP and no processing: what any HTTP API pays."""
    sink = subprocess.Popen([sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True)
    try:
        port = int(sink.stdout.readline())
        payload, into = bytes(sent), bytearray(received)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as conn:
                conn.sendall(f"{sent} {received}".encode().ljust(64))
                conn.sendall(payload)
                view, got = memoryview(into), 0
                while got < received:
                    got += conn.recv_into(view[got:])
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    finally:
        sink.kill()
        sink.wait()


def bench_alexnet(stack: Stack, rounds: int, threads: int) -> None:
    spec, arrays = demo_model()
    stack.upload("alexnet", spec, arrays)
    model = Model.from_arrays(spec, arrays)
    images = np.random.default_rng(0).integers(0, 256, (32, 227, 227, 3), dtype=np.uint8)
    set_threads(threads)
    # The baseline gets the worker's own malloc settings, so the ratio is the service's cost.
    from worker.horse import keep_freed_memory

    keep_freed_memory()
    session = requests.Session()
    print(
        f"\n1. demo AlexNet conv1 -> relu1 -> pool1 on 32 images 227x227x3, {threads} "
        f"thread(s), median of {rounds}"
    )
    print(
        "   output                     engine alone   HTTP infer   ratio | of which: read  "
        "submit   queue  worker  answer    send | TCP floor  Redis floor"
    )
    for name in ("pool1", "conv1"):  # pool1 is the job's default output (the last layer)
        body, headers = binary_request(images, [name])
        expect = model.run(images, outputs=[name])[name]
        got = infer(session, stack.base, "alexnet", body, headers, name, expect.shape)
        assert np.array_equal(got, expect), "service and engine disagree"
        http, alone, spans = [], [], []
        for _ in range(rounds):  # alternate, so a noisy neighbour slows both alike
            t = time.perf_counter()
            model.run(images, outputs=[name])
            alone.append(time.perf_counter() - t)
            t = time.perf_counter()
            infer(session, stack.base, "alexnet", body, headers, name, expect.shape)
            http.append(time.perf_counter() - t)
            spans.append(dict(LAST_TIMING, total=http[-1]))
        a, h = statistics.median(alone), statistics.median(http)
        part = {
            key: statistics.median(s.get(key, 0.0) for s in spans)
            for key in ("read", "submit", "queue", "compute")
        }
        part["answer"] = statistics.median(
            s.get("infer", 0.0) - sum(s.get(k, 0.0) for k in ("read", "submit", "queue", "compute"))
            for s in spans
        )
        part["send"] = statistics.median(s["total"] - s.get("infer", 0.0) for s in spans)
        tcp = tcp_floor(len(body), expect.nbytes + 200, rounds)
        floor = redis_floor(stack, images, expect, rounds)
        label = f"{name} {'x'.join(map(str, expect.shape))} ({expect.nbytes / 2**20:.0f} MiB)"
        print(
            f"   {label:<26} {ms(a)} ms  {ms(h)} ms  {h / a:5.2f}x |"
            + "".join(ms(v) for v in part.values())
            + f" | {ms(tcp)} = {(a + tcp) / a:.2f}x  {ms(floor)} = {(a + floor) / a:.2f}x"
        )
    print(
        "   read: body received + decoded; submit: checks, input stored, job queued; queue: "
        "waiting for the worker;\n   worker: job start to end (input read, engine, result "
        "written); answer: the worker's end to the answer's\n   first byte (job saved, API "
        "woken, result opened); send: the rest of the client's time (request line, body sent "
        "and read).\n   TCP floor: the request "
        "and response bytes over loopback TCP between two processes, no HTTP, no work;\n"
        "   engine + TCP floor is the best ratio any HTTP service reaches on this machine. "
        "Redis floor: the same bytes\n   through Redis (input SET + GET, result SET + GETRANGE "
        "slices), what a design that moves them through Redis adds."
    )


LEAN = {
    "float32": {},
    "float16": {"dtype": "float16"},
    "uint8": {"dtype": "uint8"},
    "stats": {"stats": True},
    "png": {"png": True},
}
"""The lean results of table 5: output parameters of the pool1 job (float32 is the baseline)."""

LEAN_GOALS = {"float16": "floor", "stats": 1.15}
"""float16: end to end <= engine + 1.25 x the TCP floor of its own bytes; stats <= 1.15 x engine."""


def bench_lean(stack: Stack, rounds: int, threads: int) -> None:
    """The 32-image pool1 job with each lean result vs the engine alone, alternating rounds."""
    spec, arrays = demo_model()
    stack.upload("alexnet", spec, arrays)
    model = Model.from_arrays(spec, arrays)
    images = np.random.default_rng(0).integers(0, 256, (32, 227, 227, 3), dtype=np.uint8)
    set_threads(threads)
    from worker.horse import keep_freed_memory

    keep_freed_memory()
    session = requests.Session()
    requests_ = {kind: binary_request(images, ["pool1"], opts) for kind, opts in LEAN.items()}
    for body, headers in requests_.values():  # warm up: the worker's model cache, the kernels
        infer_bytes(session, stack.base, "alexnet", body, headers)
    model.run(images, outputs=["pool1"])
    alone: list[float] = []
    http: dict[str, list[float]] = {kind: [] for kind in LEAN}
    spans: dict[str, list[dict]] = {kind: [] for kind in LEAN}
    sizes: dict[str, int] = {}
    for _ in range(rounds):  # alternate engine and every kind, so noise hits them alike
        t = time.perf_counter()
        model.run(images, outputs=["pool1"])
        alone.append(time.perf_counter() - t)
        for kind, (body, headers) in requests_.items():
            t = time.perf_counter()
            data, _ = infer_bytes(session, stack.base, "alexnet", body, headers)
            http[kind].append(time.perf_counter() - t)
            spans[kind].append(dict(LAST_TIMING, total=http[kind][-1]))
            sizes[kind] = len(data)
    a = statistics.median(alone)
    print(
        f"\n5. lean results: the 32-image pool1 job (32x27x27x96) through POST /infer, binary, "
        f"{threads} thread(s), median of {rounds}; engine alone {ms(a)} ms"
    )
    print(
        "   result     response bytes   HTTP infer    ratio |   worker  outside | TCP floor  "
        "engine+1.25xfloor | goal"
    )
    for kind in LEAN:
        body = requests_[kind][0]
        h = statistics.median(http[kind])
        tcp = tcp_floor(len(body), sizes[kind], rounds)
        bound = a + 1.25 * tcp
        goal = LEAN_GOALS.get(kind)
        if goal == "floor":
            verdict = f"<= engine + 1.25x floor: {'met' if h <= bound else 'NOT met'}"
        elif goal is not None:
            verdict = f"<= {goal}x engine: {'met' if h <= goal * a else 'NOT met'}"
        else:
            verdict = ""
        worker = statistics.median(s.get("compute", 0.0) for s in spans[kind])
        print(
            f"   {kind:<9} {sizes[kind]:>15,} {ms(h)} ms  {h / a:5.2f}x |{ms(worker)}"
            f"{ms(h - worker)} | {ms(tcp)} ms  {ms(bound)} ms ({bound / a:.2f}x) | {verdict}"
        )
    print("   outside, split (ms):   read  submit   queue  answer    send")
    for kind in LEAN:
        part = {
            key: statistics.median(x.get(key, 0.0) for x in spans[kind])
            for key in ("read", "submit", "queue")
        }
        part["answer"] = statistics.median(
            x.get("infer", 0.0) - sum(x.get(k, 0.0) for k in ("read", "submit", "queue", "compute"))
            for x in spans[kind]
        )
        part["send"] = statistics.median(x["total"] - x.get("infer", 0.0) for x in spans[kind])
        print(f"   {kind:<20}" + "".join(ms(v) for v in part.values()))
    print(
        "   worker: the job's start to end in the worker (input read, engine, lean shaping, "
        "result written);\n   outside: the rest (HTTP, parse, input stored, queue, answer). "
        "TCP floor: this request's and\n   response's bytes over loopback TCP between two "
        "processes, no HTTP, no work."
    )


def bench_latency(stack: Stack, count: int) -> None:
    rng = np.random.default_rng(1)
    spec = {
        "name": "small",
        "input": {"height": 32, "width": 32, "channels": 3},
        "layers": [{"name": "conv", "type": "conv", "filters": 32, "size": 5, "pad": 2}],
    }
    arrays = {
        "conv.w": (rng.standard_normal((32, 5, 5, 3)) * 0.1).astype(np.float32),
        "conv.b": np.zeros(32, np.float32),
    }
    stack.upload("small", spec, arrays)
    image = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    body, headers = binary_request(image, ["conv"])
    session = requests.Session()
    for _ in range(5):
        infer(session, stack.base, "small", body, headers, "conv", (1, 32, 32, 32))
    times, queue, compute, view = [], [], [], []
    for _ in range(count):
        t = time.perf_counter()
        infer(session, stack.base, "small", body, headers, "conv", (1, 32, 32, 32))
        times.append(time.perf_counter() - t)
        queue.append(LAST_TIMING.get("queue", 0.0))
        compute.append(LAST_TIMING.get("compute", 0.0))
        view.append(LAST_TIMING.get("infer", 0.0))
    q = statistics.quantiles(times, n=20)
    print(f"\n2. one 32x32x3 image, conv K32 F5 P2, POST /infer sequentially x{count}")
    print(
        f"   p50 {ms(statistics.median(times))} ms   p95 {ms(q[18])} ms   min {ms(min(times))} ms"
    )
    api = [v - a - b for v, a, b in zip(view, queue, compute, strict=True)]
    http = [t - v for t, v in zip(times, view, strict=True)]
    print(
        f"   medians: enqueued->started {ms(statistics.median(queue))} ms, started->ended "
        f"{ms(statistics.median(compute))} ms (worker), rest of the infer view (parse, "
        f"enqueue, wake, read) {ms(statistics.median(api))} ms, HTTP (client, gunicorn) "
        f"{ms(statistics.median(http))} ms"
    )
    bench_deep_latency(stack, image, count)


def bench_deep_latency(stack: Stack, image: np.ndarray, count: int) -> None:
    """p50/p95 of one 32x32 image through 20 conv+ReLU layers of 16 filters: per-layer costs."""
    rng = np.random.default_rng(3)
    layers, arrays, c = [], {}, 3
    for i in range(20):
        layers += [
            {"name": f"c{i}", "type": "conv", "filters": 16, "size": 3, "pad": 1},
            {"name": f"r{i}", "type": "relu"},
        ]
        arrays[f"c{i}.w"] = (rng.standard_normal((16, 3, 3, c)) * 0.2).astype(np.float32)
        arrays[f"c{i}.b"] = np.zeros(16, np.float32)
        c = 16
    stack.upload(
        "deep",
        {"name": "deep", "input": {"height": 32, "width": 32, "channels": 3}, "layers": layers},
        arrays,
    )
    body, headers = binary_request(image, ["r19"])
    session = requests.Session()
    for _ in range(5):
        infer(session, stack.base, "deep", body, headers, "r19", (1, 32, 32, 16))
    times, compute = [], []
    for _ in range(count):
        t = time.perf_counter()
        infer(session, stack.base, "deep", body, headers, "r19", (1, 32, 32, 16))
        times.append(time.perf_counter() - t)
        compute.append(LAST_TIMING.get("compute", 0.0))
    q = statistics.quantiles(times, n=20)
    print(
        f"   the same image through 20 conv 3x3 K16 + ReLU layers: p50 "
        f"{ms(statistics.median(times))} ms   p95 {ms(q[18])} ms   worker "
        f"{ms(statistics.median(compute))} ms"
    )


def bench_throughput(stack: Stack, jobs: int) -> None:
    from datetime import datetime

    # Jobs big enough (~0.1 s of engine time each) that the workers, not HTTP, set the pace.
    # All are queued before the workers start, so neither the uploads nor the API compete with
    # them for the 2 cores; the first job of each worker (its model load) is left out, and the
    # clock runs from the next job's start to the last job's end (the workers' timestamps).
    images = np.random.default_rng(2).integers(0, 256, (16, 227, 227, 3), dtype=np.uint8)
    body, headers = binary_request(images, ["pool1"])
    print(
        f"\n3. throughput: {jobs} queued jobs of 16 demo images (227x227 -> pool1), "
        "workers of 1 thread"
    )
    rates = {}
    session = requests.Session()
    for n in (1, 2):
        stack.stop_workers()
        ids = []
        for _ in range(jobs):
            rv = session.post(
                f"{stack.base}/v2/models/alexnet/jobs", data=body, headers=headers, timeout=60
            )
            rv.raise_for_status()
            ids.append(rv.json()["id"])
        stack.add_workers(n, threads=1)
        timings = []
        for job_id in ids:  # they end roughly in queue order: wait on one at a time
            while True:
                status = session.get(f"{stack.base}/v2/jobs/{job_id}", timeout=30).json()
                if status["status"] in ("finished", "failed"):
                    break
                time.sleep(0.05)
            assert status["status"] == "finished", status
            timings.append(status["timings"])
        for job_id in ids:
            session.delete(f"{stack.base}/v2/jobs/{job_id}", timeout=30)
        start = min(datetime.fromisoformat(t["started_at"]) for t in timings[n:])
        end = max(datetime.fromisoformat(t["ended_at"]) for t in timings)
        rates[n] = (jobs - n) / (end - start).total_seconds()
        compute = statistics.median(t["compute_seconds"] for t in timings[n:])
        print(
            f"   {n} worker(s): {rates[n]:6.2f} jobs/s  ({16 * rates[n]:.0f} images/s), "
            f"median job compute {ms(compute)} ms"
        )
    print(f"   scaling 2 vs 1: {rates[2] / rates[1]:.2f}x")


SMALL_SPEC = {
    "name": "small",
    "input": {"height": 32, "width": 32, "channels": 3},
    "layers": [{"name": "conv", "type": "conv", "filters": 32, "size": 5, "pad": 2}],
}


def small_model(stack: Stack) -> None:
    """Upload the one-conv 32x32 model of tables 2 and 4 as "small"."""
    rng = np.random.default_rng(1)
    arrays = {
        "conv.w": (rng.standard_normal((32, 5, 5, 3)) * 0.1).astype(np.float32),
        "conv.b": np.zeros(32, np.float32),
    }
    stack.upload("small", SMALL_SPEC, arrays)


def _clients(stack: Stack, bodies: list, clients: int, seconds: float) -> tuple[int, list]:
    """clients threads POST /infer back to back for seconds; return (answers, latencies)."""
    import threading

    stop = time.monotonic() + seconds
    done: list[float] = []
    errors: list[str] = []

    def client(i: int) -> None:
        session = requests.Session()
        body, headers = bodies[i % len(bodies)]
        while time.monotonic() < stop:
            t = time.perf_counter()
            try:
                infer(session, stack.base, "small", body, headers, "conv", (1, 32, 32, 32))
            except requests.RequestException as exc:
                errors.append(str(exc))
                return
            done.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]}")
    return len(done), done


def bench_batching(
    stack: Stack, rounds: int, seconds: float, clients: int = 64, queued: int = 256
) -> None:
    """1-image jobs from many clients on 2 workers: batching on vs off, rounds alternating."""
    small_model(stack)
    rng = np.random.default_rng(4)
    bodies = [
        binary_request(rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8), ["conv"])
        for _ in range(16)
    ]
    modes = {"batched": {}, "off": {"CONVQ_BATCH_MAX_IMAGES": "0"}}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    p50s: dict[str, list[float]] = {m: [] for m in modes}
    loaded: dict[str, list[float]] = {m: [] for m in modes}
    drains: dict[str, list[float]] = {m: [] for m in modes}
    print(
        f"\n4. dynamic batching: one 32x32x3 image per job (conv K32 F5 P2) through POST /infer, "
        f"2 workers of 1 thread;\n   {clients} clients for {seconds:.0f} s (throughput), then 1 "
        f"client x100 (low-load latency); then {queued} jobs queued before the 2 workers start "
        f"(their drain rate);\n   {rounds} rounds, batched and off alternating"
    )
    for _ in range(rounds):
        for mode, env in modes.items():
            stack.stop_workers()
            stack.add_workers(2, threads=1, env=env)
            _clients(stack, bodies, clients, 1.0)  # warm: models loaded, connections open
            count, times = _clients(stack, bodies, clients, seconds)
            rates[mode].append(count / seconds)
            loaded[mode].append(statistics.median(times))
            session = requests.Session()
            single = []
            for i in range(100):
                body, headers = bodies[i % len(bodies)]
                t = time.perf_counter()
                infer(session, stack.base, "small", body, headers, "conv", (1, 32, 32, 32))
                single.append(time.perf_counter() - t)
            p50s[mode].append(statistics.median(single))
            print(
                f"   {mode:8s} {count / seconds:7.1f} jobs/s   p50 under load "
                f"{ms(statistics.median(times))} ms   p50 alone {ms(statistics.median(single))} ms"
            )
        for mode, env in modes.items():
            rate, sizes = _drain(stack, bodies, env, queued)
            drains[mode].append(rate)
            print(
                f"   {mode:8s} {queued} queued jobs drained at {rate:7.1f} jobs/s   jobs per "
                f"batch: median {statistics.median(sizes):.0f}, max {max(sizes)}"
            )
    # The tables after this one run on the stack's own worker (its thread count, batching on),
    # not on this table's two 1-thread workers of the last mode.
    stack.stop_workers()
    stack.add_worker(threads=stack.threads)
    rate = {m: statistics.median(v) for m, v in rates.items()}
    p50 = {m: statistics.median(v) for m, v in p50s.items()}
    drain = {m: statistics.median(v) for m, v in drains.items()}

    def paired(values: dict[str, list[float]]) -> str:
        ratios = [b / o for b, o in zip(values["batched"], values["off"], strict=True)]
        return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"

    print(
        f"   median of the rounds' own ratios (each round's two modes ran back to back): "
        f"throughput {paired(rates)}, low-load p50 {paired(p50s)}, drain {paired(drains)}"
    )
    print(
        f"   medians: batched {rate['batched']:.1f} jobs/s vs off {rate['off']:.1f} jobs/s = "
        f"{rate['batched'] / rate['off']:.2f}x (goal >= 2x); low-load p50 batched "
        f"{ms(p50['batched'])} ms vs off {ms(p50['off'])} ms = "
        f"{p50['batched'] / p50['off']:.2f}x (goal <= 1.5x); p50 under load batched "
        f"{ms(statistics.median(loaded['batched']))} ms vs off "
        f"{ms(statistics.median(loaded['off']))} ms;\n   queued jobs drained by the 2 workers "
        f"(no HTTP while they run): batched {drain['batched']:.1f} jobs/s vs off "
        f"{drain['off']:.1f} jobs/s = {drain['batched'] / drain['off']:.2f}x"
    )


def _ended(stack: Stack, session: requests.Session, job_id: str) -> dict:
    """Return the job's status once it ended, looking every 0.25 s."""
    while True:
        status = session.get(f"{stack.base}/v2/jobs/{job_id}", timeout=30).json()
        if status["status"] in ("finished", "failed"):
            return status
        time.sleep(0.25)


def _drain(stack: Stack, bodies: list, env: dict, count: int) -> tuple[float, list[int]]:
    """Queue count one-image jobs with no worker, start 2 workers; return their jobs/s and
    each job's batch size (jobs in the engine batch it ran in)."""
    from datetime import datetime

    stack.stop_workers()
    session = requests.Session()
    ids = []
    for i in range(count):
        body, headers = bodies[i % len(bodies)]
        rv = session.post(f"{stack.base}/v2/models/small/jobs", data=body, headers=headers)
        rv.raise_for_status()
        ids.append(rv.json()["id"])
    stack.add_workers(2, threads=1, env=env)
    _ended(stack, session, ids[-1])  # the last queued first, slowly: reads compete with workers
    timings, sizes = [], []
    for job_id in ids:
        status = _ended(stack, session, job_id)
        assert status["status"] == "finished", status
        timings.append(status["timings"])
        sizes.append((status.get("batch") or {"jobs": 1})["jobs"])
    for job_id in ids:
        session.delete(f"{stack.base}/v2/jobs/{job_id}", timeout=30)
    start = min(datetime.fromisoformat(t["started_at"]) for t in timings)
    end = max(datetime.fromisoformat(t["ended_at"]) for t in timings)
    return count / (end - start).total_seconds(), sizes


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and jobs")
    p.add_argument("--threads", type=int, default=2, help="engine threads for table 1")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--latency", type=int, default=200, help="requests for table 2")
    p.add_argument("--jobs", type=int, default=32, help="jobs per throughput run")
    p.add_argument(
        "--store",
        choices=("files", "redis"),
        default="files",
        help="where job data goes: a shared CONVQ_BLOB_DIR (default) or Redis",
    )
    p.add_argument(
        "--blob-root",
        help="make the blob directory under this path (default: the "
        "system's temporary directory; e.g. /dev/shm for a RAM-backed one)",
    )
    p.add_argument(
        "--tables",
        default="1,2,3,4,5",
        help="comma-separated tables to run (default all: 1,2,3,4,5)",
    )
    p.add_argument("--batch-rounds", type=int, default=3, help="rounds per mode of table 4")
    p.add_argument("--batch-seconds", type=float, default=10.0, help="seconds of load, table 4")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.latency, args.jobs = 3, 50, 8
        args.batch_rounds, args.batch_seconds = 1, 5.0
    tables = {t.strip() for t in args.tables.split(",")}
    stack = Stack(threads=args.threads, blobs=args.store == "files", blob_root=args.blob_root)
    try:
        print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores")
        stack.add_worker(threads=args.threads)
        if "1" in tables:
            bench_alexnet(stack, args.rounds, args.threads)
        if "2" in tables:
            bench_latency(stack, args.latency)
        if "3" in tables:
            bench_throughput(stack, args.jobs)
        if "4" in tables:
            bench_batching(stack, args.batch_rounds, args.batch_seconds)
        if "5" in tables:
            bench_lean(stack, args.rounds, args.threads)
    finally:
        stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
