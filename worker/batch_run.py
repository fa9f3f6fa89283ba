"""Run several queued jobs of one model as one engine batch, and give each job its own outcome.

The worker took the jobs together (worker/batch_take.py) because their batch keys are equal:
same model version, outputs, image size and type, timeout (worker.contract.queue.batch_key).
Their images are stacked along N, run once, and split back: each job's result holds exactly
its own images' rows and is stored through jobs.store_results, the path a job run alone takes.

What stays per job: its attempt, progress, cancel and fencing token (a job canceled or taken
over mid-batch just drops out), its errors (its input expired: only it fails), its result TTL.
An engine error in a batch of several jobs runs each job alone instead, so one job the engine
refuses fails only itself.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import redis

from engine import EngineError

from . import runtime
from .contract.cache import ModelGone
from .contract.store import BlobMissing, Store
from .jobclass import ConvqJob
from .jobs import (
    PROGRESS_SECONDS,
    JobCanceled,
    JobFailed,
    JobSuperseded,
    JobTimeout,
    store_results,
)

log = logging.getLogger("convq.worker")


@dataclass
class Outcome:
    """How one job of a batch ended: its return value, or the exception it ends with."""

    value: dict | None = None
    error: BaseException | None = None

    def get(self) -> dict | None:
        """Return the value, or raise the job's own exception."""
        if self.error is not None:
            raise self.error
        return self.value


@dataclass
class _Member:
    job: ConvqJob
    images: np.ndarray
    files: bool
    input_id: str
    token: str


@dataclass
class _Run:
    """The state one batch shares: deadline, tokens, outcomes, the latest layer reached."""

    store: Store
    timeout: int
    started: float
    tokens: dict[str, str]
    max_bytes: int
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    reached: dict = field(default_factory=dict)
    saved_at: float = -float("inf")

    @property
    def deadline(self) -> float:
        return self.started + self.timeout

    def end(self, job, error: BaseException) -> None:
        self.outcomes[job.id] = Outcome(error=error)


class _NoneLeft(Exception):
    """Every job of a group was canceled or taken over: stop computing."""


def run_batch(jobs: list) -> dict[str, Outcome]:
    """Run jobs (equal batch keys, all started) as one engine batch; return job id -> Outcome."""
    lead = jobs[0]
    settings = runtime.current().settings
    store = Store.from_settings(lead.connection, settings)
    timeout = lead.timeout if lead.timeout and lead.timeout > 0 else settings.job_timeout
    tokens = {job.id: uuid.uuid4().hex for job in jobs}
    run = _Run(store, timeout, time.monotonic(), tokens, settings.batch_max_bytes)
    with lead.connection.pipeline(transaction=False) as pipe:
        for job in jobs:
            retries = int(job.meta.get("retries") or 0)
            job.meta["attempt"] = retries - (job.retries_left or 0) + 1
            job.meta["progress"] = None  # a retried job starts over
            job.meta.pop("batch", None)
            pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
        pipe.execute()
    # Fencing, as for a job alone: a newer attempt of any one job stops only that job.
    store.claim_runs(run.tokens, ttl=timeout + 60)
    model, version = lead.kwargs["model"], lead.kwargs["version"]
    error: str | None
    try:
        net = runtime.current().cache.get(store, model, version)
    except ModelGone as exc:  # the same error each job would get alone (jobs.run_model)
        error = str(exc)
    except EngineError as exc:
        error = f"model {model!r} version {version} does not load: {exc}"
    else:
        error = None
    if error is not None:
        for job in jobs:
            run.end(job, JobFailed(error))
        return run.outcomes
    groups: dict[tuple, list[_Member]] = {}
    inputs = store.read_inputs([job.kwargs["input_id"] for job in jobs])
    for job, found in zip(jobs, inputs, strict=True):
        member = _member(run, job, found)
        if member is not None:  # grouped by image size and type, should a key ever lie
            shape = (member.images.shape[1:], member.images.dtype.str)
            groups.setdefault(shape, []).append(member)
    for group in groups.values():
        _run_group(run, net, group, lead.kwargs.get("outputs"))
    return run.outcomes


def _member(run: _Run, job, found) -> _Member | None:
    """Return the job's member of the batch, or end the job alone when its input is unusable."""
    if isinstance(found, BlobMissing):
        run.end(job, JobFailed(f"the input of job {job.id} cannot be read: {found}"))
        return None
    if isinstance(found, Exception):
        run.end(job, found)
        return None
    images, files = found
    if images is None:
        run.end(job, JobFailed(f"the input of job {job.id} expired before it ran; submit it again"))
        return None
    return _Member(job, images, files, job.kwargs["input_id"], run.tokens[job.id])


def _live(run: _Run, group: list[_Member]) -> list[_Member]:
    return [m for m in group if m.job.id not in run.outcomes]


