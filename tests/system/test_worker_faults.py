"""Faults a production queue meets, against real redis-server and `convq worker` processes.

Each test kills or stops something while a job is known to be mid-way (its progress shows a
started layer) and checks the job still ends right: same numbers as Model.run, never lost,
never failed when it finished.
"""

from __future__ import annotations

import functools
import os
import signal
import time

import numpy as np
import pytest
from rq.registry import FailedJobRegistry

from engine import Model
from tests.models import tiny_model
from tests.system.models import HEAD, SIZE, conv_stack, slow_image_count
from tests.system.models import slow_images as stack_images
from tests.system.procs import pid_alive, start_worker, worker_pids
from worker.contract.connection import connect
from worker.contract.queue import job_status, make_queue, submit
from worker.contract.store import Store

pytestmark = [pytest.mark.system, pytest.mark.slow]

LAYERS = 30


@functools.cache
def slow_model() -> Model:
    """30 3x3 convs, 64 channels, then a global pool: ~SLOW_SECONDS per job of slow_images()."""
    return Model.from_arrays(*conv_stack(LAYERS, seed=0))


@functools.cache
def slow_images() -> np.ndarray:
    return stack_images(LAYERS, seed=1)


@functools.cache
def slow_expected() -> np.ndarray:
    return slow_model().run(slow_images(), outputs=[HEAD])[HEAD]


