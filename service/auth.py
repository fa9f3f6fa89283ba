"""Bearer-key auth: with API_KEYS set, every /v2 route but health needs one, and owns what it makes.

Redis never sees a key: a job's or model's owner is a short hash of the key that made it.
"""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, current_app, g, request

from .errors import NotFound, Unauthorized


def api_keys() -> list[str]:
    """Return the configured keys (CONVQ_API_KEYS, comma-separated); empty: auth is off."""
    keys = current_app.config.get("API_KEYS") or ""
    if isinstance(keys, (list, tuple)):
        return [str(k) for k in keys if str(k)]
    return [k.strip() for k in str(keys).split(",") if k.strip()]


def owner_id(key: str) -> str:
    """Return the owner name stored for key (sha256 prefix: the key itself never reaches Redis)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def current_owner() -> str | None:
    """Return the caller's owner id, or None when auth is off."""
    return g.get("owner")


def check_visible(owner: str | None, what: str) -> None:
    """404 unless the caller owns the thing (things without an owner are visible to everyone)."""
    if owner is not None and owner != current_owner():
        raise NotFound(f"{what} not found")


def _authenticate() -> None:
    path = request.path
    if not path.startswith("/v2") or path.startswith("/v2/health"):
        return
    keys = api_keys()
    if not keys:
        g.owner = None
        return
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("send Authorization: Bearer <key>")
    # Compare against every key so the time taken does not tell which prefix matched.
    matched = [k for k in keys if hmac.compare_digest(k.encode(), given.encode())]
    if not matched:
        raise Unauthorized("unknown API key")
    g.owner = owner_id(matched[0])


def init_app(app: Flask) -> None:
    """Check the bearer key before every request."""
    app.before_request(_authenticate)
