"""convq's rq workers: a forking one for `convq worker`, a thread-safe one for burst/embedded.

What they add to rq: a short heartbeat and a frequent sweep for abandoned jobs (reaper), a
horse that dies with its parent, a hard kill of a horse stuck in a kernel past its timeout
(failed, not retried), Redis errors during a job logged instead of ending the worker, and a
canceled job's record dropped instead of marked failed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import math
import os
import signal
import time

import redis
from rq import worker_registration
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import BaseDeathPenalty, HorseMonitorTimeoutException
from rq.utils import now
from rq.worker import SimpleWorker, Worker
from rq.worker.base import WorkerStatus

from .batch_worker import BatchMixin
from .contract import defaults, keys
from .contract.queue import announce_end
from .contract.store import Store
from .horse import ReusedHorseMixin
from .jobclass import ConvqJob, report_end
from .jobs import JOB_FUNCTIONS
from .reaper import reap_abandoned, reap_unstarted

log = logging.getLogger("convq.worker")
_PR_SET_PDEATHSIG = 1


class _ConvqMixin(BatchMixin):
    """Behaviour shared by both worker kinds; configure() must be called after __init__."""

    poll_seconds = defaults.POLL_SECONDS
    max_connection_wait_time = defaults.BACKOFF_MAX
    stopping = False  # a warm stop was asked for: the runner must not start the worker again

    def configure(self, settings, runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.poll_seconds = settings.poll
        self.store = Store.from_settings(self.connection, settings)
        self._healthy_since: float | None = None

    def register_birth(self):
        """Register as rq does, then heartbeat at once.

        rq gives a new worker's key worker_ttl + 60 s; one that died before its first heartbeat
        would be counted alive (readiness, the sweep) for that long.
        """
        super().register_birth()
        self.heartbeat()

    def request_stop(self, signum, frame):
        """Note a warm stop (SIGTERM, SIGINT or rq's shutdown command), then let rq stop."""
        self.stopping = True
        super().request_stop(signum, frame)

    @property
    def dequeue_timeout(self) -> int:
        return math.ceil(self.poll_seconds)  # the block itself is cut to poll_seconds below

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        """Block on the queue in short slices so a stop request or a sweep is never far off."""
        if timeout is None:  # burst: rq pops without blocking
            return super().dequeue_job_and_maintain_ttl(None, max_idle_time)
        while not self._stop_requested:
            result = super().dequeue_job_and_maintain_ttl(timeout, self.poll_seconds)
            if result is not None:
                return result
        return None

    def heartbeat(self, timeout=None, pipeline=None):
        if pipeline is not None:
            return super().heartbeat(timeout, pipeline)
        try:
            super().heartbeat(timeout)
        except redis.RedisError:
            self._healthy_since = None
            raise
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()

    def _may_reap(self) -> bool:
        # Only once every live worker has had a full heartbeat TTL to show it is alive.
        ttl = self.settings.heartbeat + self.settings.heartbeat_grace
        return self._healthy_since is not None and time.monotonic() - self._healthy_since > ttl

    def clean_registries(self):
        """Sweep each queue: abandoned jobs, expired registry entries, dead worker keys."""
        for queue in self.queues:
            lock = keys.sweep_lock(queue.name)
            try:
                if not self.connection.set(
                    lock, self.name, nx=True, ex=max(1, self.maintenance_interval - 1)
                ):
                    continue
                if self._may_reap():
                    # An outage expires every heartbeat at once; a live worker renews its
                    # own within one interval, so act only on entries expired for two.
                    reap_abandoned(queue, confirm_after=2 * self.settings.heartbeat)
                    reap_unstarted(
                        self,
                        queue,
                        older_than=self.settings.heartbeat + self.settings.heartbeat_grace,
                    )
                for registry in (FinishedJobRegistry, FailedJobRegistry):
                    registry(queue=queue).cleanup()
                self.store.sweep_blobs()
                worker_registration.clean_worker_registry(queue)
            except (redis.RedisError, OSError) as exc:  # a sweep must never end the worker
                log.warning("sweep of queue %s skipped: %s", queue.name, exc)
        self.last_cleaned_at = now()

    def _canceled(self, job) -> bool:
        try:
            return self.store.is_canceled(job.id)
        except redis.RedisError:
            return False

    def handle_job_failure(
        self, job, queue, started_job_registry=None, exc_string="", execution=None
    ):
        if job.superseded:
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()
            log.warning("job %s: stopped, a newer attempt runs it", job.id)
            return
        if self._canceled(job):
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()
            report_end(job, "canceled")
            job.delete(remove_from_queue=True)
            self.store.delete_job(job.id)
            self._release(job)
            with self.connection.pipeline(transaction=False) as pipe:
                announce_end(pipe, job.id)  # a waiting /infer finds it gone now
                pipe.execute()
            log.info("job %s canceled", job.id)
            return
        retry = job.should_retry and self._stopped_job_id != job.id
        super().handle_job_failure(job, queue, started_job_registry, exc_string, execution)
        if not retry:
            self._release(job)
            job.ended("failed")
        self._log_job(job, "failed" if not retry else "re-queued", exc_string)

    def _release(self, job) -> None:
        """Free the input, run claim and cancel mark of a job that will not run again."""
        kwargs = job.kwargs if job.func_name in JOB_FUNCTIONS else {}
        input_id = kwargs.get("input_id")
        try:
            self.store.finish_run(job.id, input_id if isinstance(input_id, str) else job.id)
        except redis.RedisError as exc:  # the TTLs clean up what is left
            log.warning("job %s: its input was not freed (%s)", job.id, exc)

    def handle_job_success(self, job, queue, started_job_registry, execution):
        super().handle_job_success(job, queue, started_job_registry, execution)
        job.ended("finished")
        self._log_job(job, "finished", "")


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphan keeps computing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class ConvqWorker(ReusedHorseMixin, _ConvqMixin, Worker):
    """Runs jobs in a forked horse that lives for many jobs (see worker.horse).

    A crash, SIGKILL or stuck kernel costs one attempt and that horse, never the worker.
    """

    def get_heartbeat_ttl(self, job, working_time: float = 0.0) -> int:
        return self.settings.heartbeat + self.settings.heartbeat_grace

    def heartbeat(self, timeout=None, pipeline=None):
        # rq keeps a worker's key 60+ s past its last heartbeat; this one beats every few
        # seconds idle or busy, so a dead worker's key goes within one heartbeat TTL.
        ttl = self.get_heartbeat_ttl(None) + math.ceil(self.poll_seconds)
        return super().heartbeat(min(timeout or ttl, ttl), pipeline)

    def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
        # Fork the horse while idle, so no job waits for a fork (first job, or after a crash).
        if not self._stop_requested:
            self._ensure_horse()
        return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)

    def setup_work_horse_signals(self):
        super().setup_work_horse_signals()
        parent = os.getppid()
        _die_with_parent()
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    def maintain_heartbeats(self, job, execution):
        for member, member_execution in self.batch or [(job, execution)]:
            try:
                super().maintain_heartbeats(member, member_execution)
            except redis.RedisError as exc:
                log.warning("heartbeat for job %s failed: %s", member.id, exc)

    def monitor_work_horse(self, job, queue, execution):
        """Wait for the horse, heartbeating; kill it once it is well past the job's timeout."""
        ret_val = None
        timed_out = False
        job.started_at = now()
        limit = None
        if job.timeout and job.timeout > 0:
            limit = job.timeout + self.settings.timeout_grace
        while True:
            try:
                with self.death_penalty_class(
                    self.job_monitoring_interval, HorseMonitorTimeoutException
                ):
                    _pid, ret_val, _rusage = self.wait_for_horse()
                break
            except HorseMonitorTimeoutException:
                if limit is not None and (now() - job.started_at).total_seconds() > limit:
                    timed_out = True
                    self.kill_horse()
                    _pid, ret_val, _rusage = self.wait_for_horse()
                    break
                self.maintain_heartbeats(job, execution)
            except OSError as exc:
                if exc.errno != errno.EINTR:
                    raise
        self._horse_pid = 0
        members = self.batch or [(job, execution)]
        for _member, member_execution in members:
            self.executions.pop(member_execution.id, None)
        if ret_val == os.EX_OK and not timed_out:
            return
        for member, member_execution in members:  # each job of a batch as if it ran alone
            try:
                self._horse_ended_badly(member, queue, member_execution, ret_val, timed_out)
            except redis.RedisError as exc:
                # The sweep re-queues the job once Redis is back and its heartbeat has expired.
                log.warning("job %s: could not record how its horse ended: %s", member.id, exc)

    def _horse_ended_badly(self, job, queue, execution, ret_val, timed_out: bool) -> None:
        status = job.get_status()
        job.ended_at = now()
        if timed_out:
            job.retries_left = 0
            job.meta = job.get_meta(refresh=True)
            job.meta["error"] = (
                f"JobTimeout: job timed out: still inside one layer "
                f"{self.settings.timeout_grace} s past its {job.timeout} s "
                "timeout; the worker killed it"
            )
            job.save_meta()
            self.handle_job_failure(job, queue, exc_string=job.meta["error"], execution=execution)
        elif self._stopped_job_id == job.id:
            self._handle_stopped_job(job, queue, execution)
        elif status not in ("finished", "failed"):
            sig = os.WTERMSIG(ret_val) if ret_val and os.WIFSIGNALED(ret_val) else None
            message = f"work-horse died (exit status {ret_val}, signal {sig})"
            self.handle_work_horse_killed(job, None, ret_val, None)
            self.handle_job_failure(job, queue, exc_string=message, execution=execution)
            if status == "queued":
                # The horse died before starting it (a job of a batch waits its turn): it is
                # still in the intermediate list and now queued again; the sweep must not
                # re-queue it a second time.
                queue.intermediate_queue.remove(job.id)


