"""Take more queued jobs to batch with the one a worker just popped (dynamic batching).

rq popped the lead job with BLMOVE, from the queue's list to its intermediate list, where the
sweep (reaper.reap_unstarted) finds it should the worker die before starting it. Jobs taken
here go the same way and only that way: in one MULTI/EXEC under WATCH on the queue's list, each
id is removed from the queue (LREM) and appended to the intermediate list (RPUSH). The
transaction runs only if the queue list is unchanged since the ids were seen in it, so each id
moves exactly once, from one list to the other: two workers can never take the same job, and a
job is always in the queue, in the intermediate list, or started (with its own rq execution in
the StartedJobRegistry, heartbeats and retries), never nowhere. A changed list (another worker
popped, the API pushed) aborts the transaction and the ids are read again. No Lua script, so the
same code runs on fakeredis (convq up's embedded queue).

A job is a candidate when its meta's batch_key (written at submit, see
worker.contract.queue.batch_key) equals the lead's and its images still fit the batch. Jobs
queued ahead of it for other models keep their place; only the first BATCH_SCAN ids are read.
"""

from __future__ import annotations

import logging
import time

import redis
from rq.exceptions import NoSuchJobError
from rq.utils import as_text

from .contract import defaults
from .contract.queue import RUN_MODEL

log = logging.getLogger("convq.worker")

MOVE_TRIES = 5
"""Times the move is tried again when the queue changed under it (optimistic locking)."""

POLL_SECONDS = 0.0005
"""Pause between two looks at the queue while waiting for a batch to fill."""


def _images(meta: dict | None) -> int:
    try:
        return max(1, int((meta or {}).get("images") or 1))
    except (TypeError, ValueError):
        return 1


def batchable(job, max_images: int) -> bool:
    """Whether job may lead a batch: a run_model job with a batch key and room for more."""
    meta = job.meta or {}
    return (
        max_images > 1
        and job.func_name == RUN_MODEL
        and isinstance(meta.get("batch_key"), str)
        and _images(meta) < max_images
    )


def take_batch(queue, lead, *, max_images: int, wait_ms: int, job_class) -> list:
    """Move queued jobs with lead's batch key to the intermediate list; return them (fetched).

    Takes jobs up to max_images images in all (lead's included), waiting up to wait_ms for more
    to arrive while the batch is not full and jobs like lead are arriving (the first look found
    some): a lone job at low load starts at once. Returns [] when lead cannot lead a batch.
    """
    if not batchable(lead, max_images):
        return []
    key = lead.meta["batch_key"]
    room = max_images - _images(lead.meta)
    deadline = time.monotonic() + wait_ms / 1000
    others: set[str] = {lead.id}  # ids known not to fit: their meta is not read again
    taken: list[str] = []
    while room > 0:
        ids = [as_text(i) for i in queue.connection.lrange(queue.key, 0, defaults.BATCH_SCAN - 1)]
        fresh = [i for i in ids if i not in others]
        want: dict[str, int] = {}  # id -> images
        if fresh:
            with queue.connection.pipeline(transaction=False) as pipe:
                for job_id in fresh:
                    pipe.hget(job_class.key_for(job_id), "meta")
                metas = pipe.execute()
            for job_id, raw in zip(fresh, metas, strict=True):
                meta = _meta(queue, raw)
                n = _images(meta)
                if meta is None or meta.get("batch_key") != key or n > room - sum(want.values()):
                    others.add(job_id)
                else:
                    want[job_id] = n
        moved = _move(queue, list(want)) if want else []
        taken += moved
        others.update(moved)
        room -= sum(want[job_id] for job_id in moved)
        if room <= 0 or time.monotonic() >= deadline or not taken:
            break  # full, out of time, or no job like it is queued: none is arriving, go now
        if len(moved) == len(want):  # nothing new right now: wait a little for more
            time.sleep(min(POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    return _fetch(queue, taken, job_class)


def _meta(queue, raw) -> dict | None:
    if raw is None:
        return None
    try:
        meta = queue.serializer.loads(raw)
    except Exception:  # noqa: BLE001 - an unreadable record is left to rq's own path
        return None
    return meta if isinstance(meta, dict) else None


def _move(queue, want: list[str]) -> list[str]:
    """Move those of want still queued to the intermediate list, atomically; return them."""
    with queue.connection.pipeline(transaction=True) as pipe:
        for _ in range(MOVE_TRIES):
            try:
                pipe.watch(queue.key)
                queued = {as_text(i) for i in pipe.lrange(queue.key, 0, defaults.BATCH_SCAN - 1)}
                present = [job_id for job_id in want if job_id in queued]
                if not present:
                    pipe.unwatch()
                    return []
                pipe.multi()
                for job_id in present:
                    pipe.lrem(queue.key, 1, job_id)
                pipe.rpush(queue.intermediate_queue_key, *present)
                pipe.execute()
                return present
            except redis.WatchError:
                continue
    return []


def _fetch(queue, ids: list[str], job_class) -> list:
    """Return the jobs of ids; a job deleted meanwhile (canceled) leaves the intermediate list,
    one whose record cannot be read goes back to the front of the queue, for rq's own path."""
    if not ids:
        return []
    try:
        jobs = job_class.fetch_many(ids, connection=queue.connection, serializer=queue.serializer)
    except Exception:  # noqa: BLE001 - one unreadable record: read them one by one below
        pass
    else:
        for job_id, job in zip(ids, jobs, strict=True):
            if job is None:
                queue.intermediate_queue.remove(job_id)
        return [job for job in jobs if job is not None]
    found = []
    for job_id in ids:
        try:
            found.append(
                job_class.fetch(job_id, connection=queue.connection, serializer=queue.serializer)
            )
        except NoSuchJobError:
            queue.intermediate_queue.remove(job_id)
        except Exception as exc:  # noqa: BLE001 - not ours to judge here
            log.warning("job %s: record unreadable (%s); left to run alone", job_id, exc)
            with queue.connection.pipeline(transaction=True) as pipe:
                pipe.lrem(queue.intermediate_queue_key, 1, job_id)
                pipe.lpush(queue.key, job_id)
                pipe.execute()
    return found
