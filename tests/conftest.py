"""Fixtures shared by every test layer."""

from __future__ import annotations

import pytest

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
