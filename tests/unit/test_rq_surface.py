"""The parts of rq the worker overrides or reaches into, checked against the installed rq.

convq's worker subclasses rq's Worker and Job and reads a few private attributes; pyproject.toml
pins rq to the range this was written and tested against. Before widening that range, run this
file against the new rq: a method renamed, a parameter moved or an attribute gone fails here,
by name, rather than as a stuck or silently misbehaving worker.
"""

from __future__ import annotations

import inspect

import fakeredis
import pytest
import rq
from rq.intermediate_queue import IntermediateQueue
from rq.job import Job
from rq.worker import SimpleWorker, Worker

from worker.contract.queue import make_queue

TESTED = ((3, 0), (3, 1))
"""rq versions [low, high) this worker was tested with; pyproject.toml pins the same range."""

# Public Worker methods worker/workers.py and worker/horse.py override, with their parameters.
# rq documents subclassing Worker (`--worker-class`) but no narrower hook for what these do
# (docs/architecture.md "rq at the edge" says why each is overridden).
WORKER_OVERRIDES = {
    "dequeue_job_and_maintain_ttl": ["self", "timeout", "max_idle_time"],
    "heartbeat": ["self", "timeout", "pipeline"],
    "clean_registries": ["self"],
    "handle_job_failure": [
        "self",
        "job",
        "queue",
        "started_job_registry",
        "exc_string",
        "execution",
    ],
    "handle_job_success": ["self", "job", "queue", "started_job_registry", "execution"],
    "get_heartbeat_ttl": ["self", "job", "working_time"],
    "setup_work_horse_signals": ["self"],
    "maintain_heartbeats": ["self", "job", "execution"],
    "monitor_work_horse": ["self", "job", "queue", "execution"],
    "execute_job": ["self", "job", "queue"],
    "wait_for_horse": ["self"],
    "teardown": ["self"],
    "request_stop": ["self", "signum", "frame"],
    "register_birth": ["self"],
}
# Public Worker methods the worker calls, with their parameters.
WORKER_CALLS = {
    "work": [
        "self",
        "burst",
        "logging_level",
        "date_format",
        "log_format",
        "max_jobs",
        "max_idle_time",
        "with_scheduler",
        "dequeue_strategy",
    ],
    "cleanup_execution": ["self", "job", "pipeline", "execution"],
    # Batches (worker.batch_worker.perform_batch): start each job, then end each with its outcome.
    "prepare_job_execution": ["self", "job", "remove_from_intermediate_queue"],
    "procline": ["self", "message"],
    "prepare_execution": ["self", "job"],
    "set_state": ["self", "state", "pipeline"],
    "perform_job": ["self", "job", "queue", "execution"],
    "kill_horse": ["self", "sig"],
    "handle_work_horse_killed": ["self", "job", "retpid", "ret_val", "rusage"],
    # Batches (worker.batch_worker): rq's start and success steps for every job in one pipeline.
    "increment_successful_job_count": ["self", "pipeline"],
    "increment_total_working_time": ["self", "job_execution_time", "pipeline"],
}
# Private Worker methods the worker overrides or calls: rq offers no public way to do the same.
WORKER_PRIVATE_METHODS = {
    "_handle_stopped_job": ["self", "job", "queue", "execution"],
    "_install_signal_handlers": ["self"],
    # Batches: a failed job of a batch ends through rq's own failure path (retries, cancel).
    "_finalize_failure": ["self", "job", "queue", "execution", "exc_info"],
}
WORKER_METHODS = WORKER_OVERRIDES | WORKER_CALLS | WORKER_PRIVATE_METHODS
# Read-only properties the worker relies on, each backed by a private attribute it writes.
WORKER_PROPERTIES = ["dequeue_timeout", "horse_pid", "is_horse"]
# Attributes a worker instance must have after rq's __init__ (the private ones are read/written).
WORKER_ATTRIBUTES = [
    "_stop_requested",
    "_stopped_job_id",
    "_horse_pid",
    "_is_horse",
    "executions",
    "death_penalty_class",
    "job_monitoring_interval",
    "maintenance_interval",
    "max_connection_wait_time",
    "last_cleaned_at",
]
JOB_METHODS = {
    "perform": ["self"],
    "delete": ["self", "pipeline", "remove_from_queue", "delete_dependents"],
    "retry": ["self", "queue", "pipeline"],
    "get_meta": ["self", "refresh"],
    "save_meta": ["self"],
    "latest_result": ["self", "timeout"],
    "fetch": ["id", "connection", "serializer"],
    "fetch_many": ["job_ids", "connection", "serializer"],
    "key_for": ["job_id"],
    "_handle_success": [
        "self",
        "result_ttl",
        "pipeline",
        "worker_name",
        "execution_id",
        "execution_started_at",
        "execution_ended_at",
    ],
    "cleanup": ["self", "ttl", "pipeline", "remove_from_queue"],
    "heartbeat": ["self", "timestamp", "ttl", "pipeline", "xx"],
    "prepare_for_execution": ["self", "worker_name", "pipeline"],
    "get_result_ttl": ["self", "default_ttl"],
    "get_status": ["self", "refresh"],
}
INTERMEDIATE_METHODS = {
    "set_first_seen": ["self", "job_id"],
    "get_first_seen": ["self", "job_id"],
    "remove": ["self", "job_id"],
    "get_job_ids": ["self"],
}


