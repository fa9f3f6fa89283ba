"""Per-key budget: what one API key may have queued and stored at once.

Redis keeps, per owner (the API key's id; every client shares one budget when auth is off):
- convq:budget:<owner>:jobs, a sorted set of the key's jobs not known to be done (id -> submit
  time); a check that finds CONVQ_MAX_KEY_JOBS ids there reads their statuses and drops the ones
  rq reports finished, failed, stopped, canceled or gone, so it never holds many more than that
  (below the limit a check reads no status: one round trip with 64 clients instead of 65
  commands);
- convq:budget:<owner>:bytes, a sorted set of the key's jobs by the time their data expires,
  with their bytes (input + predicted outputs) in convq:budget:<owner>:sizes and the running sum in
  convq:budget:<owner>:total. Expired entries are dropped at each check, at most EXPIRE_BATCH per
  request (the cost of one check stays bounded), and a deleted job gives its bytes back at once.

Two submissions racing past the same check can overshoot a budget by one job each; the budget
bounds what a key can pile up over many requests, the per-request limits bound each one.
"""

from __future__ import annotations

import time

from .errors import TooLarge, TooManyRequests

EXPIRE_BATCH = 1000
_DONE = {b"finished", b"failed", b"stopped", b"canceled"}


def _keys(owner: str | None) -> tuple[str, str, str, str]:
    base = f"convq:budget:{owner or '-'}"
    return f"{base}:jobs", f"{base}:bytes", f"{base}:sizes", f"{base}:total"


def _drop(redis, owner: str | None, ids: list) -> None:
    _, by_time, sizes, total = _keys(owner)
    amounts = redis.hmget(sizes, ids)
    pipe = redis.pipeline()
    pipe.zrem(by_time, *ids)
    pipe.hdel(sizes, *ids)
    freed = sum(int(a) for a in amounts if a is not None)
    if freed:
        pipe.decrby(total, freed)
    pipe.execute()


def _active(redis, owner: str | None, ids: list) -> int:
    """Return how many of ids, the owner's jobs not known done, are queued or running (dropping
    the others)."""
    if not ids:
        return 0
    jobs = _keys(owner)[0]
    pipe = redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(b"rq:job:" + job_id, "status")
    statuses = pipe.execute()
    done = [i for i, s in zip(ids, statuses, strict=True) if s is None or s in _DONE]
    if done:
        redis.zrem(jobs, *done)
    return len(ids) - len(done)


def check(
    redis, owner: str | None, job_bytes: int, *, max_jobs: int, max_bytes: int, retry_after: int
) -> None:
    """Refuse a job that would take the key past its budget: 413 alone, 429 with the others."""
    if job_bytes > max_bytes:
        raise TooLarge(
            f"this job stores {job_bytes} bytes (images and outputs); a key may store "
            f"{max_bytes} in all",
            field="images",
        )
    jobs, by_time, _, total = _keys(owner)
    pipe = redis.pipeline(transaction=False)  # what the checks read, in one round trip
    pipe.zrangebyscore(by_time, 0, time.time(), start=0, num=EXPIRE_BATCH)
    pipe.get(total)
    pipe.zcard(jobs)
    gone, raw_total, listed = pipe.execute()
    if gone:
        _drop(redis, owner, gone)
        raw_total = redis.get(total)
    stored = int(raw_total or 0)
    if stored + job_bytes > max_bytes:
        raise TooManyRequests(
            f"this key's jobs store {stored} bytes and this one would add {job_bytes}; the "
            f"limit is {max_bytes} per key: delete finished jobs (DELETE /v2/jobs/<id>) or wait "
            "for results to expire",
            retry_after=retry_after,
        )
    if listed < max_jobs:  # fewer not known done than the limit: no status to read
        return
    active = _active(redis, owner, redis.zrange(jobs, 0, -1))
    if active >= max_jobs:
        raise TooManyRequests(
            f"this key has {active} jobs queued or running; the limit is {max_jobs} per key: "
            "wait for some to finish",
            retry_after=retry_after,
        )


def record(pipe, owner: str | None, job_id: str, job_bytes: int, ttl: float) -> None:
    """Count a queued job against the key's budget until ttl seconds from now.

    Adds its writes to pipe (the transaction that writes the job, queue.submit's also_write).
    """
    jobs, by_time, sizes, total = _keys(owner)
    now = time.time()
    pipe.zadd(jobs, {job_id: now})
    pipe.zadd(by_time, {job_id: now + ttl})
    pipe.hset(sizes, job_id, job_bytes)
    pipe.incrby(total, job_bytes)


def release(redis, owner: str | None, job_id: str) -> None:
    """Give a deleted job's place and bytes back to the key (two round trips at most)."""
    jobs, by_time, sizes, total = _keys(owner)
    pipe = redis.pipeline()  # one transaction: of two releases of a job, one deletes its size
    pipe.zrem(jobs, job_id)
    pipe.zrem(by_time, job_id)
    pipe.hget(sizes, job_id)
    pipe.hdel(sizes, job_id)
    _, _, size, deleted = pipe.execute()
    if deleted and size is not None and int(size):
        redis.decrby(total, int(size))
