"""Prometheus metrics at /metrics: HTTP requests counted in-process, the rest read from Redis.

Request counters live in this process (under gunicorn with PROMETHEUS_MULTIPROC_DIR set, in
prometheus-client's shared files, summed over workers at scrape time). Jobs by state, queue depth,
live workers and the job-time histograms are read from Redis on every scrape, so any API replica
reports the same numbers and no worker process has to be scraped. If Redis is down, /metrics still
answers 200 with the request counters and `convq_redis_up 0`.
"""

from __future__ import annotations

import logging
import time

import redis as redis_lib
from flask import Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from worker.contract.stats import queue_stats

log = logging.getLogger(__name__)

# Request latency buckets in seconds: most routes answer in ms; infer waits up to its bound.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RedisCollector:
    """Read queue, job, worker and telemetry state from the app's Redis on each collect()."""

    def __init__(self, state) -> None:
        self.state = state  # app.extensions["convq"]: .redis, .queue

    def describe(self):
        return []  # nothing to pre-register; keeps register() from touching Redis

    def collect(self):
        up = GaugeMetricFamily("convq_redis_up", "1 if Redis answered this scrape, else 0")
        try:
            families = list(self._from_redis())
        except (redis_lib.RedisError, OSError) as exc:
            log.warning("metrics: Redis unavailable during scrape: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _from_redis(self):
        stats = queue_stats(self.state.queue)
        jobs = GaugeMetricFamily("convq_jobs", "Jobs in each RQ state right now", labels=["state"])
        for state, n in stats.jobs.items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("convq_queue_depth", "Jobs waiting in the queue", value=stats.depth)
        live = GaugeMetricFamily("convq_workers", "Live workers on the queue", labels=["state"])
        live.add_metric(["busy"], stats.workers_busy)
        live.add_metric(["idle"], stats.workers_idle)
        yield live

        total = CounterMetricFamily(
            "convq_jobs_ended", "Jobs that ended, by final state", labels=["state"]
        )
        for state, n in sorted(stats.ended.items()):
            total.add_metric([state], n)
        yield total
        help_text = {
            "queue": "Seconds a job waited between enqueue and a worker starting it",
            "compute": "Seconds a worker spent running a job",
        }
        attempts = CounterMetricFamily(
            "convq_callback_attempts",
            "Job callback attempts by outcome: delivered (2xx), retried (again later), failed "
            "(given up)",
            labels=["outcome"],
        )
        for outcome, n in stats.callbacks.items():
            attempts.add_metric([outcome], n)
        yield attempts
        yield GaugeMetricFamily(
            "convq_callbacks_waiting",
            "Job callbacks due now or waiting for their next attempt",
            value=stats.callbacks_waiting,
        )
        for kind, hist in stats.histograms.items():
            family = HistogramMetricFamily(f"convq_job_{kind}_seconds", help_text[kind])
            buckets = [("+Inf" if b == float("inf") else repr(b), n) for b, n in hist.buckets]
            family.add_metric([], buckets, sum_value=hist.sum)
            yield family


class _Sources:
    """Chain several collectors into one object generate_latest() can read."""

    def __init__(self, *collectors) -> None:
        self.collectors = collectors

    def collect(self):
        for c in self.collectors:
            yield from c.collect()


def init_app(app: Flask) -> None:
    """Register the /metrics route and the request-counting hooks on app."""
    # prometheus-client picks shared-file values at import when PROMETHEUS_MULTIPROC_DIR is set;
    # follow what it actually chose rather than re-reading the environment.
    multiproc = values.ValueClass is not values.MutexValue
    # Per-app registry: several apps in one process (tests) must not collide in the global one.
    # In multiprocess mode the values go to the shared files whatever registry holds them.
    registry = None if multiproc else CollectorRegistry()
    requests_total = Counter(
        "convq_http_requests",
        "HTTP requests by route template, method and status code",
        ["route", "method", "code"],
        registry=registry,
    )
    latency = Histogram(
        "convq_http_request_duration_seconds",
        "HTTP request latency by route template",
        ["route"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )

    @app.before_request
    def _start_timer():
        g.convq_metrics_t0 = time.perf_counter()

    @app.after_request
    def _count(response):
        # The rule template, not the path: job ids would make the label set grow without bound.
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        requests_total.labels(route, request.method, str(response.status_code)).inc()
        t0 = g.get("convq_metrics_t0")
        if t0 is not None:
            latency.labels(route).observe(time.perf_counter() - t0)
        return response

    def metrics() -> Response:
        if registry is None:  # multiprocess: collect what every process wrote to the files
            local = CollectorRegistry()
            multiprocess.MultiProcessCollector(local)
        else:
            local = registry
        sources = _Sources(local, RedisCollector(current_app.extensions["convq"]))
        return Response(generate_latest(sources), content_type=CONTENT_TYPE_LATEST)

    app.add_url_rule("/metrics", "metrics", metrics, methods=["GET"])