def _params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_installed_rq_is_in_the_tested_range():
    version = tuple(int(p) for p in rq.__version__.split(".")[:2])
    low, high = TESTED
    assert low <= version < high, (
        f"rq {rq.__version__} is outside the tested range; run tests/unit/test_rq_surface.py "
        "and the worker tests against it before widening the pin in pyproject.toml"
    )


def test_pyproject_pins_the_tested_range():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"rq>=3.0,<3.1"' in text


@pytest.mark.parametrize(
    "owner, name, params",
    [(Worker, n, p) for n, p in WORKER_METHODS.items()]
    + [(Job, n, p) for n, p in JOB_METHODS.items()]
    + [(IntermediateQueue, n, p) for n, p in INTERMEDIATE_METHODS.items()],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)
def test_method_the_worker_relies_on_keeps_its_signature(owner, name, params):
    method = getattr(owner, name, None)
    assert callable(method), f"rq's {owner.__name__}.{name} is gone"
    assert _params(method) == params, f"rq's {owner.__name__}.{name} changed its parameters"


def test_job_func_and_should_retry_are_still_properties():
    assert isinstance(inspect.getattr_static(Job, "func"), property)
    assert isinstance(inspect.getattr_static(Job, "should_retry"), property)


@pytest.mark.parametrize("name", WORKER_PROPERTIES)
def test_worker_property_the_worker_relies_on_is_still_one(name):
    assert isinstance(inspect.getattr_static(Worker, name), property)


def test_horse_pid_and_is_horse_read_the_private_attributes_the_horse_writes():
    conn = fakeredis.FakeStrictRedis()
    worker = Worker([make_queue(conn)], connection=conn)
    worker._horse_pid, worker._is_horse = 4321, True
    assert (worker.horse_pid, worker.is_horse) == (4321, True)


def test_stop_requested_ends_the_work_loop_before_it_takes_a_job():
    from worker.contract.config import Settings
    from worker.runtime import Runtime
    from worker.workers import build

    conn = fakeredis.FakeStrictRedis()
    queue = make_queue(conn)
    queue.enqueue("worker.jobs.run_model", job_id="waiting")
    worker = build("thread", conn, Settings(), Runtime(Settings()))
    worker.request_stop_soon()
    assert worker.work(burst=True, logging_level="WARNING") is False
    assert queue.job_ids == ["waiting"]


@pytest.mark.parametrize("cls", [Worker, SimpleWorker])
def test_worker_instance_has_the_attributes_the_worker_uses(cls):
    conn = fakeredis.FakeStrictRedis()
    worker = cls([make_queue(conn)], connection=conn)
    missing = [a for a in WORKER_ATTRIBUTES if not hasattr(worker, a)]
    assert missing == []


def test_execution_create_keeps_its_signature():
    # worker.batch_worker.prepare_executions: rq's prepare_execution, one pipeline per batch.
    from rq.executions import Execution

    assert _params(Execution.create) == ["job", "ttl", "pipeline", "worker_name"]


def test_queue_names_the_intermediate_list_the_batch_take_moves_jobs_to():
    # worker.batch_take moves taken ids where rq's BLMOVE puts the job it pops.
    conn = fakeredis.FakeStrictRedis()
    queue = make_queue(conn)
    assert queue.intermediate_queue_key == IntermediateQueue.get_intermediate_queue_key(queue.key)
    assert queue.intermediate_queue.key == queue.intermediate_queue_key


def test_helpers_the_reaper_and_connection_import_keep_their_signatures():
    from rq.connections import get_connection_kwargs
    from rq.job_lifecycle import record_job_failure
    from rq.utils import parse_composite_key

    assert _params(record_job_failure) == ["job", "exc_string", "pipeline"]
    assert _params(parse_composite_key) == ["composite_key"]
    assert _params(get_connection_kwargs) == ["connection"]
    assert parse_composite_key("abc:def") == ("abc", "def")


def test_a_job_hash_keeps_its_status_and_serialized_meta_where_the_listing_reads_them():
    # worker.contract.queue._listed reads these two fields of the job's hash directly (HMGET),
    # not the whole record through Job.fetch_many.
    from rq.job import JobStatus
    from rq.serializers import JSONSerializer

    conn = fakeredis.FakeStrictRedis()
    queue = make_queue(conn)
    job = queue.enqueue_call("worker.jobs.run_model", kwargs={}, meta={"model": "m", "n": 1})
    status, meta = conn.hmget(Job.key_for(job.id), "status", "meta")
    assert JobStatus(status.decode()) == JobStatus.QUEUED
    assert JSONSerializer.loads(meta) == {"model": "m", "n": 1}
    job.set_status(JobStatus.FINISHED)
    assert conn.hget(Job.key_for(job.id), "status") == b"finished"
