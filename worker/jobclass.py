"""ConvqJob: an rq Job that runs only convq's own job functions and fails bad jobs for good."""

from __future__ import annotations

import logging

import redis
from rq.job import Job
from rq.timeouts import JobTimeoutException

from .contract import telemetry
from .contract.queue import announce_end, job_ended
from .jobs import JOB_FUNCTIONS, JobSuperseded

log = logging.getLogger("convq.worker")


class UnsafeJob(Exception):
    """A job record names a function outside worker.jobs."""


def one_line(exc: BaseException) -> str:
    """Return 'Type: message' for a job's error field."""
    text = str(exc).strip() or "no message"
    return f"{type(exc).__name__}: {text}"


class ConvqJob(Job):
    """A job that refuses any function but worker.jobs.JOB_FUNCTIONS and never retries bad input.

    Retries (rq Retry) are for a worker that died under the job; an exception raised by the job
    itself means the job cannot succeed, so retries_left drops to 0 and it fails at once.
    """

    superseded = False  # set when a newer attempt of this job took over from this run

    @property
    def func(self):
        name = self.func_name
        if self.instance is not None or name not in JOB_FUNCTIONS:
            raise UnsafeJob(
                f"refusing to run {name!r}: convq workers only run "
                f"{', '.join(sorted(JOB_FUNCTIONS))}"
            )
        return JOB_FUNCTIONS[name]

    def perform(self):
        return self._performed(super().perform)

    def take_outcome(self, outcome) -> dict | None:
        """Return or raise this job's outcome of a batch (worker.batch_run) as perform() would."""
        return self._performed(outcome.get)

    def _performed(self, run):
        try:
            return run()
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # Redis went away mid-job: a retry may well succeed
        except JobSuperseded:
            self.superseded = True  # the worker leaves the job's state to the newer attempt
            raise
        except BaseException as exc:
            self.retries_left = 0
            if isinstance(exc, JobTimeoutException):  # rq's SIGALRM, between two Python lines
                self.meta["error"] = (
                    f"JobTimeout: job timed out: ran past its {self.timeout} s timeout"
                )
            else:
                self.meta["error"] = one_line(exc)
            try:
                self.save_meta()
            except redis.RedisError:
                pass
            raise

    def timings(self) -> tuple[float | None, float | None]:
        """Return (seconds queued, seconds computing) of a job that ended (None if unknown)."""
        queue_s = compute_s = None
        if self.enqueued_at and self.started_at:
            queue_s = max(0.0, (self.started_at - self.enqueued_at).total_seconds())
        if self.started_at and self.ended_at:
            compute_s = max(0.0, (self.ended_at - self.started_at).total_seconds())
        return queue_s, compute_s

    def ended(self, state: str) -> None:
        """Announce a job that ended in state ('finished'/'failed'), count it in telemetry and
        record its callback as due."""
        report_end(self, state)
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                announce_end(pipe, self.id)
                telemetry.observe_job(pipe, state, *self.timings())
                pipe.execute()
        except Exception:  # noqa: BLE001 - metrics must never fail a job; a waiter looks again
            log.exception("job %s: its end was not announced nor counted", self.id)


def report_end(job: Job, state: str) -> None:
    """Record job's callback as due, if it has one; a Redis error is logged, never raised."""
    try:
        job_ended(job, state)
    except Exception:  # noqa: BLE001 - a lost callback must not fail or re-run the job
        log.exception("job %s: its callback could not be recorded", job.id)
