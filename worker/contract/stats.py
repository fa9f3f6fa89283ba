"""What /metrics reports of the queue: jobs by state, live workers, job-time histograms, callbacks.

Read through rq's public API on a client of its own: rq's Worker.all() raises the socket timeout
of the connection pool it is given (to wait out a worker's blocking pop), and the API's shared
pool must keep its short timeout so an outage is answered with 503 in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import rq
from rq import Worker

from . import webhooks
from .connection import own_client
from .telemetry import Histogram, read_telemetry


@dataclass(frozen=True)
class QueueStats:
    """One reading of the queue; jobs maps each rq state to how many jobs are in it now."""

    jobs: dict[str, int]
    workers_busy: int
    workers_idle: int
    ended: dict[str, int]
    histograms: dict[str, Histogram]
    callbacks: dict[str, int] = field(default_factory=dict)  # attempts by outcome
    callbacks_waiting: int = 0  # deliveries due now or waiting for a retry

    @property
    def depth(self) -> int:
        """Jobs waiting in the queue (not counting running ones)."""
        return self.jobs["queued"]


def queue_stats(queue: rq.Queue) -> QueueStats:
    """Read the queue's state from Redis; raises redis errors (and OSError) when it is down."""
    client = own_client(queue.connection)
    try:
        view = rq.Queue(
            queue.name,
            connection=client,
            serializer=queue.serializer,
            job_class=queue.job_class,
        )
        client.ping()
        registries = {
            "started": view.started_job_registry,
            "finished": view.finished_job_registry,
            "failed": view.failed_job_registry,
            "deferred": view.deferred_job_registry,
            "scheduled": view.scheduled_job_registry,
            "canceled": view.canceled_job_registry,
        }
        jobs = {"queued": view.count}
        for state, registry in registries.items():
            # cleanup=False: a reading must never move jobs between registries. A set, because
            # rq 3 keys the started registry by job:execution, one entry per attempt.
            jobs[state] = len(set(registry.get_job_ids(cleanup=False)))
        workers = Worker.all(queue=view, serializer=view.serializer)
        busy = sum(1 for w in workers if w.get_state() == "busy")
        ended, histograms = read_telemetry(client)
        callbacks, waiting = webhooks.counts(client)
        return QueueStats(jobs, busy, len(workers) - busy, ended, histograms, callbacks, waiting)
    finally:
        client.connection_pool.disconnect()
