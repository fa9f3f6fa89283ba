"""Job callbacks in Redis: the due deliveries, their claims and states, and how they are signed.

When a job that carries a callback ends, whoever ends it (a worker, the reaper, a cancel) calls
record_due(): one hash per job (convq:webhook:<id>: url, owner, the JSON body, state, attempts)
and an entry in the sorted set convq:webhooks:due scored by when the next attempt is due. That
is all it does, so ending a job never waits for the receiver. Dispatchers (worker/dispatcher.py)
claim due entries one at a time with a lease (SET NX with a TTL), so several dispatchers never
send the same attempt, and a dispatcher that dies mid-attempt only delays it by the lease.

Signing: each API key has its own secret, HMAC-SHA256(server secret, "convq-webhook:" + the
key's owner id), so a key's secret can be shown to that key (GET /v2/webhook-secret) without
revealing the server's or another key's. The server secret is CONVQ_WEBHOOK_SECRET; without it
one is generated once and kept in Redis (convq:webhook-secret), so auth-off deployments sign too.
A request carries X-Convq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from datetime import UTC, datetime

from redis.exceptions import WatchError

from . import keys

SIGNATURE_HEADER = "X-Convq-Signature"


def server_secret(redis, configured: str | None) -> bytes:
    """Return the server secret: configured, else the one kept in Redis (made on first use)."""
    if configured:
        return configured.encode()
    key = keys.webhook_secret()
    redis.set(key, secrets.token_hex(32), nx=True)
    value = redis.get(key)
    if not value:  # deleted between the two commands: try once more
        redis.set(key, secrets.token_hex(32), nx=True)
        value = redis.get(key)
    return value if isinstance(value, bytes) else str(value).encode()


def key_secret(server: bytes, owner: str | None) -> str:
    """Return the signing secret of owner's callbacks (owner None: auth off)."""
    digest = hmac.new(server, f"convq-webhook:{owner or '-'}".encode(), hashlib.sha256)
    return "whsec_" + digest.hexdigest()


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """Return the X-Convq-Signature value of body sent at timestamp (unix seconds)."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = 300.0) -> bool:
    """True if header signs body with secret and its timestamp is within tolerance s of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))


def payload(status: dict) -> bytes:
    """Return the JSON body sent for an ended job, from its status (queue.describe)."""
    timings = status.get("timings") or {}
    finished = status["status"] == "finished"
    return json.dumps(
        {
            "id": status["id"],
            "status": status["status"],
            "model": status.get("model"),
            "version": status.get("version"),
            "outputs": status.get("outputs") if finished else None,
            "error": status.get("error"),
            "timings": {
                k: timings.get(k)
                for k in (
                    "enqueued_at",
                    "started_at",
                    "ended_at",
                    "queue_seconds",
                    "compute_seconds",
                )
            },
        },
        separators=(",", ":"),
    ).encode()


def record_due(
    redis, job_id: str, *, url: str, owner: str | None, body: bytes, keep: int, now: float
) -> bool:
    """Record that job_id's callback is due now; False if one was recorded already.

    The first end recorded wins: a job canceled while its worker finishes it is reported once.
    """
    key = keys.webhook(job_id)
    record = {
        "body": body,
        "url": url,
        "owner": owner or "",
        "state": "pending",
        "attempts": 0,
        "next_at": repr(now),
    }
    with redis.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(key)
            if pipe.exists(key):
                return False
            pipe.multi()
            pipe.hset(key, mapping=record)
            pipe.expire(key, keep)
            pipe.zadd(keys.webhooks_due(), {job_id: now})
            pipe.execute()
        except WatchError:  # another end of the same job was recorded meanwhile
            return False
    return True


def due(redis, now: float, count: int) -> list[str]:
    """Return up to count job ids whose callback attempt is due at now, oldest first."""
    rows = redis.zrangebyscore(keys.webhooks_due(), "-inf", repr(now), start=0, num=count)
    return [r.decode() if isinstance(r, bytes) else str(r) for r in rows]


