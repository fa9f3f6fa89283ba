"""Jobs end to end in one process: fakeredis, submit(), burst(); results equal Model.run."""

from __future__ import annotations

import json
import time
import zlib

import fakeredis
import numpy as np
import pytest
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from engine import Model
from tests.integration.scripted import scripted_run
from tests.models import tiny_arrays, tiny_model, tiny_spec
from worker import jobs
from worker.contract.config import Settings
from worker.contract.queue import (
    cancel,
    job_status,
    make_queue,
    queue_depth,
    submit,
    wait_for_end,
)
from worker.contract.store import Store
from worker.reaper import reap_abandoned
from worker.runner import burst

SETTINGS = Settings(result_ttl=300, input_ttl=600)


@pytest.fixture
def env():
    redis = fakeredis.FakeRedis()
    store = Store(redis, result_ttl=SETTINGS.result_ttl, input_ttl=SETTINGS.input_ttl)
    queue = make_queue(redis)
    model = tiny_model(open_input=True)
    version = store.put_model("tiny", model.spec, model.to_safetensors(), owner=None)
    images = np.random.default_rng(1).integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
    return redis, store, queue, model, version, images


def _submit(env, **kw):
    _redis, store, queue, _model, version, images = env
    args = {
        "model": "tiny",
        "version": version,
        "images": images,
        "outputs": ["conv1", "fc"],
        "owner": "key1",
        **kw,
    }
    return submit(queue, store, **args)


def test_results_equal_model_run(env):
    redis, store, queue, model, version, images = env
    job_id = _submit(env)
    assert job_status(queue, job_id)["status"] == "queued" and queue_depth(queue) == 1
    burst(redis, SETTINGS)
    status = job_status(queue, job_id)
    assert status["status"] == "finished", status
    assert (status["error"], status["attempt"], status["owner"]) == (None, 1, "key1")
    assert status["progress"] == {"layer": 4, "of": 4, "name": "fc"}
    assert status["timings"]["compute_seconds"] >= 0 and status["timings"]["queue_seconds"] >= 0
    expected = model.run(images, outputs=["conv1", "fc"])
    assert store.result_names(job_id) == ["conv1", "fc"]
    for name, want in expected.items():
        got = store.result_array(job_id, name)
        assert got.dtype == np.float32 and got.shape == want.shape
        assert np.array_equal(got, want)
    assert queue_depth(queue) == 0


def test_wait_for_end_returns_false_past_the_deadline_then_the_ended_status(env):
    redis, _store, queue, *_ = env
    job_id = _submit(env)
    began = time.monotonic()
    assert wait_for_end(queue, job_id, began + 0.05) is False  # no worker yet
    assert 0.05 <= time.monotonic() - began < 1.0
    burst(redis, SETTINGS)
    status = wait_for_end(queue, job_id, time.monotonic() + 5)
    assert status is not None and status is not False
    assert status["status"] == "finished" and status["id"] == job_id
    assert wait_for_end(queue, "0" * 32, time.monotonic() + 5) is None


def test_float_input_and_all_outputs(env):
    redis, store, queue, model, version, _ = env
    x = np.random.default_rng(2).standard_normal((1, 9, 9, 3)).astype(np.float32)
    job_id = _submit(env, images=x, outputs="all")
    burst(redis, SETTINGS)
    assert store.result_names(job_id) == model.layer_names
    assert np.array_equal(store.result_array(job_id, "pool1"), model.run(x, "all")["pool1"])


def test_every_blob_and_record_has_a_ttl(env):
    redis, store, queue, *_ = env
    ok, bad = _submit(env), _submit(env, outputs=["nope"])
    burst(redis, SETTINGS)
    assert job_status(queue, ok)["status"] == "finished"
    assert job_status(queue, bad)["status"] == "failed"
    keys = [
        k.decode()
        for k in redis.keys("convq:input:*")
        + redis.keys("convq:result:*")
        + redis.keys("rq:job:*")
        + redis.keys("rq:results:*")
    ]
    assert any(k.startswith("convq:result:") for k in keys) and len(keys) >= 5
    for key in keys:
        assert 0 < redis.ttl(key) <= 600, key


@pytest.mark.parametrize(
    "case, message",
    [
        ("model", "no longer available"),
        ("input", "expired"),
        ("outputs", "nope"),
        ("channels", "channel"),
    ],
)
def test_bad_job_fails_once_with_a_clear_error(env, case, message):
    redis, store, queue, model, version, images = env
    kw = {
        "model": {"model": "ghost"},
        "outputs": {"outputs": ["nope"]},
        "channels": {"images": images[..., :2]},
    }.get(case, {})
    job_id = _submit(env, **kw)
    if case == "input":
        redis.delete(store.input_key(job_id))
    burst(redis, SETTINGS)
    status = job_status(queue, job_id)
    assert status["status"] == "failed"
    assert message in status["error"].lower() or message in status["error"]
    assert status["attempt"] == 1  # not retried: a bad job cannot get better
    assert queue_depth(queue) == 0 and store.result_names(job_id) is None
    assert job_id in FailedJobRegistry(queue=queue)


