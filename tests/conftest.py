"""Fixtures shared by every test layer."""

from __future__ import annotations

import os

import pytest

# Under pytest-xdist each worker process keeps its own Numba cache: two processes compiling
# the same kernel at once can number their cache entries alike, and one then loads the
# other's machine code (seen as garbage outputs and a segfault in a cold `make test-fast`).
# Set before anything imports numba, which reads it once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault(
        "NUMBA_CACHE_DIR",
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            "engine",
            "__pycache__",
            "xdist-" + os.environ["PYTEST_XDIST_WORKER"],
        ),
    )

from tests.redis_proc import RedisServer
from tests.reference_checks import (  # noqa: F401 - hooks: skipped cross-checks fail in CI
    pytest_collection_modifyitems,
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)


@pytest.fixture
def redis_server():
    """A fresh redis-server on a free loopback port, killed after the test."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_server_factory():
    """Start redis-servers with custom flags (aof=True, password=...); all are killed afterwards."""
    servers: list[RedisServer] = []

    def make(*extra: str, **kw) -> RedisServer:
        server = RedisServer(*extra, **kw).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()
