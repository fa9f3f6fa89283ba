"""Redis clients with short timeouts, so an outage is noticed in seconds, not minutes."""

from __future__ import annotations

import weakref

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


_BULK_READ_BYTES = 1 << 20
_bulk: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # pool -> its bulk client


def bulk_client(client: redis.Redis) -> redis.Redis:
    """Return a client on the same server that reads 1 MiB per recv (for big values).

    redis-py's default 64 KiB reads make a 37 MB value cost ~90 ms to read; 1 MiB reads with
    2 MiB GETRANGE slices take ~15 ms. Test doubles (fakeredis) are returned as they are.
    """
    pool = client.connection_pool
    if not pool.connection_class.__module__.startswith("redis."):
        return client
    cached = _bulk.get(pool)
    if cached is not None:
        return cached
    kwargs = {**get_connection_kwargs(client), "socket_read_size": _BULK_READ_BYTES}
    fresh = type(client)(
        connection_pool=type(pool)(connection_class=pool.connection_class, **kwargs)
    )
    _bulk[pool] = fresh
    return fresh