def test_progress_is_written_each_layer_and_reset_per_attempt(env, monkeypatch):
    redis, store, queue, *_ = env
    seen = []
    original = Job.save_meta

    def spy(self):
        seen.append(json.loads(json.dumps(self.meta.get("progress"))))
        original(self)

    monkeypatch.setattr(Job, "save_meta", spy)
    monkeypatch.setattr(jobs, "PROGRESS_SECONDS", 0)  # record every layer, however fast
    job_id = _submit(env)
    burst(redis, SETTINGS)
    # Reset first, then one entry per layer computed (fc is last requested: all 4 run).
    assert seen[0] is None
    assert seen[1:] == [
        {"layer": i + 1, "of": 4, "name": n}
        for i, n in enumerate(["conv1", "relu1", "pool1", "fc"])
    ]
    stored = Job.fetch(job_id, connection=redis, serializer=JSONSerializer).meta
    assert stored["progress"] == {"layer": 4, "of": 4, "name": "fc"}


def test_fast_layers_record_progress_the_first_time_and_at_the_end(env, monkeypatch):
    # Saves (each with a cancel check: two Redis round trips) are PROGRESS_SECONDS apart at
    # least, so a deep net of fast layers does not spend its time on them.
    redis, store, queue, *_ = env
    seen, checks = [], []
    original_save, original_check = Job.save_meta, Store.run_state

    def save(self):
        seen.append(json.loads(json.dumps(self.meta.get("progress"))))
        original_save(self)

    def check(self, *args):
        checks.append(args)
        return original_check(self, *args)

    monkeypatch.setattr(Job, "save_meta", save)
    monkeypatch.setattr(Store, "run_state", check)
    monkeypatch.setattr(jobs, "PROGRESS_SECONDS", 3600)
    job_id = _submit(env)
    burst(redis, SETTINGS)
    assert seen == [
        None,
        {"layer": 1, "of": 4, "name": "conv1"},
        {"layer": 4, "of": 4, "name": "fc"},
    ]
    assert len(checks) == 2  # before the first layer and after the last: none in between
    assert job_status(queue, job_id)["progress"] == {"layer": 4, "of": 4, "name": "fc"}
    assert store.result_names(job_id) is not None


def test_a_layer_begun_too_soon_after_a_save_is_saved_at_its_next_step(env, monkeypatch):
    # A run of long layers: without this, the job showed layer 1 until it ended.
    redis, *_ = env
    monkeypatch.setattr(jobs, "PROGRESS_SECONDS", 0.2)
    job_id = _submit(env)
    shown = scripted_run(monkeypatch, redis, [job_id], pause=0.3)
    burst(redis, SETTINGS)
    assert shown == [{"layer": 2, "of": 3, "name": "b"}]
    assert job_status(make_queue(redis), job_id)["status"] == "finished"


def test_cancel_queued_job_deletes_everything(env):
    redis, store, queue, *_ = env
    job_id = _submit(env)
    assert cancel(queue, store, job_id) is True
    assert job_status(queue, job_id) is None and queue_depth(queue) == 0
    assert store.get_input(job_id) is None
    burst(redis, SETTINGS)
    assert store.result_names(job_id) is None
    assert cancel(queue, store, "no-such-job") is False


def test_deleting_a_finished_job_leaves_no_cancel_mark(env):
    redis, store, queue, *_ = env
    job_id = _submit(env)
    burst(redis, SETTINGS)
    assert job_status(queue, job_id)["status"] == "finished"
    assert cancel(queue, store, job_id) is True
    assert redis.keys("convq:*") != [] and redis.keys(f"convq:*{job_id}*") == []


def test_cancel_running_job_stops_between_layers(env, monkeypatch):
    redis, store, queue, *_ = env
    job_id = _submit(env)
    layers = []
    original = jobs._save_progress

    def cancel_at_layer_two(job, progress):
        original(job, progress)
        layers.append(progress and progress["layer"])
        if progress and progress["layer"] == 2:
            assert job_status(queue, job.id)["status"] == "started"
            assert cancel(queue, store, job.id) is True

    monkeypatch.setattr(jobs, "_save_progress", cancel_at_layer_two)
    monkeypatch.setattr(jobs, "PROGRESS_SECONDS", 0)  # check before every layer
    burst(redis, SETTINGS)
    assert layers == [None, 1, 2]  # layer 3 never started
    assert job_status(queue, job_id) is None
    assert store.result_names(job_id) is None and store.get_input(job_id) is None
    assert redis.keys("convq:cancel:*") == [] and redis.keys("convq:run:*") == []
    assert job_id not in FailedJobRegistry(queue=queue)


