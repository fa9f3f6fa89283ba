"""service.budget: what a key has stored and queued, counted and given back exactly once."""

from __future__ import annotations

import fakeredis
import pytest

from service import budget
from service.errors import TooManyRequests


def _record(redis, owner, job_id, size, ttl=100.0):
    pipe = redis.pipeline()
    budget.record(pipe, owner, job_id, size, ttl)
    pipe.execute()


def test_release_gives_a_jobs_bytes_back_once():
    redis = fakeredis.FakeRedis()
    _record(redis, "k", "a", 300)
    _record(redis, "k", "b", 50)
    assert int(redis.get("convq:budget:k:total")) == 350
    budget.release(redis, "k", "a")
    budget.release(redis, "k", "a")  # a second delete of the same job gives nothing back
    budget.release(redis, "k", "never")
    assert int(redis.get("convq:budget:k:total")) == 50
    assert redis.zrange("convq:budget:k:jobs", 0, -1) == [b"b"]
    assert redis.hkeys("convq:budget:k:sizes") == [b"b"]


def test_check_counts_expired_bytes_out_and_done_jobs_out():
    redis = fakeredis.FakeRedis()
    _record(redis, "k", "old", 900, ttl=-1.0)  # its data expired already
    _record(redis, "k", "live", 50)
    redis.hset("rq:job:live", "status", "queued")
    budget.check(redis, "k", 100, max_jobs=2, max_bytes=200, retry_after=1)
    assert int(redis.get("convq:budget:k:total")) == 50
    with pytest.raises(TooManyRequests, match="store 50 bytes"):
        budget.check(redis, "k", 151, max_jobs=2, max_bytes=200, retry_after=1)
    with pytest.raises(TooManyRequests, match="1 jobs queued or running"):
        budget.check(redis, "k", 1, max_jobs=1, max_bytes=200, retry_after=1)
    redis.hset("rq:job:live", "status", "finished")  # done: no longer counted, dropped
    budget.check(redis, "k", 1, max_jobs=1, max_bytes=200, retry_after=1)
    assert redis.zrange("convq:budget:k:jobs", 0, -1) == []  # old (no record) and live, done


def test_done_jobs_are_dropped_once_the_limit_is_reached_so_the_set_stays_bounded():
    redis = fakeredis.FakeRedis()
    for i in range(12):
        budget.check(redis, "k", 1, max_jobs=5, max_bytes=10**6, retry_after=1)
        _record(redis, "k", f"j{i}", 1)
        redis.hset(f"rq:job:j{i}", "status", "finished" if i % 3 else "started")
        assert redis.zcard("convq:budget:k:jobs") <= 5
    # j0, j3, j6, j9 still run: four, under the limit of five
    budget.check(redis, "k", 1, max_jobs=5, max_bytes=10**6, retry_after=1)
    _record(redis, "k", "j12", 1)
    redis.hset("rq:job:j12", "status", "queued")
    with pytest.raises(TooManyRequests, match="5 jobs queued or running"):
        budget.check(redis, "k", 1, max_jobs=5, max_bytes=10**6, retry_after=1)
