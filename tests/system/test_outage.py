"""An outage is answered with 503 in seconds, whatever /metrics has read before it."""

from __future__ import annotations

import time

import pytest
from rq import Worker

from service.app import create_app
from worker.contract.connection import connect
from worker.contract.queue import make_queue

pytestmark = [pytest.mark.system]


def test_job_status_is_a_quick_503_with_redis_paused_after_a_metrics_scrape(redis_server):
    app = create_app({"TESTING": True, "REDIS_URL": redis_server.url, "SOCKET_TIMEOUT": 0.5})
    # A registered worker makes a scrape read worker records (rq's Worker.all); rq's Worker
    # raises the socket timeout of the pool it is given to its blocking-pop wait, so a scrape
    # on the API's shared pool would leave status reads waiting that long.
    other = connect(redis_server.url)
    Worker([make_queue(other)], connection=other, name="outage-probe").register_birth()
    client = app.test_client()
    scrape = client.get("/metrics")
    assert scrape.status_code == 200
    assert 'convq_workers{state="idle"} 1.0' in scrape.get_data(as_text=True)
    pool = app.extensions["convq"].redis.connection_pool
    assert pool.connection_kwargs["socket_timeout"] == 0.5

    job = "0" * 32
    assert client.get(f"/v2/jobs/{job}").status_code == 404  # Redis up: unknown job
    redis_server.pause()
    try:
        began = time.monotonic()
        answer = client.get(f"/v2/jobs/{job}")
        took = time.monotonic() - began
    finally:
        redis_server.resume()
    assert answer.status_code == 503, answer.get_data(as_text=True)
    assert "error" in answer.get_json()
    assert took < 5.0, f"the 503 took {took:.1f} s"
