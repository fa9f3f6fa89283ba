"""Bearer-key auth: with API_KEYS set, every /v2 route but health needs one, and owns what it makes.

Redis never sees a key: a job's or model's owner is a short hash of the key that made it.
"""

from __future__ import annotations

import hashlib
import hmac
import re

from flask import Flask, current_app, g, request

from .errors import NotFound, Unauthorized

MIN_KEY_LENGTH = 16
"""Characters of the shortest bearer key accepted; a shorter secret is guessable."""

_KEY = re.compile(r"[A-Za-z0-9._~+/=-]+")


class KeyListError(ValueError):
    """CONVQ_API_KEYS is not a valid key list; the server must not start."""


def parse_keys(value: object) -> list[str]:
    """Return the keys of a CONVQ_API_KEYS value: empty (auth off) or comma-separated keys.

    Anything else stops the server rather than leaving it open: a JSON value such as false, 0
    or [] (which Flask's environment parsing would have turned into "no keys"), an empty item,
    a key shorter than MIN_KEY_LENGTH or one with characters outside [A-Za-z0-9._~+/=-].
    """
    if isinstance(value, (list, tuple)):
        items = [str(k) for k in value]
        if not items:
            raise KeyListError("CONVQ_API_KEYS is an empty list; leave it unset for no auth")
    elif isinstance(value, str):
        if not value.strip():
            return []
        items = [k.strip() for k in value.split(",")]
    else:
        raise KeyListError(
            f"CONVQ_API_KEYS={value!r} is not a key list; give comma-separated keys "
            "or leave it empty for no auth"
        )
    for i, key in enumerate(items):
        if not key:
            raise KeyListError(f"CONVQ_API_KEYS: item {i + 1} is empty (stray comma?)")
        if not _KEY.fullmatch(key):
            raise KeyListError(
                f"CONVQ_API_KEYS: key {i + 1} has characters outside [A-Za-z0-9._~+/=-]"
            )
        if len(key) < MIN_KEY_LENGTH:
            raise KeyListError(
                f"CONVQ_API_KEYS: key {i + 1} has {len(key)} characters; use at least "
                f"{MIN_KEY_LENGTH} (python -c 'import secrets; print(secrets.token_urlsafe())')"
            )
    return items


def api_keys() -> list[str]:
    """Return the configured keys, checked once at startup; empty: auth is off."""
    return current_app.extensions["convq.keys"]


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
    """Parse the configured keys (KeyListError if invalid); check the bearer key on requests."""
    app.extensions["convq.keys"] = parse_keys(app.config.get("API_KEYS", ""))
    app.before_request(_authenticate)