class Bench:
    """The client side of one test: queue, store and a model uploaded under a name."""

    def __init__(self, server):
        self.redis = connect(server.url)
        self.store = Store(self.redis)
        self.queue = make_queue(self.redis)

    def upload(self, name: str, model: Model) -> int:
        return self.store.put_model(name, model.spec, model.to_safetensors(), owner=None)

    def submit(self, name, version, images, outputs, **kw) -> str:
        return submit(
            self.queue,
            self.store,
            model=name,
            version=version,
            images=images,
            outputs=outputs,
            owner=None,
            **kw,
        )

    def status(self, job_id):
        return job_status(self.queue, job_id)

    def wait(self, job_id, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.status(job_id)
            if predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {status}")

    def wait_layer(self, job_id, layer: int, timeout: float = 60.0):
        return self.wait(
            job_id,
            lambda s: (
                s and s["status"] == "started" and s["progress"] and s["progress"]["layer"] >= layer
            ),
            timeout,
            f"layer {layer}",
        )

    def wait_end(self, job_id, timeout: float = 90.0):
        return self.wait(
            job_id, lambda s: s and s["status"] in ("finished", "failed"), timeout, "the job to end"
        )


@pytest.fixture
def workers(tmp_path):
    procs = []

    def start(url, **kw):
        proc = start_worker(url, tmp_path, name=f"w{len(procs)}", **kw)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.close()


def _submit_slow(bench, **kw):
    version = bench.upload("slow", slow_model())
    return bench.submit("slow", version, slow_images(), [HEAD], **kw)


def _assert_right(bench, job_id):
    got = bench.store.result_array(job_id, HEAD)
    assert got is not None and np.array_equal(got, slow_expected())
    assert job_id not in FailedJobRegistry(queue=bench.queue)


def _numba_pools(pid: int) -> set[str]:
    """Which of Numba's thread-pool libraries (loaded when a pool starts) pid has mapped."""
    with open(f"/proc/{pid}/maps") as maps:
        text = maps.read()
    return {name for name in ("omppool", "tbbpool", "workqueue") if f"/{name}." in text}


def test_kernels_run_only_in_the_horse_so_it_may_use_openmp(redis_server, workers):
    # GNU OpenMP (and Numba) refuse a child forked from a process that started its thread pool,
    # so the worker itself must never start it; its horse loads and runs every kernel.
    bench = Bench(redis_server)
    worker = workers(redis_server.url, env={"CONVQ_THREADS": "2"})
    (horse,) = worker.children()  # forked and warm before the worker registered
    version = bench.upload("tiny", tiny_model(open_input=True))
    images = np.random.default_rng(3).integers(0, 256, (4, 11, 13, 3), dtype=np.uint8)
    job_id = bench.submit("tiny", version, images, ["pool1"])
    assert bench.wait_end(job_id)["status"] == "finished"
    got = bench.store.result_array(job_id, "pool1")
    assert np.array_equal(got, tiny_model(open_input=True).run(images, outputs=["pool1"])["pool1"])
    assert worker.children() == [horse]  # the same horse ran it
    assert _numba_pools(worker.pid) == set()  # no thread pool ever started in the worker
    assert _numba_pools(horse) == {"omppool"}  # OpenMP runs the horse's kernels
    assert "Terminating" not in worker.log()


def test_killed_horse_is_retried_and_restarts_progress(redis_server, workers):
    bench = Bench(redis_server)
    worker = workers(redis_server.url)
    job_id = _submit_slow(bench)
    bench.wait_layer(job_id, 3)
    horses = worker.children()
    assert len(horses) == 1
    os.kill(horses[0], signal.SIGKILL)
    # Progress starts over on the second attempt.
    again = bench.wait(
        job_id,
        lambda s: (
            s["status"] == "started"
            and s["attempt"] == 2
            and s["progress"]
            and s["progress"]["layer"] < 3
        ),
        60,
        "attempt 2",
    )
    assert again["progress"]["of"] == LAYERS + 1  # the convs and the pool
    status = bench.wait_end(job_id)
    assert status["status"] == "finished" and status["attempt"] == 2, status
    _assert_right(bench, job_id)
    assert worker.alive()


def test_killed_worker_job_finishes_on_another_within_90s(redis_server, workers):
    bench = Bench(redis_server)
    first, second = workers(redis_server.url), workers(redis_server.url)
    job_id = _submit_slow(bench)
    bench.wait_layer(job_id, 2)
    job = bench.queue.fetch_job(job_id)
    victim = {first.pid: first, second.pid: second}[worker_pids(redis_server.url)[job.worker_name]]
    survivor = second if victim is first else first
    horse = victim.children()
    killed_at = time.monotonic()
    victim.kill()
    # The horse dies with its worker, so the job never runs twice at once.
    deadline = time.monotonic() + 5
    while horse and pid_alive(horse[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not (horse and pid_alive(horse[0]))
    status = bench.wait_end(job_id, timeout=90)
    assert status["status"] == "finished", (status, survivor.log()[-3000:])
    assert time.monotonic() - killed_at < 90
    assert status["attempt"] == 2
    _assert_right(bench, job_id)
    # The dead worker drops out of the registry within a heartbeat TTL (readiness counts it).
    while victim.pid in worker_pids(redis_server.url).values():
        assert time.monotonic() - killed_at < 30, "dead worker still registered"
        time.sleep(0.2)
    assert survivor.pid in worker_pids(redis_server.url).values()


def test_sigterm_while_busy_finishes_the_job_then_exits_0(redis_server, workers):
    bench = Bench(redis_server)
    worker = workers(redis_server.url)
    job_id = _submit_slow(bench)
    bench.wait_layer(job_id, 2)
    worker.signal(signal.SIGTERM)
    assert worker.wait(90) == 0, worker.log()[-3000:]
    status = bench.status(job_id)
    assert status["status"] == "finished" and status["attempt"] == 1
    _assert_right(bench, job_id)


def test_job_timeout_fails_and_worker_takes_the_next(redis_server, workers):
    bench = Bench(redis_server)
    workers(redis_server.url)
    between_layers = _submit_slow(bench, job_timeout=1)
    # One layer far longer than timeout + grace: only the worker's kill can stop it. 520 GFLOP
    # in one conv call takes >= 4.5 s even at one core's peak (~116 GFLOP/s), kill comes at ~3 s.
    rng = np.random.default_rng(3)
    big = Model.from_arrays(
        {
            "name": "big",
            "input": {"channels": 64},
            "layers": [{"name": "big", "type": "conv", "filters": 512, "size": 11, "pad": 5}],
        },
        {
            "big.w": (rng.standard_normal((512, 11, 11, 64)) * 0.01).astype(np.float32),
            "big.b": np.zeros(512, np.float32),
        },
    )
    x = rng.standard_normal((4, 128, 128, 64)).astype(np.float32)
    in_kernel = bench.submit("big", bench.upload("big", big), x, ["big"], job_timeout=1)
    tiny = tiny_model(open_input=True)
    after = bench.submit(
        "tiny", bench.upload("tiny", tiny), np.ones((1, 9, 9, 3), np.uint8), ["fc"]
    )
    for job_id in (between_layers, in_kernel):
        status = bench.wait_end(job_id, timeout=60)
        assert status["status"] == "failed" and "timed out" in status["error"], status
        assert status["attempt"] == 1
        # Bounded: timeout 1 s + grace 2 s + one heartbeat, not the kernel's full run.
        assert status["timings"]["compute_seconds"] < 8, status
    assert bench.wait_end(after, timeout=30)["status"] == "finished"


def test_horse_that_never_returns_is_killed_at_timeout_plus_grace(redis_server, workers):
    bench = Bench(redis_server)
    worker = workers(redis_server.url)
    job_id = _submit_slow(bench, job_timeout=3)
    bench.wait_layer(job_id, 1)
    # A stopped horse is what a kernel that never yields looks like to the worker: no Python
    # line runs, so rq's SIGALRM cannot fire; only the worker's kill ends it.
    os.kill(worker.children()[0], signal.SIGSTOP)
    status = bench.wait_end(job_id, timeout=30)
    assert status["status"] == "failed" and "worker killed it" in status["error"], status
    assert status["attempt"] == 1  # a timeout is not retried
    assert 3 <= status["timings"]["compute_seconds"] < 3 + 2 + 3, status
    assert worker.alive()


def test_redis_killed_and_restarted_with_aof_loses_no_job(redis_server_factory, workers):
    server = redis_server_factory(aof=True)
    bench = Bench(server)
    w1, w2 = workers(server.url), workers(server.url)
    tiny = tiny_model(open_input=True)
    version = bench.upload("tiny", tiny)
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (1, 9, 9, 3), dtype=np.uint8) for _ in range(100)]
    ids = [bench.submit("tiny", version, x, ["fc"]) for x in images]
    time.sleep(1.5)  # appendfsync everysec: the submissions are on disk
    server.restart()
    bench = Bench(server)
    for job_id in ids:
        status = bench.wait_end(job_id, timeout=120)
        assert status["status"] == "finished", status
    for job_id, x in zip(ids, images, strict=True):
        assert np.array_equal(bench.store.result_array(job_id, "fc"), tiny.run(x, ["fc"])["fc"])
    assert len(FailedJobRegistry(queue=bench.queue)) == 0
    assert w1.alive() and w2.alive()


def test_worker_survives_redis_outage_and_pause(redis_server, workers):
    worker = workers(redis_server.url)
    tiny = tiny_model(open_input=True)
    redis_server.kill()
    time.sleep(4)
    assert worker.alive()
    redis_server.start()
    bench = Bench(redis_server)
    version = bench.upload("tiny", tiny)
    job_id = bench.submit("tiny", version, np.ones((1, 9, 9, 3), np.uint8), ["fc"])
    status = bench.wait_end(job_id, timeout=60)
    assert status["status"] == "finished", worker.log()[-3000:]
    redis_server.pause()  # SIGSTOP: connections hang instead of failing
    time.sleep(4)
    redis_server.resume()
    job_id = bench.submit("tiny", version, np.ones((1, 9, 9, 3), np.uint8), ["fc"])
    assert bench.wait_end(job_id, timeout=60)["status"] == "finished", worker.log()[-3000:]
    assert worker.alive()


def _submit_batch(bench, count: int = 3) -> tuple[list[str], list[np.ndarray]]:
    """Queue count slow jobs of different images (two keys' worth of owners), together about
    as long as one slow job."""
    version = bench.upload("slow", slow_model())
    each = max(1, -(-slow_image_count(LAYERS) // count))
    images = list(
        stack_images(LAYERS, seed=7, count=each * count).reshape(count, each, SIZE, SIZE, 3)
    )
    ids = [bench.submit("slow", version, x, [HEAD]) for x in images]
    return ids, images


def _wait_batch_started(bench, ids, images, layer: int) -> None:
    total = sum(len(x) for x in images)
    for job_id in ids:
        status = bench.wait_layer(job_id, layer)
        assert status["batch"] == {"jobs": len(ids), "images": total}, status


def _assert_each_right(bench, ids, images, attempt: int) -> None:
    for job_id, x in zip(ids, images, strict=True):
        status = bench.wait_end(job_id)
        assert status["status"] == "finished" and status["attempt"] == attempt, status
        got = bench.store.result_array(job_id, HEAD)
        assert np.array_equal(got, slow_model().run(x, outputs=[HEAD])[HEAD])
        assert job_id not in FailedJobRegistry(queue=bench.queue)


def test_killed_horse_mid_batch_retries_every_job_of_it(redis_server, workers):
    bench = Bench(redis_server)
    ids, images = _submit_batch(bench)
    worker = workers(redis_server.url)  # started after the jobs: it takes all three at once
    _wait_batch_started(bench, ids, images, 3)
    (horse,) = worker.children()
    os.kill(horse, signal.SIGKILL)
    _assert_each_right(bench, ids, images, attempt=2)
    assert worker.alive()


def test_killed_worker_mid_batch_every_job_finishes_on_another(redis_server, workers):
    bench = Bench(redis_server)
    ids, images = _submit_batch(bench)
    victim = workers(redis_server.url)
    _wait_batch_started(bench, ids, images, 2)
    survivor = workers(redis_server.url)
    killed_at = time.monotonic()
    victim.kill()
    _assert_each_right(bench, ids, images, attempt=2)
    assert time.monotonic() - killed_at < 90, survivor.log()[-3000:]