def test_timeout_between_layers_fails_with_timeout_error(env, monkeypatch):
    redis, store, queue, *_ = env
    clock = iter(range(0, 10_000, 4))  # every look at the clock is 4 s later
    monkeypatch.setattr(jobs.time, "monotonic", lambda: next(clock))
    job_id = _submit(env, job_timeout=5)
    follower = _submit(env)
    burst(redis, SETTINGS)
    status = job_status(queue, job_id)
    assert status["status"] == "failed" and "timed out" in status["error"]
    assert "5 s timeout" in status["error"] and status["attempt"] == 1
    # The worker went on to the next job, whose default timeout (600 s) is not reached.
    assert job_status(queue, follower)["status"] == "finished"
    # Neither keeps its input (or a run claim) for the input's TTL.
    assert redis.keys("convq:input*") == [] and redis.keys("convq:run:*") == []


def test_timeout_inside_one_long_layer_stops_the_thread_worker(env, monkeypatch):
    from engine import model as model_module

    redis, store, queue, *_ = env
    one = {"name": "one", "input": {"channels": 3}, "layers": [tiny_spec()["layers"][0]]}
    arrays = {k: v for k, v in tiny_arrays().items() if k.startswith("conv1")}
    net = Model.from_arrays(one, arrays)
    version = store.put_model("one", net.spec, net.to_safetensors(), owner=None)
    steps = []
    monkeypatch.setattr(model_module, "STEP_MACS", 1)  # one output row per step
    real_step = model_module.Model._apply_in_steps

    def counting(self, step, xs, **kw):
        inner = kw["on_step"]

        def on_step():
            steps.append(1)
            inner()

        return real_step(self, step, xs, on_step=on_step)

    monkeypatch.setattr(model_module.Model, "_apply_in_steps", counting)
    clock = iter(range(0, 10_000, 4))  # every look run_model takes at the clock is 4 s later
    monkeypatch.setattr(jobs, "time", type("Clock", (), {"monotonic": lambda: next(clock)}))
    job_id = _submit(env, model="one", version=version, outputs=["conv1"], job_timeout=5)
    burst(redis, SETTINGS)
    status = job_status(queue, job_id)
    # One layer only: the old between-layers check never fired and the job finished.
    assert status["status"] == "failed" and "timed out" in status["error"], status
    assert "in layer 1 of 1 (conv1)" in status["error"]
    assert len(steps) == 1  # stopped at the first band; the image has 10 output rows
    assert redis.keys("convq:input*") == []


def test_hand_written_record_naming_os_system_never_runs(env, tmp_path):
    redis, store, queue, *_ = env
    target = tmp_path / "pwned"
    job_id = "evil0001"
    data = json.dumps(["os.system", None, [f"touch {target}"], {}]).encode()
    now = "2026-01-01T00:00:00.000000Z"
    redis.hset(
        f"rq:job:{job_id}",
        mapping={
            "data": zlib.compress(data),
            "status": "queued",
            "origin": queue.name,
            "created_at": now,
            "enqueued_at": now,
            "description": "x",
            "timeout": 60,
        },
    )
    redis.rpush(queue.key, job_id)
    # The same through stock rq's own API, and a name that only looks like ours.
    import rq

    plain = rq.Queue(queue.name, connection=redis, serializer=JSONSerializer)
    sneaky = plain.enqueue_call("worker.jobs.os.system", args=[f"touch {target}"]).id
    burst(redis, SETTINGS)
    assert not target.exists()
    for jid in (job_id, sneaky):
        status = job_status(queue, jid)
        assert status["status"] == "failed" and "refusing to run" in status["error"], status


def test_abandoned_job_is_requeued_then_finishes(env):
    redis, store, queue, model, version, images = env
    job_id = _submit(env)
    job = _pretend_a_dead_worker_started(redis, queue, job_id)
    assert reap_abandoned(queue, now=time.time() + 1) == [job_id]
    assert job_status(queue, job_id)["status"] == "queued" and queue_depth(queue) == 1
    burst(redis, SETTINGS)
    status = job_status(queue, job_id)
    assert status["status"] == "finished" and status["attempt"] == 2
    assert job.id not in FailedJobRegistry(queue=queue)
    want = model.run(images, outputs=["fc"])["fc"]
    assert np.array_equal(store.result_array(job_id, "fc"), want)


def test_abandoned_job_without_retries_fails(env):
    redis, store, queue, *_ = env
    job_id = _submit(env, retries=0)
    _pretend_a_dead_worker_started(redis, queue, job_id)
    assert reap_abandoned(queue, now=time.time() + 1) == [job_id]
    status = job_status(queue, job_id)
    assert status["status"] == "failed" and "worker died" in status["error"]