def _text(record: dict, name: str) -> str | None:
    value = record.get(name.encode(), record.get(name))
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def claim(redis, job_id: str, token: str, *, lease: float, now: float) -> dict | None:
    """Take job_id's due attempt for lease seconds; return its record, or None if not ours.

    Returns {"url", "owner", "body" (bytes), "attempts"}. The lease is taken first and the entry
    checked after, so a dispatcher that listed it before another one finished it backs off.
    """
    lease_key = keys.webhook_lease(job_id)
    if not redis.set(lease_key, token, nx=True, px=max(1, int(lease * 1000))):
        return None
    pipe = redis.pipeline(transaction=False)
    pipe.zscore(keys.webhooks_due(), job_id)
    pipe.hgetall(keys.webhook(job_id))
    score, record = pipe.execute()
    if score is None or float(score) > now or _text(record, "state") != "pending":
        if score is not None and not record:  # the record expired: nothing left to send
            redis.zrem(keys.webhooks_due(), job_id)
        release(redis, job_id, token)
        return None
    raw = record.get(b"body", record.get("body"))
    return {
        "url": _text(record, "url") or "",
        "owner": _text(record, "owner") or None,
        "body": raw if isinstance(raw, bytes) else str(raw).encode(),
        "attempts": int(_text(record, "attempts") or 0),
    }


def release(redis, job_id: str, token: str) -> None:
    """Drop the lease on job_id if it is still token's."""
    lease_key = keys.webhook_lease(job_id)
    held = redis.get(lease_key)
    if held is not None and (held.decode() if isinstance(held, bytes) else held) == token:
        redis.delete(lease_key)


def attempted(
    redis,
    job_id: str,
    token: str,
    *,
    attempts: int,
    delivered: bool,
    code: int | None,
    error: str | None,
    next_at: float | None,
    now: float,
) -> str:
    """Record one attempt's outcome and schedule the next (next_at) or none; return the state."""
    state = "delivered" if delivered else "pending" if next_at is not None else "failed"
    key = keys.webhook(job_id)
    fields: dict = {
        "state": state,
        "attempts": attempts,
        "last_at": repr(now),
        "last_status": "" if code is None else code,
        "last_error": error or "",
        "next_at": "" if next_at is None else repr(next_at),
    }
    if delivered:
        fields["delivered_at"] = repr(now)
    outcome = "retried" if state == "pending" else state
    pipe = redis.pipeline(transaction=True)
    if redis.exists(key):  # an expired record is not brought back as a stub
        pipe.hset(key, mapping=fields)
    pipe.hincrby(keys.telemetry_callbacks(), outcome, 1)
    if next_at is None:
        pipe.zrem(keys.webhooks_due(), job_id)
    else:
        pipe.zadd(keys.webhooks_due(), {job_id: next_at})
    pipe.execute()
    release(redis, job_id, token)
    return state


OUTCOMES = ("delivered", "retried", "failed")
"""What an attempt led to: a 2xx, another attempt later, or giving up (what /metrics counts)."""


def counts(redis) -> tuple[dict[str, int], int]:
    """Return ({outcome: attempts that had it}, deliveries waiting for an attempt)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.telemetry_callbacks())
    pipe.zcard(keys.webhooks_due())
    raw, waiting = pipe.execute()
    found = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
    return {outcome: found.get(outcome, 0) for outcome in OUTCOMES}, int(waiting)


def _when(value: str | None) -> str | None:
    if not value:
        return None
    return datetime.fromtimestamp(float(value), UTC).isoformat()


def delivery(redis, job_id: str) -> dict | None:
    """Return what GET /v2/jobs/<id> shows of job_id's callback delivery; None if none is due."""
    record = redis.hgetall(keys.webhook(job_id))
    if not record:
        return None
    code = _text(record, "last_status")
    state = _text(record, "state")
    return {
        "state": state,
        "attempts": int(_text(record, "attempts") or 0),
        "last_status": int(code) if code else None,
        "last_error": _text(record, "last_error") or None,
        "next_attempt_at": _when(_text(record, "next_at")) if state == "pending" else None,
        "delivered_at": _when(_text(record, "delivered_at")),
    }
