"""Workers inside the API's process, for `convq up` (embedded fakeredis or a real Redis).

rq installs signal handlers and SIGALRM timeouts, and Python allows both only in the main
thread. The embedded workers therefore run in threads as ConvqThreadWorker: a SimpleWorker
that installs no handlers and enforces the job timeout with run_model's deadline instead of
with SIGALRM: checked between layers and between the steps of a long layer (about 0.05-0.5 s
of compute each), so a job stops near its timeout even inside one big layer. The main
thread keeps the HTTP server and its Ctrl+C; Handle.stop() asks each worker to finish its
job and leave its loop, which it notices within its poll
(Settings.poll, CONVQ_POLL_SECONDS).
"""

from __future__ import annotations

import logging
import threading

from . import dispatcher
from .contract.config import Settings
from .contract.connection import own_client
from .runner import _runtime_for, warm
from .workers import build

log = logging.getLogger("convq.worker")


class Handle:
    """The running embedded workers; stop() ends them after their current job."""

    def __init__(self, workers: list, threads: list[threading.Thread], hooks=None):
        self.workers = workers
        self.threads = threads
        self.hooks = hooks  # the webhook dispatcher

    @property
    def alive(self) -> int:
        return sum(t.is_alive() for t in self.threads)

    def stop(self, timeout: float | None = 30.0) -> None:
        for worker in self.workers:
            worker.request_stop_soon()
        for thread in self.threads:
            thread.join(timeout)
        if self.hooks is not None:
            self.hooks.stop(timeout)


def _loop(worker) -> None:
    try:
        worker.work(logging_level="WARNING")
    except Exception:  # noqa: BLE001 - a dying thread must say why
        log.exception("embedded worker %s stopped", worker.name)


def start_workers(redis_client, settings: Settings | None = None, n: int = 1) -> Handle:
    """Warm the engine, then start n worker threads and a webhook dispatcher; return a Handle."""
    settings = settings or Settings()
    warm(settings)
    runtime = _runtime_for(settings)
    workers = [build("thread", own_client(redis_client), settings, runtime) for _ in range(n)]
    threads = [
        threading.Thread(target=_loop, args=(w,), name=f"convq-worker-{i}", daemon=True)
        for i, w in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    hooks = dispatcher.start(own_client(redis_client), settings)
    return Handle(workers, threads, hooks)
