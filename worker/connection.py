"""Redis clients with short timeouts, so an outage is noticed in seconds, not minutes."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from rq.connections import get_connection_kwargs

from . import defaults


def connect(url: str | None, *, socket_timeout: float = defaults.SOCKET_TIMEOUT) -> redis.Redis:
    """Return a client for url (default localhost:6379); bytes in and out, as rq needs."""
    return redis.Redis.from_url(
        url or "redis://localhost:6379/0",
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, defaults.SOCKET_TIMEOUT),
        health_check_interval=30,
        # One quick retry hides a dropped idle connection; a real outage still fails fast.
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
        decode_responses=False,
    )


def own_client(client: redis.Redis) -> redis.Redis:
    """Return a client on the same server with its own pool.

    rq raises its worker's socket timeout above the blocking-pop time; a worker sharing the
    API's client would slow the API's outage answers to match.
    """
    pool = client.connection_pool
    fresh = type(pool)(connection_class=pool.connection_class, **get_connection_kwargs(client))
    return type(client)(connection_pool=fresh)
