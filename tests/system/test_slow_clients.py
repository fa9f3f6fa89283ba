"""Slow clients (slowloris) do not starve the API: health answers while 64 of them hang on."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from tests.system.procs import start_api, start_worker

pytestmark = [pytest.mark.system, pytest.mark.slow]

SLOW_CLIENTS = 64


def _slow_client(base: str, i: int) -> socket.socket:
    """Open a connection and send the start of a request that it never finishes."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    if i % 2:  # half stall inside the headers, half inside a declared body
        sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    else:
        sock.sendall(
            b"POST /v2/repository/index HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"
        )
    return sock


def test_health_answers_while_64_slow_clients_are_connected(redis_server_factory, tmp_path):
    server = redis_server_factory()
    api, base = start_api(server.url, tmp_path, env={"CONVQ_API_WORKERS": "1"})
    worker = start_worker(server.url, tmp_path, name="w0")
    clients: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 60
        while requests.get(base + "/v2/health/ready", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "no worker became ready"
            time.sleep(0.2)
        clients = [_slow_client(base, i) for i in range(SLOW_CLIENTS)]
        answered = []
        for _ in range(5):
            for sock in clients:  # keep every slow client alive with one more byte
                sock.sendall(b"a")
            began = time.monotonic()
            rv = requests.get(base + "/v2/health/ready", timeout=5)
            answered.append((rv.status_code, time.monotonic() - began))
            rv = requests.post(base + "/v2/repository/index", json={}, timeout=5)
            assert rv.status_code == 200
            time.sleep(0.5)
        assert [code for code, _ in answered] == [200] * 5, answered
        assert max(took for _, took in answered) < 2.0, answered
    finally:
        for sock in clients:
            sock.close()
        worker.close()
        api.close()
