"""Dynamic batching in one process: fakeredis, submit(), the thread worker's burst().

Jobs queued together for the same model, outputs and image size run as one engine batch; each
must still end exactly as it would alone: its own rows of the result, its own status, error,
owner and cancel, never a batch-mate's data.
"""

from __future__ import annotations

import dataclasses

import fakeredis
import numpy as np
import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

import engine
from engine import EngineError
from tests.integration.scripted import scripted_run
from tests.models import tiny_model
from worker import batch_run
from worker.batch_take import take_batch
from worker.contract import lean
from worker.contract.config import Settings
from worker.contract.queue import cancel, job_status, make_queue, queue_depth, submit
from worker.contract.store import Store
from worker.jobclass import ConvqJob
from worker.runner import burst
from worker.runtime import Runtime
from worker.workers import build

SETTINGS = Settings(result_ttl=300, input_ttl=600, batch_max_images=32, batch_wait_ms=0)
OUTPUTS = ["conv1", "fc"]


@pytest.fixture
def env(blob_dir):
    """fakeredis with the tiny model; job data in Redis or in a blob directory (both kinds)."""
    redis = fakeredis.FakeRedis()
    store = Store.from_settings(redis, dataclasses.replace(SETTINGS, blob_dir=blob_dir))
    queue = make_queue(redis)
    model = tiny_model(open_input=True)
    version = store.put_model("tiny", model.spec, model.to_safetensors(), owner=None)
    return redis, store, queue, model, version


def _burst(env, **changes) -> None:
    """Run every queued job with the thread worker, settings as SETTINGS with changes."""
    redis, store, *_ = env
    blob_dir = None if store.blobs is None else str(store.blobs.root)
    burst(redis, dataclasses.replace(SETTINGS, blob_dir=blob_dir, **changes))


def _images(seed: int, n: int, h: int = 9, w: int = 11) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _submit(
    env, images, *, owner="key1", outputs=OUTPUTS, model="tiny", version=None, lean=None, meta=None
):
    _redis, store, queue, _model, v = env
    return submit(
        queue,
        store,
        model=model,
        version=v if version is None else version,
        images=images,
        outputs=outputs,
        owner=owner,
        lean=lean,
        meta=meta,
    )


def _meta(redis, job_id) -> dict:
    return Job.fetch(job_id, connection=redis, serializer=JSONSerializer).meta


def _assert_alone_equal(env, job_id, images, outputs=OUTPUTS):
    """The job's stored result equals Model.run on its own images, output by output."""
    _redis, store, _queue, model, _v = env
    want = model.run(images, outputs=outputs)
    assert store.result_names(job_id) == list(want)
    for name, arr in want.items():
        got = store.result_array(job_id, name)
        assert got.shape == arr.shape, name
        np.testing.assert_allclose(got, arr, rtol=1e-5, atol=1e-5)


def test_jobs_of_two_keys_run_as_one_batch_each_with_its_own_rows(env):
    redis, _store, queue, _model, _v = env
    sizes = [1, 2, 1, 3]
    images = [_images(seed, n) for seed, n in enumerate(sizes)]
    owners = ["key1", "key2", "key1", "key2"]
    ids = [_submit(env, x, owner=o) for x, o in zip(images, owners, strict=True)]
    _burst(env)
    batches = set()
    for job_id, x, owner in zip(ids, images, owners, strict=True):
        status = job_status(queue, job_id)
        assert status["status"] == "finished", status
        assert status["owner"] == owner and status["error"] is None and status["attempt"] == 1
        assert status["progress"] == {"layer": 4, "of": 4, "name": "fc"}
        assert status["batch"] == {"jobs": 4, "images": 7}
        batches.add(_meta(redis, job_id)["batch"]["id"])
        _assert_alone_equal(env, job_id, x)
    assert len(batches) == 1  # one engine run for the four jobs
    assert queue_depth(queue) == 0 and redis.llen(queue.intermediate_queue_key) == 0


