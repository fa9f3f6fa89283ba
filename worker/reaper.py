"""Find started jobs whose worker stopped heartbeating and re-queue them (or fail them).

rq's own StartedJobRegistry.cleanup does this only every 10 minutes and trusts the
registry's expiry score alone. convq workers heartbeat every few seconds with a short TTL,
sweep every few seconds, and skip the sweep until their own Redis link has been healthy for a
full heartbeat TTL: after an outage every live worker gets to heartbeat first, so a job that
is still running is never re-queued beside itself.

A worker idle in a blocking pop may not notice an outage shorter than its socket timeout, so
its link looks healthy while every heartbeat expired. reap_abandoned(confirm_after=s) covers
that case from the registry alone: an entry is handled only once sweeps have seen it expired
for s seconds, which a live worker's next heartbeat ends.
"""

from __future__ import annotations

import logging

from rq.exceptions import NoSuchJobError
from rq.job import JobStatus
from rq.job_lifecycle import record_job_failure
from rq.registry import StartedJobRegistry
from rq.utils import as_text, current_timestamp, now, parse_composite_key

from .contract import keys
from .contract.queue import announce_end
from .jobclass import report_end

log = logging.getLogger("convq.worker")


def _confirmed(queue, entries: list[str], cutoff: float, confirm_after: float) -> list[str]:
    """Return the entries sweeps have seen expired for confirm_after s; forget renewed ones."""
    # Hash per queue: registry entry -> when a sweep first saw its heartbeat expired (epoch s).
    key = keys.expired_seen(queue.name)
    seen = {as_text(k): float(v) for k, v in queue.connection.hgetall(key).items()}
    with queue.connection.pipeline() as pipe:
        renewed = [entry for entry in seen if entry not in entries]
        if renewed:
            pipe.hdel(key, *renewed)  # heartbeated since (or handled): alive after all
        for entry in entries:
            if entry not in seen:
                pipe.hsetnx(key, entry, cutoff)
        pipe.expire(key, max(60, int(10 * confirm_after)))
        pipe.execute()
    return [entry for entry in entries if entry in seen and cutoff - seen[entry] >= confirm_after]


def reap_abandoned(queue, *, now: float | None = None, confirm_after: float = 0.0) -> list[str]:
    """Re-queue (or fail, with no retries left) the started jobs of queue whose heartbeat expired.

    With confirm_after > 0 an expired entry is handled only after sweeps have seen it expired
    for that many seconds (more than one heartbeat interval): after a Redis outage every
    heartbeat has expired, and the live ones are renewed within an interval. Returns the ids
    handled. Registry entries of jobs that already ended are dropped.
    """
    registry = StartedJobRegistry(
        queue.name,
        connection=queue.connection,
        job_class=queue.job_class,
        serializer=queue.serializer,
    )
    cutoff = now if now is not None else current_timestamp()
    entries = [as_text(e) for e in queue.connection.zrangebyscore(registry.key, 0, cutoff)]
    if confirm_after > 0:
        entries = _confirmed(queue, entries, cutoff, confirm_after)
    handled: list[str] = []
    for entry in entries:
        job_id, _execution_id = parse_composite_key(entry)
        with queue.connection.pipeline() as pipe:
            # Remove first: if another sweeper got here already, zrem returns 0 and we stop.
            if not queue.connection.zrem(registry.key, entry):
                continue
            try:
                job = queue.job_class.fetch(
                    job_id, connection=queue.connection, serializer=queue.serializer
                )
            except NoSuchJobError:
                continue
            if job.get_status(refresh=False) != JobStatus.STARTED:
                continue
            job.meta = job.get_meta(refresh=True)
            job.meta["progress"] = None
            final = not (job.retries_left and job.retries_left > 0)
            if not final:
                log.warning(
                    "job %s: its worker stopped heartbeating; re-queued (%d retries left)",
                    job.id,
                    job.retries_left - 1,
                )
                job.retry(queue, pipe)
            else:
                message = "the job's worker died and no retries were left"
                job.meta["error"] = f"AbandonedJob: {message}"
                log.warning("job %s: %s; failed", job.id, message)
                record_job_failure(job, job.meta["error"], pipe)
                pipe.hset(job.key, "meta", job.serializer.dumps(job.meta))
                announce_end(pipe, job.id)
            pipe.execute()
            if final:
                report_end(job, "failed")
            handled.append(job.id)
    return handled


def reap_unstarted(worker, queue, *, older_than: float) -> list[str]:
    """Re-queue jobs a worker popped but never started (it died in between).

    rq leaves them in the queue's intermediate list and gives up on them after a fixed minute;
    here the limit is older_than seconds since a sweep first saw the job there.
    """
    intermediate = queue.intermediate_queue
    started = set(
        StartedJobRegistry(queue.name, connection=queue.connection).get_job_ids(cleanup=False)
    )
    handled = []
    for job_id in intermediate.get_job_ids():
        if job_id in started:
            continue
        try:  # the worker's own job class: the queue may be the API's plain-Job view of it
            job = worker.job_class.fetch(
                job_id, connection=queue.connection, serializer=queue.serializer
            )
        except NoSuchJobError:
            job = None
        if job is None or job.get_status(refresh=False) != JobStatus.QUEUED:
            intermediate.remove(job_id)  # gone, or already taken care of
            continue
        if intermediate.set_first_seen(job_id):
            continue
        first_seen = intermediate.get_first_seen(job_id)
        if first_seen is None or (now() - first_seen).total_seconds() < older_than:
            continue
        log.warning("job %s: popped by a worker that never started it; re-queued", job_id)
        worker.handle_job_failure(job, queue, exc_string="its worker died before starting it")
        intermediate.remove(job_id)
        handled.append(job_id)
    return handled
