"""Embedded workers: threads in this process over a shared fakeredis server (`convq up`)."""

from __future__ import annotations

import signal
import threading
import time

import fakeredis
import numpy as np

from engine import Model
from worker.contract.config import Settings
from worker.contract.queue import job_status, make_queue, submit
from worker.contract.store import Store
from worker.embedded import start_workers

SPEC = {
    "name": "e",
    "input": {"channels": 1},
    "layers": [
        {"name": "c", "type": "conv", "filters": 2, "size": 3, "pad": 1},
        {"name": "p", "type": "avgpool", "size": 2},
    ],
}


def _wait(queue, ids, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [job_status(queue, i)["status"] for i in ids]
        if all(s in ("finished", "failed") for s in states):
            return states
        time.sleep(0.05)
    raise AssertionError(f"jobs did not end: {states}")


def test_threads_share_the_api_server_and_stop_cleanly():
    server = fakeredis.FakeServer()
    api_side = fakeredis.FakeRedis(server=server)
    rng = np.random.default_rng(0)
    model = Model.from_arrays(
        SPEC,
        {
            "c.w": rng.standard_normal((2, 3, 3, 1)).astype(np.float32),
            "c.b": np.zeros(2, np.float32),
        },
    )
    store = Store(api_side)
    version = store.put_model("e", model.spec, model.to_safetensors(), owner=None)
    queue = make_queue(api_side)
    before = signal.getsignal(signal.SIGTERM)
    handle = start_workers(api_side, Settings(poll=0.1), n=2)
    try:
        assert handle.alive == 2
        images = [rng.integers(0, 256, (1, 8, 8), dtype=np.uint8) for _ in range(6)]
        ids = [
            submit(queue, store, model="e", version=version, images=x, outputs=["p"], owner=None)
            for x in images
        ]
        assert _wait(queue, ids) == ["finished"] * 6
        for job_id, x in zip(ids, images, strict=True):
            assert np.array_equal(store.result_array(job_id, "p"), model.run(x, ["p"])["p"])
        # Neither thread touched the main thread's signal handlers.
        assert signal.getsignal(signal.SIGTERM) is before
        assert threading.current_thread() is threading.main_thread()
        # The workers use their own clients: the API's short socket timeout is untouched.
        assert api_side.connection_pool.connection_kwargs.get("socket_timeout") == 5
    finally:
        started = time.monotonic()
        handle.stop()
    assert handle.alive == 0 and time.monotonic() - started < 10


def test_a_new_fork_workers_key_lives_one_heartbeat_ttl_from_birth():
    from worker.runtime import Runtime
    from worker.workers import build

    redis = fakeredis.FakeStrictRedis()
    settings = Settings(heartbeat=1, heartbeat_grace=4)
    worker = build("fork", redis, settings, Runtime(settings))  # forks nothing until it works
    worker.register_birth()
    try:
        assert 0 < redis.ttl(worker.key) <= 1 + 4 + worker.poll_seconds
    finally:
        worker.register_death()
