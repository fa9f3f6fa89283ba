"""The service's side of the queue: submit a job, read its status, wait for it, cancel it."""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Literal, cast

import numpy as np
import rq
from redis import RedisError
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus, Retry
from rq.serializers import JSONSerializer
from rq.utils import missing_keys
from rq.worker_registration import get_keys

from engine.explain import RESULTS as EXPLAIN_RESULTS

from . import defaults, keys, webhooks
from .lean import extras

RUN_MODEL = "worker.jobs.run_model"

JobQueue = rq.Queue
"""The queue type the contract hands out (the service names it without importing rq)."""

# rq statuses a client sees, folded onto the five of the API.
_STATUS = {
    JobStatus.QUEUED: "queued",
    JobStatus.CREATED: "queued",
    JobStatus.DEFERRED: "queued",
    JobStatus.SCHEDULED: "queued",
    JobStatus.READY_TO_ENQUEUE: "queued",
    JobStatus.RATE_LIMITED: "queued",
    JobStatus.STARTED: "started",
    JobStatus.FINISHED: "finished",
    JobStatus.FAILED: "failed",
    JobStatus.STOPPED: "canceled",
    JobStatus.CANCELED: "canceled",
}
_STATUS_BY_VALUE = {str(status.value): api for status, api in _STATUS.items()}


def make_queue(redis, name: str = defaults.QUEUE_NAME, job_class: type[Job] = Job) -> rq.Queue:
    """Return the convq queue: JSON serializer (nothing pickled); workers pass their job class."""
    return rq.Queue(name, connection=redis, serializer=JSONSerializer, job_class=job_class)


def submit(
    queue: rq.Queue,
    store,
    *,
    model: str,
    version: int,
    images: np.ndarray,
    outputs: list[str] | None,
    owner: str | None,
    job_timeout: int | None = None,
    meta: dict | None = None,
    retries: int = defaults.RETRIES,
    explain: dict | None = None,
    lean: dict | None = None,
    also_write=None,
) -> str:
    """Store images, enqueue a run of model version on them; return the job id.

    The record and the input share the store's TTLs; a worker death re-runs the job up to
    `retries` times, a bad job fails at once. also_write(pipe, job_id), when given, adds its
    own commands to the one transaction that writes the job.
    """
    job_id = uuid.uuid4().hex
    timeout = job_timeout or defaults.JOB_TIMEOUT
    kwargs = {"model": model, "version": int(version), "outputs": outputs, "input_id": job_id}
    if explain is not None:  # only then, so records stay readable by workers without it
        kwargs["explain"] = explain
    if lean:  # checked options (lean.check_all), likewise only when asked for
        kwargs["lean"] = lean
    job_meta = {
        "owner": owner,
        "model": model,
        "version": int(version),
        "outputs": [
            *(outputs or []),
            *(x for name, opts in (lean or {}).items() for x in extras(name, opts)),
            *(EXPLAIN_RESULTS if explain is not None else ()),
        ],
        "retries": retries,
        "progress": None,
        **({"lean": lean} if lean else {}),
        "images": int(images.shape[0]),
        "batch_key": batch_key(model, version, outputs, images, timeout, explain),
        **(meta or {}),
    }
    # One round trip for everything a job writes: its input (or the reference to its file),
    # rq's record and queue entry, its owner's list and what also_write adds (the budget).
    # rq starts the transaction (MULTI) on the empty pipeline; the rest joins it, so no worker
    # sees the job before its input.
    pipe = queue.connection.pipeline()
    try:
        queue.enqueue_call(
            RUN_MODEL,
            kwargs=kwargs,
            timeout=timeout,
            job_id=job_id,
            meta=job_meta,
            result_ttl=store.result_ttl,
            failure_ttl=store.result_ttl,
            ttl=store.input_ttl,
            retry=Retry(max=retries) if retries > 0 else None,
            description=f"run {model} v{version}",
            pipeline=pipe,
        )
        store.put_input(job_id, images, pipe=pipe)
        _remember(pipe, owner, job_id, store, timeout)
        if also_write is not None:
            also_write(pipe, job_id)
        pipe.execute()
    except BaseException:
        store.delete_job(job_id)
        raise
    return job_id