def test_only_jobs_with_the_same_model_outputs_and_size_share_a_batch(env):
    redis, store, queue, model, version = env
    other = store.put_model("other", model.spec, model.to_safetensors(), owner=None)
    jobs = [
        (_submit(env, _images(1, 1)), OUTPUTS),
        (_submit(env, _images(2, 1), outputs=["pool1"]), ["pool1"]),  # other outputs
        (_submit(env, _images(3, 1, 11, 13)), OUTPUTS),  # other image size
        (_submit(env, _images(4, 1), model="other", version=other), OUTPUTS),  # other model
        (_submit(env, _images(5, 2)), OUTPUTS),
    ]
    _burst(env)
    for job_id, _ in jobs:
        assert job_status(queue, job_id)["status"] == "finished"
    first, last = jobs[0][0], jobs[-1][0]
    assert job_status(queue, first)["batch"] == {"jobs": 2, "images": 3}
    assert _meta(redis, first)["batch"]["id"] == _meta(redis, last)["batch"]["id"]
    for job_id, _outputs in jobs[1:4]:
        assert job_status(queue, job_id)["batch"] is None  # each ran alone
    for (job_id, outputs), seed, shape in zip(
        jobs,
        range(1, 6),
        [(1, 9, 11), (1, 9, 11), (1, 11, 13), (1, 9, 11), (2, 9, 11)],
        strict=True,
    ):
        _assert_alone_equal(env, job_id, _images(seed, *shape), outputs)


def test_a_batch_holds_at_most_batch_max_images(env):
    redis, _store, queue, _model, _v = env
    ids = [_submit(env, _images(seed, 1)) for seed in range(5)]
    _burst(env, batch_max_images=3)
    sizes = [job_status(queue, job_id)["batch"] for job_id in ids]
    assert sizes == [{"jobs": 3, "images": 3}] * 3 + [{"jobs": 2, "images": 2}] * 2
    for seed, job_id in enumerate(ids):
        _assert_alone_equal(env, job_id, _images(seed, 1))


@pytest.mark.parametrize("off", [0, 1])
def test_batching_off_runs_every_job_alone(env, off):
    redis, _store, queue, _model, _v = env
    ids = [_submit(env, _images(seed, 1)) for seed in range(3)]
    _burst(env, batch_max_images=off)
    for seed, job_id in enumerate(ids):
        status = job_status(queue, job_id)
        assert status["status"] == "finished" and status["batch"] is None
        assert "batch" not in _meta(redis, job_id)
        _assert_alone_equal(env, job_id, _images(seed, 1))


def test_a_job_whose_input_expired_fails_alone(env):
    redis, store, queue, _model, _v = env
    ids = [_submit(env, _images(seed, 1)) for seed in range(3)]
    redis.delete(store.input_key(ids[1]))  # its input expired while it waited
    _burst(env)
    failed = job_status(queue, ids[1])
    assert failed["status"] == "failed" and "expired before it ran" in failed["error"]
    assert store.result_names(ids[1]) is None
    for seed in (0, 2):
        status = job_status(queue, ids[seed])
        # Taken as three, its engine run held the two whose inputs were there.
        assert status["status"] == "finished" and status["batch"] == {"jobs": 2, "images": 2}
        _assert_alone_equal(env, ids[seed], _images(seed, 1))


def test_an_engine_error_in_a_batch_fails_only_the_job_that_causes_it(env, monkeypatch):
    redis, _store, queue, _model, _v = env
    poison = np.full((1, 9, 11, 3), 7, np.uint8)
    run = engine.Model.run

    def refusing(self, images, *args, **kw):
        if any((x == 7).all() for x in np.asarray(images)):
            raise EngineError("this image is refused")
        return run(self, images, *args, **kw)

    monkeypatch.setattr(engine.Model, "run", refusing)
    good = [_submit(env, _images(seed, 1)) for seed in range(2)]
    bad = _submit(env, poison, owner="key2")
    _burst(env)
    status = job_status(queue, bad)
    assert status["status"] == "failed" and status["error"] == "JobFailed: this image is refused"
    for seed, job_id in enumerate(good):
        status = job_status(queue, job_id)
        assert status["status"] == "finished" and status["batch"] is None  # re-run alone
        _assert_alone_equal(env, job_id, _images(seed, 1))


