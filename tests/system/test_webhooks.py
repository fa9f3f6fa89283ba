"""Job callbacks with real processes: two forking workers, each with its dispatcher thread."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
import requests

from tests.integration.receiver import Receiver
from tests.models import TINY_SPEC, tiny_arrays
from tests.system.procs import start_api, start_worker
from worker.contract import webhooks

pytestmark = [pytest.mark.system, pytest.mark.slow]

ENV = {
    "CONVQ_CALLBACK_ALLOW": "127.0.0.1/32",
    "CONVQ_CALLBACK_BACKOFF": "0.2",
    "CONVQ_WEBHOOK_SECRET": "system-test-secret-0123456789",
}


def test_two_worker_processes_deliver_each_callback_once_retrying_a_500(
    redis_server_factory, tmp_path
):
    server = redis_server_factory()
    hook = Receiver(answers=(500, 200))
    procs = []
    try:
        api, base = start_api(server.url, tmp_path, env={**ENV, "CONVQ_API_WORKERS": "1"})
        procs.append(api)
        procs += [start_worker(server.url, tmp_path, name=f"w{i}", env=ENV) for i in range(2)]
        buf = io.BytesIO()
        np.savez(buf, **tiny_arrays(0))
        load = {
            "parameters": {
                "config": json.dumps(TINY_SPEC),
                "file:weights.npz": base64.b64encode(buf.getvalue()).decode(),
            }
        }
        rv = requests.post(f"{base}/v2/repository/models/tiny/load", json=load, timeout=60)
        assert rv.status_code == 200, rv.text
        image = np.random.default_rng(0).integers(0, 256, (1, 9, 9, 3)).ravel().tolist()
        body = {
            "inputs": [
                {"name": "input", "datatype": "UINT8", "shape": [1, 9, 9, 3], "data": image}
            ],
            "parameters": {"callback": hook.url},
        }
        ids = []
        for _ in range(6):
            rv = requests.post(f"{base}/v2/models/tiny/jobs", json=body, timeout=30)
            assert rv.status_code == 202, rv.text
            ids.append(rv.json()["id"])
        hook.wait_calls(7, timeout=60)
        time.sleep(1.0)  # time for a duplicate to show up, if any were sent
        sent = sorted(json.loads(c.body)["id"] for c in hook.calls)
        first = json.loads(hook.calls[0].body)["id"]
        assert sent == sorted([*ids, first])  # each once, the first twice (500, then 200)
        secret = requests.get(f"{base}/v2/webhook-secret", timeout=10).json()["secret"]
        for call in hook.calls:
            assert webhooks.verify(secret, call.body, call.headers[webhooks.SIGNATURE_HEADER])
        for job_id in ids:
            status = requests.get(f"{base}/v2/jobs/{job_id}", timeout=10).json()
            assert status["status"] == "finished"
            assert status["callback"]["state"] == "delivered", status
            assert status["callback"]["attempts"] == (2 if job_id == first else 1)
    finally:
        hook.close()
        for proc in procs:
            proc.close()
