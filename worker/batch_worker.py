"""The rq bookkeeping of a batch: take it, start every job, end each with its own outcome.

Each job of a batch is an ordinary rq job throughout: its own Execution in the
StartedJobRegistry (heartbeated by the worker, re-queued by the sweep if the worker dies), its
own status, result, TTLs, retries. What a batch changes is how many round trips that costs:
rq's prepare_execution, prepare_job_execution and handle_job_success take several each per job,
which on one-image jobs cost more than the engine; here the same commands for every job go in
one pipeline. Failures (rare) take rq's own per-job path (retries, cancel, telemetry).
"""

from __future__ import annotations

import logging
import sys

import redis
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import BaseWorker
from rq.worker.base import WorkerStatus

from .batch_run import Outcome, run_batch
from .batch_take import take_batch
from .contract import telemetry
from .contract.config import Settings
from .contract.queue import announce_end
from .jobclass import report_end
from .jobs import JOB_FUNCTIONS

log = logging.getLogger("convq.worker")


TIMEOUT_SHARE = 0.5
"""Share of the jobs' timeout a batch's expected compute may take (they share one deadline)."""


def run_alone(jobs: list) -> dict[str, Outcome]:
    """Run one job by its own function (worker.jobs, explain jobs included) as rq's
    Job.perform does; what it raises is its outcome, judged by ConvqJob.take_outcome."""
    (job,) = jobs
    try:
        return {job.id: Outcome(value=Job.perform(job))}
    except Exception as exc:  # noqa: BLE001 - the job's own failure; rq's timeout passes
        return {job.id: Outcome(error=exc)}


