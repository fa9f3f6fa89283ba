"""`convq worker`: read settings once, warm the engine, then take jobs until told to stop.

A Redis outage never ends the process: whatever part of rq gives up, the loop below backs off,
reconnects and starts a fresh worker registration.
"""

from __future__ import annotations

import argparse
import logging
import time

import redis
from rq.exceptions import StopRequested

import engine

from . import dispatcher
from .contract import defaults
from .contract.config import Settings
from .contract.connection import connect
from .horse import keep_freed_memory
from .runtime import Runtime, current, install
from .workers import build

log = logging.getLogger("convq.worker")


def _runtime_for(settings: Settings) -> Runtime:
    rt = current()
    if rt.settings != settings:
        rt = install(Runtime(settings))
    return rt


def warm(settings: Settings) -> None:
    """Set the engine's thread count and compile (or load from cache) every kernel."""
    engine.set_threads(settings.threads)
    engine.warmup()


def make_worker(redis_client, settings: Settings, *, kind: str = "fork"):
    """Return a convq worker (JSONSerializer, ConvqJob) on settings.queue.

    A thread worker runs kernels in this process, so the engine is warmed here first; a forking
    worker's work-horse warms itself (worker.horse), and this process must never run a kernel.
    """
    if kind == "thread":
        warm(settings)
    else:
        engine.set_threads(settings.threads)
    return build(kind, redis_client, settings, _runtime_for(settings))


def burst(redis_client, settings: Settings | None = None) -> None:
    """Run every queued job in this process and thread, then return (tests, fakeredis)."""
    settings = settings or Settings()
    worker = build("thread", redis_client, settings, _runtime_for(settings))
    worker.work(burst=True, logging_level="WARNING")


def main(argv: list[str] | None = None) -> int:
    """Run one worker process until SIGTERM/SIGINT (after its current job); return 0."""
    parser = argparse.ArgumentParser(
        prog="convq worker",
        description="Run one convq worker (settings from REDIS_URL and "
        "CONVQ_* variables) until SIGTERM; it finishes its current job first.",
    )
    parser.add_argument("--burst", action="store_true", help="quit once the queue is empty")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    keep_freed_memory()
    log.info("%d threads per job; queue %r", settings.threads, settings.queue)
    # Its own client: the horse is forked from this process and must share no pool with it.
    hooks = dispatcher.start(connect(settings.redis_url), settings)
    try:
        return _work(settings, burst=args.burst)
    finally:
        hooks.stop(timeout=5.0)


def _work(settings: Settings, *, burst: bool) -> int:
    """Take jobs until stopped, reconnecting through Redis outages; return the exit status."""
    pause = 1.0
    while True:
        worker = None
        began = time.monotonic()
        try:
            client = connect(settings.redis_url)
            worker = make_worker(client, settings)
            worker.prepare_horse()  # kernels loaded before the worker says it is there
            worker.work(burst=burst, logging_level="WARNING")
        except redis.RedisError as exc:
            log.warning("Redis unavailable (%s); retrying in %.0f s", exc, pause)
        except StopRequested:
            return 0
        finally:
            if worker is not None:
                worker.stop_horse()
        if (worker is not None and worker.stopping) or burst:
            return 0
        if time.monotonic() - began > defaults.BACKOFF_MAX:
            pause = 1.0  # it ran fine for a while: this is a new outage
        try:
            time.sleep(pause)
        except StopRequested:  # rq's SIGTERM handler is still installed
            return 0
        pause = min(pause * 2, defaults.BACKOFF_MAX)
