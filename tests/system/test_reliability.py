"""Readiness and trust against real redis-server and `convq worker` processes.

Readiness must follow the workers that are alive, not rq's registry set (which keeps a SIGKILLed
worker until someone cleans it). Nothing a worker reads from Redis is ever unpickled: a job
record or an input blob crafted to run code when unpickled fails its job, runs nothing, and the
worker goes on.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import io
import json
import pickle
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from rq import Worker

from service.app import create_app
from tests.system.procs import start_api, start_worker, wait_worker_registered
from worker.contract.config import Settings
from worker.contract.connection import connect
from worker.contract.queue import job_status, live_workers, make_queue, submit
from worker.contract.store import Store

pytestmark = [pytest.mark.system]

# FAST_ENV (procs.py): heartbeat 1 s + grace 4 s + poll 2 s = a 7 s worker-key TTL.
KEY_TTL = 7


class Marker:
    """Unpickling this creates the file at path: proof that something was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _ready(client) -> tuple[int, dict]:
    rv = client.get("/v2/health/ready")
    assert rv.is_json, rv.data
    return rv.status_code, rv.json


def _wait_ready(client, predicate, timeout: float, what: str) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    answer = None
    while time.monotonic() < deadline:
        answer = _ready(client)
        if predicate(*answer):
            return answer
        time.sleep(0.2)
    raise AssertionError(f"readiness never became {what}: {answer}")


def test_ready_is_503_once_every_worker_is_dead(redis_server, tmp_path):
    app = create_app(
        {
            "TESTING": True,
            "REDIS_URL": redis_server.url,
            "SETTINGS": Settings(redis_url=redis_server.url),
        }
    )
    client = app.test_client()
    status, body = _ready(client)
    assert status == 503 and "no worker" in body["error"]

    workers = [
        start_worker(redis_server.url, tmp_path, name=f"w{i}", ready=False) for i in range(2)
    ]
    try:
        for worker in workers:
            wait_worker_registered(redis_server.url, worker)
        status, body = _ready(client)
        assert (status, body["workers"]) == (200, 2)

        workers[0].kill()
        killed = time.monotonic()
        # Ready throughout while one worker lives; the dead one stops counting within a TTL.
        _wait_ready(client, lambda s, b: s != 200 or b["workers"] == 1, KEY_TTL + 5, "1 worker")
        assert _ready(client)[0] == 200
        assert time.monotonic() - killed < KEY_TTL + 5

        workers[1].kill()
        killed = time.monotonic()
        status, body = _wait_ready(client, lambda s, b: s == 503, KEY_TTL + 5, "503")
        assert (
            "no worker" in body["error"]
            and int(client.get("/v2/health/ready").headers["Retry-After"]) > 0
        )
        assert time.monotonic() - killed < KEY_TTL + 5
        # rq's registry still lists the dead (nobody is left to clean it): counting it, as
        # Worker.count does, would have kept answering ready.
        queue = app.extensions["convq"].queue
        assert Worker.count(queue=queue) >= 1 and live_workers(queue) == 0
        assert client.get("/v2/health/live").status_code == 200
    finally:
        for worker in workers:
            worker.close()


def _pickled_npy(marker) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Marker(marker)], dtype=object), allow_pickle=True)
    return buf.getvalue()