def _check(run: _Run, group: list[_Member]) -> None:
    """End the members canceled or taken over by a newer attempt; _NoneLeft if none is left."""
    live = _live(run, group)
    try:
        states = run.store.run_states({m.job.id: m.token for m in live})
    except redis.RedisError as exc:
        log.warning("batch of %d jobs: could not check for cancel (%s)", len(live), exc)
        return
    for m in live:
        ours, canceled = states[m.job.id]
        if canceled:
            run.end(m.job, JobCanceled(f"job {m.job.id} was canceled"))
        elif not ours:
            run.end(m.job, JobSuperseded(f"job {m.job.id}: a newer attempt took over"))
    if not _live(run, group):
        raise _NoneLeft


def _save_progress(run: _Run, group: list[_Member]) -> None:
    # Progress is advisory: a Redis hiccup must not fail the computation.
    live = _live(run, group)
    try:
        with live[0].job.connection.pipeline(transaction=False) as pipe:
            for m in live:
                m.job.meta["progress"] = dict(run.reached) if run.reached else None
                pipe.hset(m.job.key, "meta", m.job.serializer.dumps(m.job.meta))
            pipe.execute()
    except redis.RedisError as exc:
        log.warning("batch of %d jobs: progress not saved (%s)", len(live), exc)


def _run_group(run: _Run, net, group: list[_Member], outputs) -> None:
    """Run one group (same image size) in chunks whose run fits the batch memory budget.

    A chunk's predicted peak (Model.memory) stays within max_bytes, or within what its biggest
    job alone needs when that is more: batching never makes a run bigger than that, so a
    batch of jobs that each fit cannot exhaust a worker's memory together.
    """
    h, w = group[0].images.shape[1:3]
    try:
        per_image = max(1, net.memory(1, h, w, outputs))
    except EngineError:
        per_image = 1  # the run itself will say what is wrong
    chunk: list[_Member] = []
    for m in group:
        n = sum(int(c.images.shape[0]) for c in chunk) + int(m.images.shape[0])
        if chunk and n * per_image > run.max_bytes:
            _run_chunk(run, net, chunk, outputs)
            chunk = []
        chunk.append(m)
    _run_chunk(run, net, chunk, outputs)


def _run_chunk(run: _Run, net, group: list[_Member], outputs) -> None:
    """Run one chunk's stacked images; store each live member's rows as its result."""
    images_in = sum(int(m.images.shape[0]) for m in group)
    batch = {"id": uuid.uuid4().hex, "jobs": len(group), "images": images_in}
    for m in group:
        if len(group) > 1:
            m.job.meta["batch"] = batch
        else:
            m.job.meta.pop("batch", None)
    run.reached, run.saved_at = {}, -float("inf")

    def on_layer(i: int, n: int, name: str) -> None:
        now = time.monotonic()
        if now > run.deadline:
            raise JobTimeout(
                f"job timed out: {now - run.started:.1f} s is past its {run.timeout} s "
                f"timeout before layer {i + 1} of {n} ({name})"
            )
        run.reached = {"layer": i + 1, "of": n, "name": name}
        if now - run.saved_at >= PROGRESS_SECONDS:
            run.saved_at = now
            _check(run, group)
            _save_progress(run, group)

    def on_step() -> None:
        now = time.monotonic()
        if now > run.deadline:
            r = run.reached
            where = f" in layer {r['layer']} of {r['of']} ({r['name']})" if r else ""
            raise JobTimeout(
                f"job timed out: {now - run.started:.1f} s is past its {run.timeout} s timeout"
                + where
            )
        if now - run.saved_at >= PROGRESS_SECONDS:
            run.saved_at = now
            _check(run, group)
            if run.reached and _live(run, group)[0].job.meta.get("progress") != run.reached:
                _save_progress(run, group)  # a layer begun too soon after the last save

    images = group[0].images if len(group) == 1 else np.concatenate([m.images for m in group])
    try:
        result = net.run(images, outputs=outputs, on_layer=on_layer, on_step=on_step)
        del images
        _check(run, group)
    except _NoneLeft:
        return
    except EngineError as exc:
        if len(group) == 1:
            run.end(group[0].job, JobFailed(str(exc)))
            return
        log.warning("batch of %d jobs: %s; running each job alone", len(group), exc)
        for m in _live(run, group):
            _run_chunk(run, net, [m], outputs)
        return
    except Exception as exc:  # noqa: BLE001 - a timeout, Redis gone: every live job meets it
        for m in _live(run, group):
            run.end(m.job, exc)
        return
    if run.reached:
        _save_progress(run, group)  # a finished job shows n of n
    start = 0
    for m in group:
        n = int(m.images.shape[0])
        rows = {name: arr[start : start + n] for name, arr in result.items()}
        start += n
        if m.job.id in run.outcomes:
            continue  # canceled or taken over: nothing of it is stored
        try:
            value = store_results(
                m.job,
                run.store,
                rows,
                m.input_id,
                files=m.files,
                deadline=run.deadline,
            )
        except Exception as exc:  # noqa: BLE001 - this job's store failed, not its batch-mates'
            run.end(m.job, exc)
        else:
            run.outcomes[m.job.id] = Outcome(value=value)
