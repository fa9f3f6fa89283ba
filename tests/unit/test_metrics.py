"""/metrics: request counts by route and code, job state from RQ registries and worker telemetry."""

from __future__ import annotations

import math
from types import SimpleNamespace

import fakeredis
import pytest
import redis
from flask import Flask
from prometheus_client import values
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue, Worker
from rq.executions import Execution
from rq.serializers import JSONSerializer

from service import metrics
from tests.redis_proc import free_port
from worker.contract import telemetry


def make_app(conn) -> Flask:
    app = Flask(__name__)
    queue = Queue("convq", connection=conn, serializer=JSONSerializer)
    app.extensions["convq"] = SimpleNamespace(redis=conn, queue=queue)
    app.add_url_rule("/v2/jobs/<job_id>", "job", lambda job_id: ({"id": job_id}, 200))
    app.add_url_rule("/boom", "boom", lambda: ({"error": "bad"}, 400))
    metrics.init_app(app)
    return app


def scrape(app) -> dict[str, list]:
    """GET /metrics and return {sample name: [(labels, value), ...]}."""
    resp = app.test_client().get("/metrics")
    assert resp.status_code == 200
    assert resp.content_type.startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(resp.get_data(as_text=True)):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(samples, name, **labels) -> float:
    matches = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())
    ]
    assert len(matches) == 1, (name, labels, samples.get(name))
    return matches[0]