def batch_key(
    model: str,
    version: int,
    outputs: list[str] | str | None,
    images: np.ndarray,
    timeout: int,
    explain: dict | None,
) -> str | None:
    """Return the key under which queued jobs may run as one engine batch; None: never batched.

    Jobs share a batch only when they would run the same way alone: same model version, same
    requested outputs, same image size and type (stacked along N), same timeout; a job that
    asks for an explanation (gradients of its own images) always runs alone.
    """
    if explain is not None:
        return None
    shape = [int(d) for d in images.shape[1:]]
    return json.dumps([model, int(version), outputs, shape, images.dtype.str, int(timeout)])


def _lifetime(store, job_timeout: int) -> int:
    """Seconds a job's record can live: queued (input TTL), run, then kept (result TTL)."""
    return int(store.input_ttl) + int(job_timeout) + int(store.result_ttl)


def _remember(pipe, owner: str | None, job_id: str, store, job_timeout: int) -> None:
    """Add job_id to its owner's list (on pipe); the list lives as long as its newest job can."""
    key = keys.owner_jobs(owner)
    pipe.zadd(key, {job_id: time.time()})
    pipe.expire(key, _lifetime(store, job_timeout))


def encode_cursor(score: float, job_id: str) -> str:
    """Return the opaque cursor of the position just after (score, job_id) in a listing."""
    return base64.urlsafe_b64encode(f"{score!r}:{job_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Return (score, job_id) of a cursor from encode_cursor; ValueError when it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
        score, job_id = raw.split(":", 1)
        value = float(score)
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ValueError("not a cursor from a previous page") from exc
    if not (value == value and abs(value) < 1e12) or len(job_id) > 64:  # NaN, inf, junk
        raise ValueError("not a cursor from a previous page")
    return value, job_id


LIST_SCAN = 200
"""Job ids read from an owner's list per round trip while a page is gathered."""


def list_jobs(
    queue: rq.Queue,
    owner: str | None,
    *,
    status: str | None = None,
    model: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> tuple[list[dict], str | None]:
    """Return (owner's jobs newest first, cursor of the next page or None) with the filters.

    Each item is {id, model, status, created}. Ids whose record is gone (expired, deleted) are
    dropped from the list as they are met; a cursor is a position (score, id), so jobs
    submitted between pages never shift the pages. ValueError for a bad cursor.
    """
    redis = queue.connection
    key = keys.owner_jobs(owner)
    top, after = decode_cursor(cursor) if cursor is not None else (None, None)
    items: list[dict] = []
    offset, last = 0, (0.0, "")  # last: the position of the newest id looked at
    # Unfiltered, a page needs limit ids, +1 to know there is a next, +1 for the cursor's own.
    scan = LIST_SCAN if status is not None or model is not None else min(LIST_SCAN, limit + 2)
    while True:
        rows = redis.zrevrangebyscore(
            key,
            "+inf" if top is None else repr(top),
            "-inf",
            start=offset,
            num=scan,
            withscores=True,
        )
        offset += len(rows)
        gone: list[str] = []
        looked = []
        for raw, raw_score in cast(list[tuple[bytes | str, float]], rows):
            job_id, score = raw.decode() if isinstance(raw, bytes) else str(raw), float(raw_score)
            # Equal scores come in descending id order: skip up to and including the cursor.
            if not (after is not None and score == top and job_id >= after):
                looked.append((job_id, score))
        jobs = _listed(queue, [job_id for job_id, _ in looked[: limit - len(items) + 1]])
        for (job_id, score), job in zip(looked, jobs, strict=False):
            if len(items) == limit:
                if gone:
                    redis.zrem(key, *gone)
                return items, encode_cursor(*last)
            last = (score, job_id)
            if job is None:
                gone.append(job_id)
                continue
            state, found = job
            if (status is not None and state != status) or (
                model is not None and found.get("model") != model
            ):
                continue
            items.append(
                {
                    "id": job_id,
                    "model": found.get("model"),
                    "status": state,
                    "created": datetime.fromtimestamp(score, UTC).isoformat(),
                }
            )
        if len(jobs) < len(looked):  # the page filled within this batch (or a filter needs more)
            if len(items) == limit:
                if gone:
                    redis.zrem(key, *gone)
                return items, encode_cursor(*last)
            offset -= len(looked) - len(jobs)  # read the rest again next round
        if gone:
            redis.zrem(key, *gone)
            offset -= len(gone)
        if len(rows) < scan and len(jobs) == len(looked):
            return items, None


def _fetch(queue: rq.Queue, job_id: str) -> Job | None:
    try:
        return queue.job_class.fetch(
            job_id, connection=queue.connection, serializer=queue.serializer
        )
    except (NoSuchJobError, ValueError):
        return None


def _error(job: Job, status: str) -> str | None:
    if status != "failed":
        return None
    if job.meta.get("error"):
        return job.meta["error"]
    result = job.latest_result()
    text = (result.exc_string if result is not None else None) or ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # The last traceback line is "Type: message"; abandoned jobs leave no traceback at all.
    return lines[-1] if lines else "the job failed (its worker died and no retries were left)"


def _seconds(a, b) -> float | None:
    return None if a is None or b is None else max(0.0, (b - a).total_seconds())


def _iso(t) -> str | None:
    return None if t is None else t.isoformat()


def _state(job: Job) -> str | None:
    """Return the job's API status (one of five); None when rq holds no status for it."""
    try:
        return _STATUS.get(job.get_status(refresh=False), "queued")
    except InvalidJobOperation:
        return None


def _listed(queue: rq.Queue, job_ids: list[str]) -> list[tuple[str, dict] | None]:
    """Return (API status, meta) of each job (None where gone), read in one round trip.

    Reads only the two fields a listing shows from each job's hash (rq keeps its status and its
    serialized meta there; tests/unit/test_rq_surface.py checks that), not the whole record:
    a page of 100 takes ~0.3x the time of rq's Job.fetch_many (bench/job_list.py).
    """
    pipe = queue.connection.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(queue.job_class.key_for(job_id), "status", "meta")
    out: list[tuple[str, dict] | None] = []
    for raw_status, raw_meta in pipe.execute():
        if raw_status is None:  # gone (or not written yet)
            out.append(None)
            continue
        try:
            meta = queue.serializer.loads(raw_meta) if raw_meta else {}
        except (ValueError, TypeError):  # unreadable: as good as gone
            out.append(None)
            continue
        raw = raw_status if isinstance(raw_status, bytes) else str(raw_status).encode()
        status = _RAW_STATUS.get(raw, "queued")
        out.append((status, meta if isinstance(meta, dict) else {}))
    return out


_RAW_STATUS = {rq_status.value.encode(): api for rq_status, api in _STATUS.items()}
"""rq's status as stored in a job's hash -> the API's status."""


def job_status(queue: rq.Queue, job_id: str) -> dict | None:
    """Return the job's status, progress, timings, error and callback; None for an unknown job."""
    job = _fetch(queue, job_id)
    status = None if job is None else _state(job)
    if job is None or status is None:
        return None
    described = describe(job, status)
    url = (job.meta or {}).get("callback")
    if url:
        found = webhooks.delivery(queue.connection, job_id)
        described["callback"] = {"url": url, **(found or {"state": "waiting"})}
    return described


def describe(job: Job, status: str) -> dict:
    """Return the status of job, whose API status is status (one of five)."""
    meta = job.meta or {}
    retries = int(meta.get("retries") or 0)
    left = job.retries_left if job.retries_left is not None else retries
    ended = job.ended_at if status in ("finished", "failed") else None
    started = job.started_at if status != "queued" else None
    return {
        "id": job.id,
        "status": status,
        "model": meta.get("model"),
        "version": meta.get("version"),
        "outputs": meta.get("outputs"),
        **({"lean": meta["lean"]} if meta.get("lean") else {}),
        "owner": meta.get("owner"),
        # The last layer reached stays visible once the job ended (where it failed, or n of n).
        "progress": meta.get("progress") if status != "queued" else None,
        "timings": {
            "enqueued_at": _iso(job.enqueued_at),
            "started_at": _iso(started),
            "ended_at": _iso(ended),
            "queue_seconds": _seconds(job.enqueued_at, started),
            "compute_seconds": _seconds(started, ended),
        },
        "error": _error(job, status),
        "attempt": (
            meta.get("attempt")
            if status != "queued" and meta.get("attempt")
            else max(1, retries - left + 1)
        ),
        "batch": _batch(meta.get("batch")) if status != "queued" else None,
    }


def job_ended(job: Job, status: str) -> bool:
    """Record the due callback of job, which just ended in status; False when it has none.

    Only records it (a few Redis writes): a dispatcher sends it (worker/dispatcher.py).
    """
    meta = job.meta or {}
    url = meta.get("callback")
    if not url:
        return False
    body = webhooks.payload(describe(job, status))
    return webhooks.record_due(
        job.connection,
        job.id,
        url=url,
        owner=meta.get("owner"),
        body=body,
        keep=defaults.WEBHOOK_KEEP,
        now=time.time(),
    )


def _batch(batch) -> dict | None:
    """The size of the engine batch a job ran in (worker/batch_run.py); None if it ran alone."""
    if not isinstance(batch, dict):
        return None
    return {"jobs": batch.get("jobs"), "images": batch.get("images")}


ENDED = ("finished", "failed", "canceled")

WAIT_SLICE = 0.25
"""Longest seconds a waiter blocks for a job's end signal before it reads the status again."""

ENDED_SIGNAL_TTL = 60
"""Seconds a job's end signal (keys.ended) waits for a waiter that has not come yet."""


def announce_end(pipe, job_id: str) -> None:
    """Wake whoever waits for job_id in wait_for_end; call it where the job's end is written."""
    pipe.rpush(keys.ended(job_id), 1)
    pipe.expire(keys.ended(job_id), ENDED_SIGNAL_TTL)


def wait_for_end(
    queue: rq.Queue, job_id: str, deadline: float, *, poll_max: float = WAIT_SLICE
) -> dict | None | Literal[False]:
    """Wait until job_id ends; return its status (None if it vanished), False past deadline.

    deadline is on time.monotonic(). Blocks on the job's end signal (BLPOP on keys.ended, pushed
    by the worker as it writes the end, announce_end, and kept a while for a waiter that comes
    late) for at most poll_max seconds (and half the client's socket timeout): signalled, it
    reads the status (a job ends once: two round trips in all); else it reads the job's status
    field and blocks again. A job is seen as soon as it ends, a waiter costs a few short
    commands however long it waits (polling cost ~35 whole-record reads per request with 64
    clients waiting ~1 s), and a missed signal (a canceled job) costs at most one slice. An
    outage fails fast with the socket timeout.
    """
    key = queue.job_class.key_for(job_id)
    signal = keys.ended(job_id)
    socket_timeout = queue.connection.connection_pool.connection_kwargs.get("socket_timeout")
    block = min(poll_max, socket_timeout / 2) if socket_timeout else poll_max
    while True:
        left = deadline - time.monotonic()
        if left > 0 and queue.connection.blpop([signal], timeout=max(0.01, min(block, left))):
            status = job_status(queue, job_id)
            if status is None or status["status"] in ENDED:
                return status
            continue  # the end of an attempt that is retried: wait for the next
        raw = queue.connection.hget(key, "status")
        value = raw.decode() if isinstance(raw, bytes) else raw
        if value is None or _STATUS_BY_VALUE.get(value, "queued") in ENDED:
            return job_status(queue, job_id)
        if deadline - time.monotonic() <= 0:
            return False


def cancel(queue: rq.Queue, store, job_id: str) -> bool:
    """Cancel a queued or running job and delete its blobs and record; False if unknown."""
    job = _fetch(queue, job_id)
    if job is None:
        store.delete_job(job_id)
        return False
    status = job.get_status(refresh=False)
    if status not in _ENDED:
        _report_canceled(job)
    if status == JobStatus.STARTED:
        # The worker sees the mark between layers, stops, and drops the record itself.
        store.mark_canceled(job_id)
        store.delete_job(job_id)
        return True
    if status not in _ENDED:  # a retry re-queued meanwhile must not run either
        store.mark_canceled(job_id)
    # rq's record and registry entries, then the input and result, written in one transaction.
    pipe = queue.connection.pipeline()
    try:
        job.delete(pipeline=pipe, remove_from_queue=True)
    except (NoSuchJobError, InvalidJobOperation):
        pass
    files = store.delete_job(job_id, pipe=pipe)
    pipe.execute()
    store.delete_blobs(files)
    return True


def _report_canceled(job: Job) -> None:
    try:
        job_ended(job, "canceled")
    except RedisError:  # the cancel itself goes on; the callback is lost with the job
        pass


_ENDED = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED)
"""States in which a job cannot run again: deleting one needs no cancel mark (it would only
sit in Redis for the input's TTL, as it did after every synchronous /infer)."""


def queue_depth(queue: rq.Queue) -> int:
    """Return how many jobs wait in the queue (not counting running ones)."""
    return queue.count


def live_workers(queue: rq.Queue) -> int:
    """Return how many workers listening on queue are alive (their heartbeat key still exists).

    rq's Worker.count counts the registry set, where a SIGKILLed worker stays until someone
    cleans it; its own key expires within one heartbeat TTL, so that is what is counted here.
    """
    keys = sorted(get_keys(queue))
    return len(keys) - len(missing_keys(queue.connection, keys))
