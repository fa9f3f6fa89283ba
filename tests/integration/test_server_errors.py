"""Errors raised by the HTTP servers themselves are JSON like every other answer."""

from __future__ import annotations

import json
import socket
import threading

from werkzeug.serving import make_server

from service.servers import JsonErrorRequestHandler, install_gunicorn_json_errors
from tests.integration.apikit import Api


def _raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _split(reply: bytes) -> tuple[int, dict, bytes]:
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_werkzeug_refuses_too_many_headers_in_json():
    api = Api()
    server = make_server(
        "127.0.0.1", 0, api.app, threaded=True, request_handler=JsonErrorRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        many = b"".join(b"X-%d: 1\r\n" % i for i in range(120))  # the server's limit is 100
        reply = _raw(server.server_port, b"GET /health HTTP/1.1\r\n" + many + b"\r\n")
        status, headers, body = _split(reply)
        assert status == 431, reply[:300]
        assert headers["Content-Type"] == "application/json"
        assert isinstance(json.loads(body)["error"], str)
        # A malformed chunk size reaches the app: a 4xx JSON answer, not a 500.
        reply = _raw(
            server.server_port,
            b"POST /v2/models/tiny/jobs HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\nZZZ\r\n{}\r\n0\r\n\r\n",
        )
        status, headers, body = _split(reply)
        assert 400 <= status < 500, reply[:300]
        assert isinstance(json.loads(body)["error"], str)
    finally:
        server.shutdown()


def test_gunicorn_error_pages_are_json():
    from gunicorn import util

    before = util.write_error
    install_gunicorn_json_errors()
    a, b = socket.socketpair()
    try:
        util.write_error(a, 400, "Bad Request", "Invalid HTTP request line: 'x <y>'")
        a.close()
        status, headers, body = _split(b.recv(65536))
    finally:
        util.write_error = before
        b.close()
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "Invalid HTTP request line: 'x <y>'", "type": "BadRequest"}