def dead_redis() -> redis.Redis:
    """A client for a port nobody listens on, failing at once instead of retrying with backoff."""
    return redis.Redis(port=free_port(), socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


@pytest.fixture
def conn():
    return fakeredis.FakeRedis()


def test_requests_counted_by_route_template_and_code(conn):
    app = make_app(conn)
    client = app.test_client()
    for job_id in ("a", "b", "c"):
        client.get(f"/v2/jobs/{job_id}")
    client.get("/boom")
    client.get("/nowhere")
    s = scrape(app)
    total = "convq_http_requests_total"
    assert value(s, total, route="/v2/jobs/<job_id>", method="GET", code="200") == 3
    assert value(s, total, route="/boom", code="400") == 1
    assert value(s, total, route="<unmatched>", code="404") == 1
    assert not any("/v2/jobs/a" in str(lab) for lab, _ in s[total])  # ids never become labels
    count = "convq_http_request_duration_seconds_count"
    assert value(s, count, route="/v2/jobs/<job_id>") == 3


def test_two_apps_in_one_process_keep_separate_counts(conn):
    a, b = make_app(conn), make_app(conn)
    a.test_client().get("/boom")
    assert value(scrape(a), "convq_http_requests_total", route="/boom") == 1
    assert "convq_http_requests_total" not in scrape(b) or not any(
        lab.get("route") == "/boom" for lab, _ in scrape(b)["convq_http_requests_total"]
    )


def test_jobs_by_state_queue_depth_and_workers(conn):
    app = make_app(conn)
    queue = app.extensions["convq"].queue
    jobs = [queue.enqueue("worker.jobs.nothing", i) for i in range(5)]
    for job in jobs[:3]:
        queue.remove(job)  # taken by a worker
    with conn.pipeline() as pipe:
        Execution.create(jobs[0], ttl=600, pipeline=pipe)
        pipe.execute()
    queue.failed_job_registry.add(jobs[1], ttl=600)
    queue.failed_job_registry.add(jobs[2], ttl=600)
    busy = Worker([queue], connection=conn, name="w-busy", serializer=JSONSerializer)
    busy.register_birth()
    busy.set_state("busy")
    idle = Worker([queue], connection=conn, name="w-idle", serializer=JSONSerializer)
    idle.register_birth()
    idle.set_state("idle")

    s = scrape(app)
    assert value(s, "convq_redis_up") == 1
    assert value(s, "convq_queue_depth") == 2
    assert value(s, "convq_jobs", state="queued") == 2
    assert value(s, "convq_jobs", state="started") == 1
    assert value(s, "convq_jobs", state="failed") == 2
    assert value(s, "convq_jobs", state="finished") == 0
    assert value(s, "convq_workers", state="busy") == 1
    assert value(s, "convq_workers", state="idle") == 1

    idle.register_death()
    assert value(scrape(app), "convq_workers", state="idle") == 0


def test_worker_telemetry_becomes_histograms(conn):
    telemetry.record_job(conn, "finished", 0.07, 0.3)
    telemetry.record_job(conn, "finished", 4.0, 0.01)  # 0.01 sits exactly on a bound: le="0.01"
    telemetry.record_job(conn, "failed", 1000.0, None)  # never computed: no compute sample
    telemetry.record_job(conn, "failed", -1.0, math.nan)  # clock skew / garbage: ignored
    s = scrape(make_app(conn))
    assert value(s, "convq_jobs_ended_total", state="finished") == 2
    assert value(s, "convq_jobs_ended_total", state="failed") == 2
    q = "convq_job_queue_seconds_bucket"
    assert value(s, q, le="0.05") == 0
    assert value(s, q, le="0.1") == 1
    assert value(s, q, le="5.0") == 2
    assert value(s, q, le="900.0") == 2
    assert value(s, q, le="+Inf") == 3
    assert value(s, "convq_job_queue_seconds_count") == 3
    assert value(s, "convq_job_queue_seconds_sum") == pytest.approx(1004.07)
    c = "convq_job_compute_seconds_bucket"
    assert value(s, c, le="0.01") == 1
    assert value(s, c, le="0.25") == 1
    assert value(s, c, le="0.5") == 2
    assert value(s, "convq_job_compute_seconds_count") == 2
    assert value(s, "convq_job_compute_seconds_sum") == pytest.approx(0.31)


def test_redis_down_still_answers_with_request_counts():
    dead = dead_redis()
    app = make_app(dead)
    app.test_client().get("/boom")
    s = scrape(app)
    assert value(s, "convq_redis_up") == 0
    assert value(s, "convq_http_requests_total", route="/boom") == 1
    assert "convq_jobs" not in s


def test_record_job_survives_redis_down():
    dead = dead_redis()
    telemetry.record_job(dead, "finished", 1.0, 1.0)  # must not raise: the job already ended


def test_multiprocess_mode_sums_counts_written_by_other_processes(conn, tmp_path, monkeypatch):
    # Stand in for two gunicorn workers: same shared directory, different process ids.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: 101))
    first = make_app(conn)
    first.test_client().get("/boom")
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: 202))
    second = make_app(conn)
    second.test_client().get("/boom")
    second.test_client().get("/boom")
    # one file per kind of metric and process id: what the scrape below has to sum
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_101.db",
        "counter_202.db",
        "histogram_101.db",
        "histogram_202.db",
    ]
    s = scrape(first)
    assert value(s, "convq_http_requests_total", route="/boom", code="400") == 3
    assert value(s, "convq_redis_up") == 1


def test_callback_attempts_by_outcome_and_deliveries_waiting(conn):
    from worker.contract import webhooks

    for job_id in ("a", "b", "c"):
        webhooks.record_due(conn, job_id, url="http://x/", owner=None, body=b"{}", keep=60, now=1)
    outcomes = {"a": [None, 200], "b": [None, None], "c": [200]}  # None: a failed attempt
    for job_id, answers in outcomes.items():
        for n, code in enumerate(answers, 1):
            assert webhooks.claim(conn, job_id, "t", lease=5, now=1e10) is not None
            final = job_id == "b" and n == 2
            webhooks.attempted(
                conn, job_id, "t", attempts=n, delivered=code is not None, code=code,
                error=None, next_at=None if code or final else 2, now=2,
            )  # fmt: skip
    s = scrape(make_app(conn))
    assert value(s, "convq_callback_attempts_total", outcome="delivered") == 2
    assert value(s, "convq_callback_attempts_total", outcome="retried") == 2
    assert value(s, "convq_callback_attempts_total", outcome="failed") == 1
    assert value(s, "convq_callbacks_waiting") == 0
    webhooks.record_due(conn, "d", url="http://x/", owner=None, body=b"{}", keep=60, now=1)
    assert value(scrape(make_app(conn)), "convq_callbacks_waiting") == 1