class _DeadlineOnly(BaseDeathPenalty):
    """No signal-based timeout: threads cannot take SIGALRM; run_model checks its deadline."""

    def setup_death_penalty(self):
        pass

    def cancel_death_penalty(self):
        pass


class ConvqThreadWorker(_ConvqMixin, SimpleWorker):
    """Runs jobs in the calling thread without touching signals (burst, embedded workers)."""

    death_penalty_class = _DeadlineOnly

    def _install_signal_handlers(self):
        pass  # rq may only install them from the main thread; Handle.stop() stops us instead

    def execute_job(self, job, queue):
        """Run job, with the queued jobs batched with it, in this thread."""
        jobs = [job, *self.take_more(job, queue)]
        began = time.monotonic()
        self.perform_batch(self.prepare_executions(jobs), queue)  # one job too
        self.set_state(WorkerStatus.IDLE)
        self.timed(jobs, time.monotonic() - began)

    def request_stop_soon(self) -> None:
        """Finish the job at hand, then leave work() (thread-safe)."""
        self.stopping = True
        self._stop_requested = True


WORKER_KINDS = {"fork": ConvqWorker, "thread": ConvqThreadWorker}


def build(kind: str, redis_client, settings, runtime) -> _ConvqMixin:
    """Create a configured worker of kind 'fork' or 'thread' on settings.queue."""
    from .contract.queue import make_queue

    cls = WORKER_KINDS[kind]
    worker = cls(
        [make_queue(redis_client, settings.queue, ConvqJob)],
        connection=redis_client,
        serializer=JSONSerializer,
        job_class=ConvqJob,
        worker_ttl=defaults.WORKER_TTL,
        job_monitoring_interval=settings.heartbeat,
        maintenance_interval=settings.maintenance_interval,
        default_result_ttl=settings.result_ttl,
        log_job_description=False,
    )
    worker.configure(settings, runtime)
    return worker