class BatchMixin(BaseWorker):
    """rq.Worker methods for batches; the worker's settings come from configure()."""

    _seconds_per_image: dict | None = None  # batch key -> last seconds per image this worker saw
    settings: Settings  # set by the worker's configure()

    def take_more(self, job, queue) -> list:
        """Take queued jobs to run in one engine batch with job (none when batching is off).

        The batch shares its jobs' deadline, so it holds no more images than this worker ran
        in TIMEOUT_SHARE of that timeout last time (timed per batch key): a job that would
        finish alone does not time out for being batched.
        """
        try:
            return take_batch(
                queue,
                job,
                max_images=self._image_budget(job),
                wait_ms=self.settings.batch_wait_ms,
                job_class=self.job_class,
            )
        except redis.RedisError as exc:  # what it moved is swept back like any unstarted job
            log.warning("job %s runs alone: could not take a batch (%s)", job.id, exc)
            return []

    def _image_budget(self, job) -> int:
        most = self.settings.batch_max_images
        per_image = (self._seconds_per_image or {}).get((job.meta or {}).get("batch_key"))
        if not per_image or not job.timeout or job.timeout <= 0:
            return most
        return min(most, max(1, int(TIMEOUT_SHARE * job.timeout / per_image)))

    def timed(self, jobs: list, seconds: float) -> None:
        """Record how long jobs (one batch, or a job alone) took, per image, for _image_budget."""
        key = (jobs[0].meta or {}).get("batch_key")
        if not isinstance(key, str):
            return
        images = sum(max(1, int((j.meta or {}).get("images") or 1)) for j in jobs)
        if self._seconds_per_image is None or len(self._seconds_per_image) > 1000:
            self._seconds_per_image = {}
        self._seconds_per_image[key] = seconds / images

    def prepare_executions(self, jobs: list) -> list:
        """rq's prepare_execution for every job, in one round trip; return [(job, execution)]."""
        if len(jobs) == 1:
            return [(jobs[0], self.prepare_execution(jobs[0]))]
        members = []
        with self.connection.pipeline() as pipe:
            for job in jobs:
                execution = Execution.create(
                    job, self.get_heartbeat_ttl(job), pipeline=pipe, worker_name=self.name
                )
                self.executions[execution.id] = execution
                members.append((job, execution))
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            pipe.execute()
        return members

    def perform_batch(self, members: list, queue) -> None:
        """Run members [(job, execution)] as one engine batch; end each job with its outcome.

        Every job is started first (as rq's prepare_job_execution: STARTED, out of the
        intermediate list), then the batch runs once (worker.batch_run; a job alone runs its
        own function, run_alone), then each job ends: the finished ones together, a failed one
        through rq's failure path (retries, cancel). A job alone takes this path too: rq's
        perform_job ends a job in five round trips (heartbeat, watch, dependents, the
        transaction, the end signal), this one in one, so its waiter hears of it sooner.
        """
        jobs = [job for job, _execution in members]
        timeout = jobs[0].timeout or self.queue_class.DEFAULT_TIMEOUT
        run = run_alone if len(jobs) == 1 else run_batch
        try:
            self._start_all(members, queue)
            with self.death_penalty_class(timeout, JobTimeoutException, job_id=jobs[0].id):
                outcomes = run(jobs)
        except BaseException as exc:  # noqa: BLE001 - rq's timeout, Redis gone: it ends them all
            outcomes = {job.id: Outcome(error=exc) for job in jobs}
        finished = []
        for job, execution in members:
            try:
                value = job.take_outcome(outcomes[job.id])
            except BaseException:  # noqa: BLE001 - as rq's perform_job: the job failed
                self._finalize_failure(job, queue, execution, sys.exc_info())
            else:
                finished.append((job, execution, value))
        if not finished:
            return
        try:
            self._finish_all(finished)
        except BaseException:  # noqa: BLE001 - as rq's perform_job: not saved as finished, failed
            exc_info = sys.exc_info()
            for job, execution, _value in finished:
                self._finalize_failure(job, queue, execution, exc_info)

    def _start_all(self, members: list, queue) -> None:
        """rq's prepare_job_execution for every member, in one round trip."""
        with self.connection.pipeline() as pipe:
            ttl = max(self.get_heartbeat_ttl(job) for job, _execution in members)
            self.heartbeat(ttl, pipeline=pipe)
            for job, _execution in members:
                job.heartbeat(now(), ttl, pipeline=pipe)
                job.prepare_for_execution(self.name, pipeline=pipe)
                pipe.persist(job.key)
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            pipe.execute()
        for job, _execution in members:
            job.started_at = now()

    def _finish_all(self, finished: list) -> None:
        """rq's handle_job_success for each (job, execution, value), in one round trip.

        convq's jobs have no dependents, repeats, callbacks or rate limits (submit() sets
        none), so what is left of rq's success path is the status, the Result record, the
        finished registry, the job's expiry, the execution's cleanup and the worker's counters;
        with them each job's end signal (announce_end) and telemetry.
        """
        with self.connection.pipeline() as pipe:
            for job, execution, value in finished:
                job.ended_at = now()
                job._result = value
                job._status = JobStatus.FINISHED
                self.increment_successful_job_count(pipeline=pipe)
                self.increment_total_working_time(job.ended_at - job.started_at, pipe)
                result_ttl = job.get_result_ttl(self.default_result_ttl)
                job._handle_success(
                    result_ttl,
                    pipeline=pipe,
                    worker_name=self.name,
                    execution_id=execution.id,
                    execution_started_at=execution.created_at,
                    execution_ended_at=job.ended_at,
                )
                job.cleanup(result_ttl, pipeline=pipe, remove_from_queue=False)
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                announce_end(pipe, job.id)
                telemetry.observe_job(pipe, "finished", *job.timings())
            pipe.execute()
        for job, _execution, _value in finished:
            report_end(job, "finished")  # its callback, if it has one
            self._log_job(job, "finished", "")

    def _log_job(self, job, state: str, exc_string: str) -> None:
        took = (
            (job.ended_at - job.started_at).total_seconds()
            if job.ended_at and job.started_at
            else 0.0
        )
        error = job.meta.get("error") or (exc_string.strip().splitlines() or [""])[-1]
        kwargs = job.kwargs if job.func_name in JOB_FUNCTIONS else {}
        log.info(
            "job %s %s v%s %s in %.2f s%s",
            job.id,
            kwargs.get("model"),
            kwargs.get("version"),
            state,
            took,
            f": {error}" if state != "finished" else "",
        )
