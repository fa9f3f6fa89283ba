"""gunicorn settings of the API, read by `convq api`, the Dockerfile and compose alike.

    gunicorn -c python:service.gunicorn_conf service.wsgi:app

CONVQ_API_WORKERS processes (default 2) of gevent's worker: one process holds many
connections, so clients that send slowly (or never finish a request) cannot take every slot
while health checks and other clients wait, as they could with a fixed pool of threads.
CONVQ_API_TIMEOUT (default 180 s) stays above CONVQ_INFER_TIMEOUT so a waiting /infer answers
504 itself instead of being cut off. A CONVQ_API_KEYS that is not a valid key list stops the
server here, before any worker starts, with exit status 2.
"""

from __future__ import annotations

import os
import sys

from service.auth import KeyListError, parse_keys
from service.defaults import API_TIMEOUT, API_WORKERS
from service.servers import install_gunicorn_json_errors
from worker.contract import heap


def _positive(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        print(f"convq: {name}={raw!r} is not a positive integer", file=sys.stderr)
        sys.exit(2)
    return int(raw)


try:
    parse_keys(os.environ.get("CONVQ_API_KEYS", ""))
except KeyListError as exc:
    print(f"convq: {exc}", file=sys.stderr)
    sys.exit(2)

install_gunicorn_json_errors()  # gunicorn's own errors (bad request line, ...) in JSON too

bind = os.environ.get("CONVQ_BIND", "127.0.0.1:8000")
workers = _positive("CONVQ_API_WORKERS", API_WORKERS)
worker_class = "gevent"
worker_connections = 1000
timeout = _positive("CONVQ_API_TIMEOUT", API_TIMEOUT)
graceful_timeout = 30
accesslog = "-"


def post_fork(server, worker) -> None:
    """Each API process keeps freed request-sized blocks for the next request (contract.heap):
    a 1.2 MB body read 10.5 -> 4.7 ms on an AMD EPYC Zen 1, its copies no longer faulted in."""
    heap.keep_freed(heap.API_KEEP_BYTES)
