"""The job functions a convq worker runs; nothing else may run (see jobclass.ConvqJob).

Arguments are small JSON values; images and results are blobs in the Store.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis
from rq import get_current_job

from engine import EngineError
from engine.explain import as_results
from engine.explain import explain as explain_images

from . import runtime
from .contract.cache import ModelGone
from .contract.lean import lean_results
from .contract.store import BlobMissing, Store

log = logging.getLogger("convq.worker")

PROGRESS_SECONDS = 0.2
"""Least seconds between two layers' progress saves, each with a check for cancel or a newer
attempt (two Redis round trips): a 20-layer net on small images would otherwise spend more time
on them than on its layers. The first layer and the finished run are always recorded."""


class JobFailed(Exception):
    """A job cannot succeed however often it runs (bad input, missing model); never retried."""


class JobTimeout(JobFailed):
    """The job ran past its timeout."""


class JobCanceled(JobFailed):
    """The client canceled the job while it ran."""


class JobSuperseded(Exception):
    """A newer attempt of this job started (this run was presumed dead); leave quietly."""


def _save_progress(job, progress: dict | None) -> None:
    # Progress is advisory: a Redis hiccup must not fail the computation.
    job.meta["progress"] = progress
    try:
        job.save_meta()
    except redis.RedisError as exc:
        log.warning("job %s: progress not saved (%s)", job.id, exc)


def _store_for(job) -> Store:
    return Store.from_settings(job.connection, runtime.current().settings)


def run_model(
    model: str,
    version: int,
    outputs: list[str] | str | None,
    input_id: str,
    explain: dict | None = None,
    lean: dict | None = None,
) -> dict:
    """Run model version on the images stored under input_id; store the requested outputs.

    With explain ({"method", "layer", "channel"[, "at"]}, engine.explain) the explanation's
    arrays (engine.explain.RESULTS) are stored beside the outputs. With lean ({output: options},
    checked by the service with contract.lean.check_all) store_results stores
    lean_results(outputs, lean): channels, crops, float16 or uint8 maps, stats or PNG grids.

    Writes job.meta["progress"] = {"layer": i (1-based), "of": n, "name"} before each layer and
    stops once the job's timeout has passed or the job was canceled: between layers, and inside
    a long layer between its steps (engine.model.STEP_MACS), so a thread worker, which has no
    signal to stop it, ends a job near its timeout too.
    """
    job = get_current_job()
    if job is None:
        raise RuntimeError("run_model runs inside an rq job")
    store = _store_for(job)
    timeout = job.timeout if job.timeout and job.timeout > 0 else None
    timeout = timeout or runtime.current().settings.job_timeout
    started = time.monotonic()
    retries = int(job.meta.get("retries") or 0)
    job.meta["attempt"] = retries - (job.retries_left or 0) + 1
    _save_progress(job, None)  # a retried job starts over
    # Fencing: should this run be presumed dead and re-queued, the new attempt claims the job
    # and this one stops at its next layer instead of racing it.
    token = uuid.uuid4().hex
    store.claim_run(job.id, token, ttl=timeout + 60)

    def check() -> None:
        try:
            ours, canceled = store.run_state(job.id, token)
        except redis.RedisError as exc:
            log.warning("job %s: could not check for cancel (%s)", job.id, exc)
            return
        if canceled:
            raise JobCanceled(f"job {job.id} was canceled")
        if not ours:
            raise JobSuperseded(f"job {job.id}: a newer attempt took over")

    try:
        net = runtime.current().cache.get(store, model, version)
    except ModelGone as exc:
        raise JobFailed(str(exc)) from None
    except EngineError as exc:
        raise JobFailed(f"model {model!r} version {version} does not load: {exc}") from None
    try:
        images, in_files = store.read_input(input_id)
    except BlobMissing as exc:
        raise JobFailed(f"the input of job {job.id} cannot be read: {exc}") from None
    if images is None:
        raise JobFailed(f"the input of job {job.id} expired before it ran; submit it again")

    reached: dict = {}  # the latest layer begun, and when progress was last saved
    saved_at = [-float("inf")]

    def on_layer(i: int, n: int, name: str) -> None:
        now = time.monotonic()
        if now - started > timeout:
            raise JobTimeout(
                f"job timed out: {now - started:.1f} s is past its {timeout} s "
                f"timeout before layer {i + 1} of {n} ({name})"
            )
        reached.update(layer=i + 1, of=n, name=name)
        if now - saved_at[0] >= PROGRESS_SECONDS:
            saved_at[0] = now
            check()
            _save_progress(job, dict(reached))

    def on_step() -> None:
        # Inside a long layer (engine STEP_MACS): the deadline, and now and then a cancel.
        now = time.monotonic()
        if now - started > timeout:
            where = f" in layer {reached['layer']} of {reached['of']} ({reached['name']})"
            raise JobTimeout(
                f"job timed out: {now - started:.1f} s is past its {timeout} s timeout"
                + (where if reached else "")
            )
        if now - saved_at[0] >= PROGRESS_SECONDS:
            saved_at[0] = now
            check()
            # The layer begun since the last save, if it was skipped for being too soon: a
            # run of long layers would otherwise show its first layer to the end.
            if reached and job.meta.get("progress") != reached:
                _save_progress(job, dict(reached))

    try:
        result = net.run(images, outputs=outputs, on_layer=on_layer, on_step=on_step)
        if explain is not None:
            check()
            if time.monotonic() - started > timeout:
                raise JobTimeout(f"job timed out: past its {timeout} s timeout before explain")
            result.update(as_results(explain_images(net, images, explain)))
    except EngineError as exc:
        raise JobFailed(str(exc)) from None
    check()
    if reached and job.meta.get("progress") != reached:
        _save_progress(job, dict(reached))  # a finished job shows n of n
    return store_results(job, store, result, input_id, files=in_files, deadline=started + timeout)


def store_results(
    job, store: Store, result: dict, input_id: str, *, files: bool, deadline: float
) -> dict:
    """Store one job's outputs and free its input; return the job's return value.

    The one path every run takes to store a result, alone or as a slice of a batch
    (worker/batch_run.py): result holds this job's own float32 outputs,
    shaped here by the job's lean options (its "lean" argument, contract.lean.lean_results)
    before anything is stored. deadline is on time.monotonic().
    """
    stored = lean_results(result, job.kwargs.get("lean") or {})
    _with_redis_retries(lambda: store.put_result(job.id, stored, files=files), deadline)
    try:
        store.finish_run(job.id, input_id)  # free the input now rather than at its TTL
    except redis.RedisError:
        pass  # it expires anyway
    return {"outputs": list(stored)}


def _with_redis_retries(write, deadline: float) -> None:
    """Run write(), retrying through a Redis outage until deadline (monotonic seconds)."""
    pause = 0.5
    while True:
        try:
            return write()
        except (redis.ConnectionError, redis.TimeoutError):
            if time.monotonic() + pause > deadline:
                raise
            log.warning("Redis unavailable while storing a result; retrying in %.1f s", pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


JOB_FUNCTIONS = {"worker.jobs.run_model": run_model}
"""Dotted name -> function: the only code a convq job record can make a worker run."""