def test_a_job_canceled_while_its_batch_runs_is_dropped_alone(env):
    redis, store, queue, _model, _v = env
    ids = [_submit(env, _images(seed, 1)) for seed in range(3)]
    store.mark_canceled(ids[0])  # what cancel() leaves for a started job
    _burst(env)
    assert job_status(queue, ids[0]) is None and store.result_names(ids[0]) is None
    for seed in (1, 2):
        assert job_status(queue, ids[seed])["status"] == "finished"
        _assert_alone_equal(env, ids[seed], _images(seed, 1))


def test_a_job_canceled_before_it_is_taken_is_not_run(env):
    redis, store, queue, _model, _v = env
    ids = [_submit(env, _images(seed, 1)) for seed in range(3)]
    assert cancel(queue, store, ids[2])
    _burst(env)
    assert job_status(queue, ids[2]) is None and store.result_names(ids[2]) is None
    assert job_status(queue, ids[0])["batch"] == {"jobs": 2, "images": 2}


def test_a_layer_begun_too_soon_after_a_save_is_saved_for_every_job_at_its_next_step(
    env, monkeypatch
):
    redis, _store, queue, _model, _v = env
    monkeypatch.setattr(batch_run, "PROGRESS_SECONDS", 0.2)
    ids = [_submit(env, _images(seed, 1), owner=f"key{seed}") for seed in range(2)]
    shown = scripted_run(monkeypatch, redis, ids, pause=0.3)
    _burst(env)
    assert shown == [{"layer": 2, "of": 3, "name": "b"}] * 2
    for job_id in ids:
        assert job_status(queue, job_id)["batch"] == {"jobs": 2, "images": 2}


def test_take_moves_each_job_once_from_the_queue_to_the_intermediate_list(env):
    redis, _store, queue, _model, _v = env
    ids = [_submit(env, _images(seed, 1)) for seed in range(6)]
    wq = make_queue(redis, job_class=ConvqJob)
    lead, _ = wq.dequeue_any(
        [wq], None, connection=redis, job_class=ConvqJob, serializer=JSONSerializer
    )
    first = take_batch(wq, lead, max_images=4, wait_ms=0, job_class=ConvqJob)
    second = take_batch(wq, lead, max_images=4, wait_ms=0, job_class=ConvqJob)
    assert [j.id for j in first] == ids[1:4] and [j.id for j in second] == ids[4:6]
    assert queue_depth(queue) == 0
    inter = [i.decode() for i in redis.lrange(queue.intermediate_queue_key, 0, -1)]
    assert sorted(i for i in inter if i != lead.id) == sorted(ids[1:])  # each once, none lost


def test_a_batch_holds_no_more_images_than_half_the_timeout_ran_last_time(env):
    redis, store, queue, _model, version = env
    job_id = submit(
        queue,
        store,
        model="tiny",
        version=version,
        images=_images(0, 1),
        outputs=OUTPUTS,
        owner=None,
        job_timeout=10,
    )
    job = ConvqJob.fetch(job_id, connection=redis, serializer=JSONSerializer)
    worker = build("thread", redis, SETTINGS, Runtime(SETTINGS))
    assert worker._image_budget(job) == 32  # never timed: CONVQ_BATCH_MAX_IMAGES
    worker.timed([job], 1.0)  # 1 s per image: 5 images fill half of the 10 s timeout
    assert worker._image_budget(job) == 5
    worker.timed([job, job], 30.0)  # 15 s per image: alone, at least
    assert worker._image_budget(job) == 1
    queue.remove(job_id)
    for seed in range(3):
        _submit(env, _images(seed, 1))
    queue_job, _ = queue.dequeue_any([queue], None, connection=redis)
    lead = ConvqJob.fetch(queue_job.id, connection=redis, serializer=JSONSerializer)
    worker.timed([lead], 100.0)  # another key (timeout 600 s): 3 images at 100 s each
    assert worker._image_budget(lead) == 3 and len(worker.take_more(lead, queue)) == 2