def test_nothing_a_worker_reads_from_redis_is_unpickled(redis_server, tmp_path):
    redis = connect(redis_server.url)
    store, queue = Store(redis), make_queue(redis)
    spec = {
        "name": "tiny",
        "input": {"channels": 1},
        "layers": [{"name": "c", "type": "conv", "filters": 1, "size": 1}],
    }
    from engine import Model

    model = Model.from_arrays(
        spec, {"c.w": np.full((1, 1, 1, 1), 2, np.float32), "c.b": np.zeros(1, np.float32)}
    )
    version = store.put_model("tiny", model.spec, model.to_safetensors(), owner=None)
    worker = start_worker(redis_server.url, tmp_path)
    try:
        # 1. A job record whose data is a pickle (rq's default serializer) of a marker.
        record_marker = tmp_path / "record-unpickled"
        job_id = "f" * 32
        now = "2026-01-01T00:00:00.000000Z"
        redis.hset(
            f"rq:job:{job_id}",
            mapping={
                "data": zlib.compress(pickle.dumps((Marker(record_marker), None, (), {}))),
                "status": "queued",
                "origin": queue.name,
                "created_at": now,
                "enqueued_at": now,
                "description": "x",
                "timeout": 60,
            },
        )
        redis.rpush(queue.key, job_id)

        # 2. A real job whose stored input was swapped for a pickled object .npy.
        input_marker = tmp_path / "input-unpickled"
        swapped = submit(
            queue,
            store,
            model="tiny",
            version=version,
            images=np.ones((1, 3, 3, 1), np.uint8),
            outputs=["c"],
            owner=None,
            retries=0,
        )
        redis.set(store.input_key(swapped), _pickled_npy(input_marker))

        # 3. A plain job after both: the worker must still be there to run it.
        after = submit(
            queue,
            store,
            model="tiny",
            version=version,
            images=np.full((1, 3, 3, 1), 5, np.uint8),
            outputs=["c"],
            owner=None,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status = job_status(queue, after)
            if status and status["status"] in ("finished", "failed"):
                break
            time.sleep(0.1)
        assert status["status"] == "finished", (status, worker.log()[-3000:])
        assert np.array_equal(store.result_array(after, "c"), np.full((1, 3, 3, 1), 10.0))

        assert not record_marker.exists() and not input_marker.exists()
        failed = job_status(queue, swapped)
        assert failed["status"] == "failed" and failed["attempt"] == 1, failed
        assert "pickle" in failed["error"], failed
        assert store.result_names(swapped) is None
        # The pickled record never ran and is not queued any more.
        assert job_id.encode() not in redis.lrange(queue.key, 0, -1)
        assert worker.alive()
    finally:
        worker.close()


def _vm(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _raw_post(base: str, path: str, headers: dict, body: bytes) -> tuple[int, dict, float]:
    """POST body with exactly the headers given (a Content-Length may lie); (status, JSON, s)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    began = time.monotonic()
    conn.putrequest("POST", path)
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    try:
        conn.send(body)
    except OSError:
        pass  # the server may answer and close before the whole body is sent
    response = conn.getresponse()
    out = response.status, json.loads(response.read()), time.monotonic() - began
    conn.close()
    return out


def test_bad_bodies_through_gunicorn_are_quick_4xx_with_flat_memory(redis_server, tmp_path):
    from tests.integration.test_bad_input import npz_many_members, npz_single_bomb, png_claiming

    api, base = start_api(
        redis_server.url,
        tmp_path,
        env={
            "CONVQ_API_WORKERS": "1",
            "CONVQ_MAX_CONTENT_LENGTH": "1000000",
            "CONVQ_MAX_MODEL_BYTES": "2000000",
        },
    )
    try:
        [horse] = api.children()
        spec = {
            "name": "g",
            "input": {"height": 9, "width": 9, "channels": 1},
            "layers": [{"name": "c", "type": "conv", "filters": 1, "size": 1}],
        }
        weights = io.BytesIO()
        np.savez(
            weights, **{"c.w": np.ones((1, 1, 1, 1), np.float32), "c.b": np.zeros(1, np.float32)}
        )
        rv = requests.post(
            f"{base}/v2/repository/models/g/load",
            timeout=30,
            files={
                "spec": ("spec.json", json.dumps(spec)),
                "weights": ("w.npz", weights.getvalue()),
            },
        )
        assert rv.status_code == 200, rv.text

        def load(data: bytes, filename: str) -> tuple[str, dict, bytes]:
            body = json.dumps(
                {
                    "parameters": {
                        "config": json.dumps(spec),
                        f"file:{filename}": base64.b64encode(data).decode(),
                    }
                }
            ).encode()
            return "/v2/repository/models/g/load", {"Content-Type": "application/json"}, body

        png_body = (
            b'--b\r\nContent-Disposition: form-data; name="images"; filename="x.png"'
            b"\r\nContent-Type: image/png\r\n\r\n" + png_claiming(10000, 10000) + b"\r\n--b--\r\n"
        )
        json_head = {"Content-Type": "application/json"}
        cases = [
            # (path, headers, body, status)
            ("/v2/models/g/jobs", {**json_head, "Content-Length": str(10 << 30)}, b"{}", 413),
            (
                "/v2/models/g/jobs",
                {**json_head, "Content-Length": "1500000"},
                b" " * 1_500_000,
                413,
            ),
            (
                "/v2/models/g/jobs",
                {
                    **json_head,
                    "Content-Encoding": "gzip",
                    "Content-Length": str(len(gz := gzip.compress(b" " * (256 << 20)))),
                },
                gz,
                413,
            ),
            (
                "/v2/models/g/jobs",
                {
                    "Content-Type": "multipart/form-data; boundary=b",
                    "Content-Length": str(len(png_body)),
                },
                png_body,
                413,
            ),
            (
                "/v2/repository/models/g/load",
                {**json_head, "Content-Length": str(10 << 30)},
                b"{}",
                413,
            ),
            *[
                (path, {**head, "Content-Length": str(len(body))}, body, 400)
                for path, head, body in (
                    load(npz_single_bomb(), "w.npz"),
                    load(npz_many_members(), "w.npz"),
                    load((1 << 40).to_bytes(8, "little") + b"{}", "w.safetensors"),
                )
            ],
        ]
        client = redis_server.client()
        keys = sorted(client.keys("*"))
        for path, headers, body, _ in cases:  # warm every code path (lazy imports) once
            _raw_post(base, path, headers, body)
        Path(f"/proc/{horse}/clear_refs").write_text("5")
        before = _vm(horse)["VmRSS"]
        for path, headers, body, status in cases:
            code, doc, seconds = _raw_post(base, path, headers, body)
            assert code == status and doc["error"], (path, headers, code, doc)
            assert seconds < 2, (path, headers, seconds)
        growth = _vm(horse)["VmHWM"] - before
        assert growth < 16 << 20, f"the API's peak RSS rose {growth / 2**20:.1f} MiB"
        assert sorted(client.keys("*")) == keys and client.llen("rq:queue:convq") == 0
        assert api.alive()
    finally:
        api.close()


def test_reaper_confirms_an_expired_heartbeat_before_requeueing(redis_server):
    from rq.registry import StartedJobRegistry

    from worker.reaper import reap_abandoned

    redis = connect(redis_server.url)
    store, queue = Store(redis), make_queue(redis)
    spec = {
        "name": "t",
        "input": {"channels": 1},
        "layers": [{"name": "c", "type": "conv", "filters": 1, "size": 1}],
    }
    from engine import Model

    model = Model.from_arrays(
        spec, {"c.w": np.ones((1, 1, 1, 1), np.float32), "c.b": np.zeros(1, np.float32)}
    )
    version = store.put_model("t", model.spec, model.to_safetensors(), owner=None)
    job_id = submit(
        queue,
        store,
        model="t",
        version=version,
        images=np.ones((1, 2, 2, 1), np.uint8),
        outputs=["c"],
        owner=None,
    )
    redis.lrem(queue.key, 0, job_id)
    queue.fetch_job(job_id).set_status("started")
    registry = StartedJobRegistry(queue=queue)
    entry, t0 = f"{job_id}:exec1", time.time()
    redis.zadd(registry.key, {entry: t0 - 1})  # its heartbeat expired a second ago

    # First sighting (say, the first sweep after Redis came back): noted, not acted on.
    assert reap_abandoned(queue, now=t0, confirm_after=3) == []
    # The worker was alive: its next heartbeat renews the entry, and the sighting is dropped.
    redis.zadd(registry.key, {entry: t0 + 5})
    assert reap_abandoned(queue, now=t0 + 2, confirm_after=3) == []
    # It stops again; sweeps see it expired, and only after 3 s of that is it re-queued.
    assert reap_abandoned(queue, now=t0 + 6, confirm_after=3) == []
    assert reap_abandoned(queue, now=t0 + 8, confirm_after=3) == []
    assert reap_abandoned(queue, now=t0 + 9, confirm_after=3) == [job_id]
    assert job_status(queue, job_id)["status"] == "queued"
    assert reap_abandoned(queue, now=t0 + 10, confirm_after=3) == []
    assert not redis.exists(f"convq:expired-seen:{queue.name}")  # nothing left behind


def test_redis_paused_past_a_heartbeat_ttl_mid_job_runs_it_once(redis_server, tmp_path):
    from tests.system.test_worker_faults import Bench, _assert_right, _submit_slow

    bench = Bench(redis_server)
    workers = [
        start_worker(redis_server.url, tmp_path, name=f"w{i}", ready=False) for i in range(2)
    ]
    try:
        for worker in workers:
            wait_worker_registered(redis_server.url, worker)
        job_id = _submit_slow(bench)
        bench.wait_layer(job_id, 2)
        # Longer than a started job's heartbeat TTL (1 + 4 s) and a worker key's (7 s): on
        # resume every heartbeat looks expired, and the idle worker's sweep must not re-queue
        # the job that is still running beside it.
        redis_server.pause()
        time.sleep(KEY_TTL + 2)
        redis_server.resume()
        status = bench.wait_end(job_id, timeout=120)
        assert status["status"] == "finished" and status["attempt"] == 1, status
        _assert_right(bench, job_id)  # the right numbers, not in the failed registry
        time.sleep(2)  # a second run, had one been queued, would have started by now
        lines = [line for worker in workers for line in worker.log().splitlines() if job_id in line]
        assert sum(" finished in " in line for line in lines) == 1, lines
        assert not any("re-queued" in line or "newer attempt" in line for line in lines), lines
        assert all(worker.alive() for worker in workers)
    finally:
        for worker in workers:
            worker.close()