def test_reaper_leaves_fresh_and_finished_jobs_alone(env):
    redis, store, queue, *_ = env
    job_id = _submit(env)
    _pretend_a_dead_worker_started(redis, queue, job_id, expires_in=60)
    assert reap_abandoned(queue) == []  # heartbeat still valid
    burst(redis, SETTINGS)  # nothing queued: the job is "running elsewhere"
    done = _submit(env)
    burst(redis, SETTINGS)
    registry = StartedJobRegistry(queue=queue)
    redis.zadd(registry.key, {f"{done}:stale": 1})  # a leftover entry of a finished job
    assert reap_abandoned(queue, now=time.time() + 120) == [job_id]
    assert job_status(queue, done)["status"] == "finished"
    assert done not in FailedJobRegistry(queue=queue)


def _pretend_a_dead_worker_started(redis, queue, job_id, expires_in=-5):
    job = queue.fetch_job(job_id)
    redis.lrem(queue.key, 0, job_id)
    job.set_status(JobStatus.STARTED)
    registry = StartedJobRegistry(queue=queue)
    redis.zadd(registry.key, {f"{job_id}:deadbeef": time.time() + expires_in})
    return job


def test_superseded_run_stops_without_touching_the_job(env, monkeypatch):
    redis, store, queue, *_ = env
    job_id = _submit(env)
    original = jobs._save_progress

    def newer_attempt_at_layer_two(job, progress):
        original(job, progress)
        if progress and progress["layer"] == 2:
            store.claim_run(job.id, "a-newer-attempt", ttl=60)

    monkeypatch.setattr(jobs, "_save_progress", newer_attempt_at_layer_two)
    monkeypatch.setattr(jobs, "PROGRESS_SECONDS", 0)  # check before every layer
    burst(redis, SETTINGS)
    status = job_status(queue, job_id)
    # Left as the newer attempt will find it: started, no error, no result, not failed.
    assert status["status"] == "started" and status["error"] is None
    assert status["progress"]["layer"] == 2
    assert store.result_names(job_id) is None
    assert job_id not in FailedJobRegistry(queue=queue)
    assert StartedJobRegistry(queue=queue).get_job_ids(cleanup=False) == []


def test_job_popped_by_a_worker_that_died_is_requeued(env):
    from worker.reaper import reap_unstarted
    from worker.runtime import current
    from worker.workers import build

    redis, store, queue, model, version, images = env
    job_id = _submit(env)
    redis.lmove(queue.key, queue.intermediate_queue.key)  # popped, then the worker died
    assert queue_depth(queue) == 0
    sweeper = build("thread", redis, SETTINGS, current())
    assert reap_unstarted(sweeper, queue, older_than=0) == []  # first sighting only
    assert reap_unstarted(sweeper, queue, older_than=3600) == []  # not old enough yet
    assert reap_unstarted(sweeper, queue, older_than=0) == [job_id]
    assert queue_depth(queue) == 1 and queue.intermediate_queue.get_job_ids() == []
    burst(redis, SETTINGS)
    status = job_status(queue, job_id)
    assert status["status"] == "finished" and status["attempt"] == 2


def test_wait_for_end_wakes_on_the_jobs_end_signal_not_its_next_look(env):
    import threading

    redis, _store, queue, *_ = env
    job_id = _submit(env)
    woke: list[float] = []

    def wait() -> None:
        status = wait_for_end(queue, job_id, time.monotonic() + 30, poll_max=20.0)
        woke.append(time.monotonic())
        assert status is not None and status is not False and status["status"] == "finished"

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.2)  # the waiter is blocked on the signal (one look takes up to 20 s)
    burst(redis, SETTINGS)
    ended = time.monotonic()
    waiter.join(10)
    assert woke and woke[0] - ended < 2.0  # woken by the worker's push, long before 20 s


def test_submit_writes_nothing_when_its_transaction_fails(env):
    redis, store, queue, *_ = env

    def refuse(pipe, job_id):
        pipe.zadd("convq:test:seen", {job_id: 1})
        raise RuntimeError("refused")

    with pytest.raises(RuntimeError, match="refused"):
        _submit(env, also_write=refuse)
    # Nothing of the job was written: no record, no queue entry, no input, no owner list.
    assert queue_depth(queue) == 0 and redis.keys("rq:job:*") == []
    assert redis.keys("convq:input:*") == [] and redis.keys("convq:jobs:*") == []
    assert redis.exists("convq:test:seen") == 0


def test_submit_writes_what_also_write_adds_with_the_job(env):
    redis, store, queue, *_ = env
    job_id = _submit(env, also_write=lambda pipe, job_id: pipe.set("convq:test:with", job_id))
    assert redis.get("convq:test:with") == job_id.encode()
    assert job_status(queue, job_id)["status"] == "queued"
    assert store.get_input(job_id) is not None
