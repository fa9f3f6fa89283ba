"""A work-horse that lives for many jobs: fork it once, then hand it job ids over a pipe.

rq forks a fresh horse for every job; for a worker holding Numba's kernels and its models that
fork (and the child's exit) cost ~9 ms of a ~20 ms one-image job. This horse is forked while the
worker is idle and runs jobs one after another, keeping what rq's per-job fork gave us: a crash,
SIGKILL or stuck kernel ends only the horse (the parent sees its pipe close, reaps it, fails or
re-queues the job, and forks a new one before the next job), and it dies with its parent.

The parent writes one JSON line per job, {"jobs": [[job id, execution id], ...], "queue"} (more
than one job when the worker took a batch, worker/batch_take.py), and reads two bytes back:
b"1" when the horse took them (a horse that died idle costs no job an attempt) and b"0" once
every job has ended and its state is saved. Before all that, a new horse loads the
engine's kernels and says b"r". Nothing else crosses the pipe.

The kernels load and run only in the horse, never in the worker: GNU OpenMP (and Numba, which
checks) refuses to run in a child forked from a process that has started its thread pool, and
Numba's fork-safe alternative, the workqueue layer, costs ~150 us per kernel launch (a one-image
job's whole compute is ~2 ms) and 5-10% of a 32-image AlexNet job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import select
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from rq.executions import Execution
from rq.queue import Queue
from rq.worker import Worker
from rq.worker.base import WorkerStatus

from .contract import heap
from .contract.config import Settings

log = logging.getLogger("convq.worker")
_TOOK = b"1"
_DONE = b"0"
_READY = b"r"
WARMUP_SECONDS = 900.0
"""Seconds a new horse may take to load (or, on a cold cache, compile) the kernels."""
IDLE_TRIM_SECONDS = 1.0
"""Seconds without a job after which the horse hands its freed memory back to the OS."""
HAND_OVER_SECONDS = 10.0
"""Seconds an idle horse has to acknowledge a job before it counts as dead (it needs ~0)."""


def _release_memory() -> None:
    """Hand the idle horse's freed heap back to the OS.

    A per-job horse gave everything back at exit; a long-lived one would otherwise sit at
    the peak of its biggest job while idle. Only once idle: trimming after every job made the
    next one fault its pages in again (16-image AlexNet job 30 -> 34 ms, ~15% throughput).
    """
    heap.release()


def keep_freed_memory() -> None:
    """Let the next job reuse this one's big arrays instead of faulting fresh pages in
    (contract.heap); _release_memory() trims the heap once idle."""
    heap.keep_freed(heap.WORKER_KEEP_BYTES)


@dataclass
class _Horse:
    pid: int
    commands: int  # write end: one JSON line per job
    replies: int  # read end: one byte per finished job, EOF when the horse is gone


class ReusedHorseMixin(Worker):
    """rq.Worker methods that run jobs in one long-lived horse instead of a fork per job."""

    settings: Settings  # set by the worker's configure()
    batch: list = []  # (job, execution) of each job the horse runs now, the lead first
    perform_batch: Callable[[list, Queue], None]  # BatchMixin's (worker/batch_worker.py)
    _horse: _Horse | None = None

    # -- parent side ------------------------------------------------------------------------
    def prepare_horse(self) -> None:
        """Fork the work-horse now and wait until its kernels are loaded."""
        self._ensure_horse()

    def _ensure_horse(self) -> _Horse | None:
        """Return the idle horse, forking and warming one if there is none (None if it failed)."""
        if self._horse is None:
            self._spawn_horse()
        return self._horse

    def _spawn_horse(self) -> None:
        cmd_read, cmd_write = os.pipe()
        reply_read, reply_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the horse: never returns into the worker's code
            status = 1
            try:
                os.close(cmd_write)
                os.close(reply_read)
                os.setpgrp()  # rq kills the horse's whole process group
                self._horse_loop(cmd_read, reply_write)
                status = 0
            finally:
                os._exit(status)
        os.close(cmd_read)
        os.close(reply_write)
        self._horse = _Horse(pid, cmd_write, reply_read)
        began = time.monotonic()
        ready, _, _ = select.select([reply_read], [], [], WARMUP_SECONDS)
        if not ready or os.read(reply_read, 1) != _READY:
            log.error("work-horse %d did not load the engine within %.0f s", pid, WARMUP_SECONDS)
            self._kill_and_reap()
            return
        log.info("work-horse %d ready: kernels loaded in %.1f s", pid, time.monotonic() - began)

    def execute_job(self, job, queue):
        """Hand job (and the queued jobs batched with it) to the horse and watch it run."""
        jobs = [job, *self.take_more(job, queue)]
        began = time.monotonic()
        self.batch = self.prepare_executions(jobs)
        message = (
            json.dumps(
                {"jobs": [[j.id, e.id] for j, e in self.batch], "queue": queue.name}
            ).encode()
            + b"\n"
        )
        for _attempt in range(3):
            horse = self._ensure_horse()
            if self._hand_over(horse, message):
                self._horse_pid = horse.pid
                break
            # It died or hung while idle (OOM killer, kill -9): the job never reached it.
            log.warning("idle work-horse %d is gone; forking another", horse.pid)
            self._kill_and_reap()
        what = f"Job {job.id}" if len(jobs) == 1 else f"Batch of {len(jobs)} jobs from {job.id}"
        self.procline(f"{what} in horse {self.horse_pid} at {time.time()}")
        try:
            self.monitor_work_horse(job, queue, self.batch[0][1])
        finally:
            self.batch = []
        self.timed(jobs, time.monotonic() - began)
        self.set_state(WorkerStatus.IDLE)

    def _hand_over(self, horse: _Horse | None, message: bytes) -> bool:
        """Send message; True once the horse says it took it."""
        if horse is None:
            return False
        try:
            os.write(horse.commands, message)
        except OSError:  # EPIPE: nobody reads the other end any more
            return False
        ready, _, _ = select.select([horse.replies], [], [], HAND_OVER_SECONDS)
        return bool(ready) and os.read(horse.replies, 1) == _TOOK

    def _kill_and_reap(self) -> None:
        if self._horse is not None:
            with contextlib.suppress(OSError):
                os.killpg(self._horse.pid, signal.SIGKILL)
        self._reap_horse()

    def wait_for_horse(self):
        """Block until the horse ends its job (pid, 0, None) or dies (pid, wait status, rusage)."""
        horse = self._horse
        if horse is None:
            return None, None, None
        # rq's SIGALRM (job monitoring) interrupts this read with an exception, as with wait4.
        if os.read(horse.replies, 1) == _DONE:
            return horse.pid, os.EX_OK, None
        return self._reap_horse()

    def _reap_horse(self):
        horse, self._horse = self._horse, None
        if horse is None:
            return None, None, None
        for fd in (horse.commands, horse.replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(ChildProcessError):
            return os.wait4(horse.pid, 0)
        return horse.pid, None, None

    def stop_horse(self, wait: float = 2.0) -> None:
        """Let an idle horse exit (its pipe closes); SIGKILL it if it is still there after wait."""
        horse = self._horse
        if horse is None:
            return
        with contextlib.suppress(OSError):
            os.close(horse.commands)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(horse.pid, os.WNOHANG)[0] == 0:
                    time.sleep(0.01)
                    continue
            break
        else:
            self._kill_and_reap()
            return
        self._reap_horse()

    def teardown(self):
        if not self.is_horse:
            self.stop_horse()
        super().teardown()

    # -- horse side -------------------------------------------------------------------------
    def _horse_loop(self, commands: int, replies: int) -> None:
        random.seed()
        self.setup_work_horse_signals()
        self._is_horse = True
        import engine  # compiled code is cached on disk: ~0.3 s; the first time ever, ~30 s

        engine.set_threads(self.settings.threads)
        engine.warmup()
        os.write(replies, _READY)
        with os.fdopen(commands, "rb") as lines:  # one line at a time: nothing else buffers
            while True:
                if not select.select([commands], [], [], IDLE_TRIM_SECONDS)[0]:
                    _release_memory()  # idle: trimming now costs no job its page faults
                line = lines.readline()
                if not line:
                    return  # the worker closed the pipe: it is stopping
                os.write(replies, _TOOK)
                self._horse_run(json.loads(line))
                os.write(replies, _DONE)

    def _horse_run(self, message: dict) -> None:
        ids = [job_id for job_id, _ in message["jobs"]]
        jobs = self.job_class.fetch_many(
            ids, connection=self.connection, serializer=self.serializer
        )
        members = []
        for (job_id, execution_id), job in zip(message["jobs"], jobs, strict=True):
            if job is None:
                log.info("job %s was deleted before it started", job_id)
                continue
            execution = Execution(
                execution_id, job.id, connection=self.connection, worker_name=self.name
            )
            members.append((job, execution))
        if not members:
            return
        queue = next(q for q in self.queues if q.name == message["queue"])
        self.executions = {execution.id: execution for _, execution in members}
        os.environ["RQ_JOB_ID"] = members[0][0].id
        try:
            self.perform_batch(members, queue)  # a job alone too (batch_worker.run_alone)
        finally:
            self.executions = {}