def test_a_batch_runs_in_chunks_that_fit_batch_max_bytes(env):
    redis, _store, queue, model, _v = env
    per_image = model.memory(1, 9, 11, OUTPUTS)
    sizes = [1, 1, 3, 1, 1]  # the 3-image job alone needs more than the budget: it runs alone
    ids = [_submit(env, _images(seed, n)) for seed, n in enumerate(sizes)]
    _burst(env, batch_max_bytes=2 * per_image)
    batches = [job_status(queue, job_id)["batch"] for job_id in ids]
    assert batches == [{"jobs": 2, "images": 2}] * 2 + [None] + [{"jobs": 2, "images": 2}] * 2
    ran = [_meta(redis, job_id).get("batch", {}).get("id") for job_id in ids]
    assert ran[0] == ran[1] != ran[3] == ran[4]  # two engine runs of two, taken as one batch
    for seed, (job_id, n) in enumerate(zip(ids, sizes, strict=True)):
        _assert_alone_equal(env, job_id, _images(seed, n))


LEAN_MIX = [  # one batch, four ways of shaping its results
    {"conv1": {"dtype": "float16"}},
    {lean.ALL: {"dtype": "uint8"}},
    {"conv1": {"stats": True, "channels": "1:3"}, "fc": {"dtype": "float16", "channels": [4, 0]}},
    None,
]


def test_jobs_with_different_lean_options_share_a_batch_each_shaped_its_own_way(env):
    redis, store, queue, model, _v = env
    sizes = [2, 1, 3, 1]
    images = [_images(10 + seed, n) for seed, n in enumerate(sizes)]
    shapes = model.output_shapes(9, 11)
    checked = [lean.check_all(opts, OUTPUTS, shapes) if opts else {} for opts in LEAN_MIX]
    ids = [_submit(env, x, lean=opts) for x, opts in zip(images, checked, strict=True)]
    _burst(env)
    assert len({_meta(redis, job_id)["batch"]["id"] for job_id in ids}) == 1
    for job_id, x, opts in zip(ids, images, checked, strict=True):
        status = job_status(queue, job_id)
        assert status["status"] == "finished", status
        assert status["batch"] == {"jobs": 4, "images": 7}
        want = lean.lean_results(model.run(x, outputs=OUTPUTS), opts)  # the job run alone
        assert store.result_names(job_id) == list(want)
        for name, arr in want.items():
            got = store.result_array(job_id, name)
            assert (got.shape, got.dtype) == (arr.shape, arr.dtype), (job_id, name)
            if arr.dtype == np.uint8:  # a batch's float32 maps may round one step the other way
                assert np.abs(got.astype(np.int16) - arr).max() <= 1, name
            else:
                np.testing.assert_allclose(got, arr, rtol=2e-3, atol=1e-5, err_msg=name)
    # each job's own shapes: what its options ask for, never a batch-mate's
    assert store.result_array(ids[0], "conv1").dtype == np.float16
    assert store.result_names(ids[1]) == ["conv1", "conv1:scale", "conv1:offset"] + [
        "fc",
        "fc:scale",
        "fc:offset",
    ]
    assert store.result_array(ids[2], "conv1").shape == (3, 2, 5)
    assert store.result_array(ids[2], "fc").shape == (3, *shapes["fc"][:2], 2)
    assert store.result_array(ids[3], "conv1").dtype == np.float32
