"""The fast paths of the service: results in GETRANGE slices over a real Redis, one horse per
worker reused across jobs (and replaced when it dies while idle)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.models import tiny_model
from tests.system.procs import start_worker
from tests.system.test_worker_faults import Bench
from worker.contract.store import SLICE_BYTES, Store


@pytest.fixture
def store(redis_server):
    return Store(redis_server.client(), result_ttl=100, input_ttl=200)


def test_results_bigger_than_a_slice_come_back_exact(store):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((3, 7, 11, SLICE_BYTES // 200 + 3)).astype(np.float32)
    small = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    assert big.nbytes > 2 * SLICE_BYTES and big.nbytes % SLICE_BYTES
    store.put_result("j", {"big": big, "small": small})
    assert store.result_names("j") == ["big", "small"]
    assert store.result_layout("j", "big") == (big.shape, np.dtype("<f4"))
    assert b"".join(store.result_slices("j", "big")) == big.tobytes()
    back = store.result_array("j", "big")
    assert np.array_equal(back, big) and back.flags.writeable
    assert np.array_equal(store.result_array("j", "small"), small)
    assert store.result_slices("j", "nope") is None and store.result_array("j", "nope") is None
    assert 0 < store.redis.ttl("convq:result:j:0") <= 100
    store.delete_job("j")
    assert store.redis.keys("convq:result:j*") == []


def test_input_bigger_than_a_slice_round_trips(store):
    images = np.random.default_rng(1).integers(0, 256, (5, 300, 500, 3), dtype=np.uint8)
    assert images.nbytes > SLICE_BYTES
    store.put_input("k", images)
    back = store.get_input("k")
    assert back.dtype == np.uint8 and np.array_equal(back, images)
    assert store.get_input("missing") is None


def test_result_deleted_while_streamed_raises_rather_than_truncates(store):
    data = np.ones((1, 1, 1, 4 * SLICE_BYTES // 4), np.float32)  # 4 slices
    store.put_result("j", {"x": data})
    pieces = store.result_slices("j", "x")
    assert len(next(pieces)) == SLICE_BYTES
    store.delete_job("j")
    with pytest.raises(LookupError):
        for _ in pieces:
            pass


def _children(proc, want: int, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = proc.children()
        if len(kids) == want:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"worker has children {proc.children()}, expected {want}")


@pytest.mark.system
def test_one_horse_runs_many_jobs_and_a_dead_idle_horse_is_replaced(redis_server, tmp_path):
    bench = Bench(redis_server)
    model = tiny_model(open_input=True)
    version = bench.upload("tiny", model)
    x = np.random.default_rng(3).standard_normal((2, 9, 9, 3)).astype(np.float32)
    want = model.run(x, ["pool1"])["pool1"]
    worker = start_worker(redis_server.url, tmp_path)
    try:
        [horse] = _children(worker, 1)  # forked while idle, before any job
        for _ in range(3):
            job_id = bench.submit("tiny", version, x, ["pool1"])
            assert bench.wait_end(job_id, 30)["status"] == "finished"
            assert np.array_equal(bench.store.result_array(job_id, "pool1"), want)
            assert worker.children() == [horse]
        os.kill(horse, signal.SIGKILL)  # dies idle: the next job must not be lost to it
        job_id = bench.submit("tiny", version, x, ["pool1"])
        status = bench.wait_end(job_id, 30)
        assert status["status"] == "finished" and status["attempt"] == 1, status
        assert np.array_equal(bench.store.result_array(job_id, "pool1"), want)
        [new] = _children(worker, 1)
        assert new != horse and worker.alive()
        # A long-lived horse gives a big job's memory back once idle, not idling at its peak.
        before = _rss_mib(new)
        big = np.random.default_rng(4).standard_normal((6, 601, 601, 3)).astype(np.float32)
        for _ in range(2):
            job_id = bench.submit("tiny", version, big, ["conv1", "pool1"])
            assert bench.wait_end(job_id, 60)["status"] == "finished"
        deadline = time.monotonic() + 10  # it trims once idle for a second
        while _rss_mib(new) >= before + 16 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _rss_mib(new) < before + 16, (before, _rss_mib(new))
    finally:
        worker.close()


def _rss_mib(pid: int) -> float:
    pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGESIZE") / 2**20
