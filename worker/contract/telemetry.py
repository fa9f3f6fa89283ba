"""Job timings kept in Redis, so the API's /metrics (any process, any machine) can expose them.

Workers call record_job() when a job ends; the API reads the counters back with read_telemetry().
Layout (key names built by keys.py):
- `convq:telemetry:jobs`           hash {state: jobs ended in that state}
- `convq:telemetry:<kind>_seconds` hash {"<bucket index>": observations, "count", "sum"} per kind
  (queue = enqueued -> started, compute = started -> ended). Buckets are not cumulative in Redis
  (one HINCRBY per observation); read_telemetry() accumulates them the way Prometheus expects.
"""

from __future__ import annotations

import bisect
import logging
import math
from dataclasses import dataclass

import redis as redis_lib

from . import keys

log = logging.getLogger(__name__)


# Upper bounds in seconds; +Inf is implied. Queue waits span an idle queue to a long backlog.
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
# Compute spans a 1-image demo job (~10 ms) to a large batch near the job timeout.
COMPUTE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
BUCKETS = {"queue": QUEUE_BUCKETS, "compute": COMPUTE_BUCKETS}


@dataclass(frozen=True)
class Histogram:
    """One histogram read back: cumulative counts per upper bound (last is +Inf), and the sum."""

    buckets: list[tuple[float, int]]
    count: int
    sum: float


def _observe(pipe, kind: str, seconds: float | None) -> None:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return  # a job that never started has no compute time; clock skew gives negatives
    key = keys.telemetry_seconds(kind)
    pipe.hincrby(key, str(bisect.bisect_left(BUCKETS[kind], seconds)), 1)
    pipe.hincrby(key, "count", 1)
    pipe.hincrbyfloat(key, "sum", seconds)


def record_job(
    redis, state: str, queue_seconds: float | None, compute_seconds: float | None
) -> None:
    """Count a job that ended in state ('finished'/'failed') with its queue-wait and compute time.

    Never raises on a Redis error: losing a sample must not fail the job it describes.
    """
    record_jobs(redis, [(state, queue_seconds, compute_seconds)])


def record_jobs(redis, samples: list[tuple[str, float | None, float | None]]) -> None:
    """record_job for every (state, queue_seconds, compute_seconds), in one round trip."""
    try:
        pipe = redis.pipeline(transaction=True)
        for sample in samples:
            observe_job(pipe, *sample)
        pipe.execute()
    except redis_lib.RedisError as exc:
        log.warning("telemetry for %d jobs not recorded: %s", len(samples), exc)


def observe_job(
    pipe, state: str, queue_seconds: float | None, compute_seconds: float | None
) -> None:
    """Add record_job's commands for one job to pipe (executed by the caller)."""
    pipe.hincrby(keys.telemetry_jobs(), state, 1)
    _observe(pipe, "queue", queue_seconds)
    _observe(pipe, "compute", compute_seconds)


def _histogram(raw: dict, bounds: tuple[float, ...]) -> Histogram:
    fields = {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}
    cumulative, running = [], 0
    for i, bound in enumerate((*bounds, math.inf)):
        running += int(fields.get(str(i), 0))
        cumulative.append((bound, running))
    return Histogram(cumulative, int(fields.get("count", 0)), float(fields.get("sum", 0.0)))


def read_telemetry(redis) -> tuple[dict[str, int], dict[str, Histogram]]:
    """Return ({state: jobs ended}, {"queue"|"compute": Histogram}); raises redis errors."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.telemetry_jobs())
    for kind in BUCKETS:
        pipe.hgetall(keys.telemetry_seconds(kind))
    jobs_raw, *hists = pipe.execute()
    jobs = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in jobs_raw.items()}
    return jobs, {
        kind: _histogram(raw, BUCKETS[kind]) for kind, raw in zip(BUCKETS, hists, strict=True)
    }
