"""Model names per key: each key has its own namespace; the server's models are shared.

With auth on, the model a key calls "resnet" is stored as "<owner>/resnet" (owner: the key's
hash, see auth.owner_id), so two keys may use one name without meeting, and no answer tells a
key whether another key has a model of some name: there is nothing to squat and nothing to
probe. Models the server loads itself (owner None, e.g. "demo") keep their plain name and are
seen by every key; a key's own model of the same name shadows it for that key alone. With auth
off every caller is the same principal and names are plain. Public names never contain "/"
(upload.check_name), so a stored name says which namespace it is in.
"""

from __future__ import annotations

from .auth import current_owner


def stored_name(name: str, owner: str | None = None) -> str:
    """Return the store's name of the caller's (or owner's) model called name."""
    owner = current_owner() if owner is None else owner
    return name if owner is None else f"{owner}/{name}"


def public_name(stored: str) -> str:
    """Return the name a caller uses for a stored model."""
    return stored.rsplit("/", 1)[-1]


def resolve(store, name: str) -> tuple[str, dict] | None:
    """Return (stored name, model_info) of the model the caller means by name, or None.

    The caller's own model first, then the server's (or, from before namespaces, a model under
    its plain name that the caller owns); never another key's.
    """
    owner = current_owner()
    candidates = [stored_name(name, owner), name] if owner is not None else [name]
    for stored, info in zip(candidates, store.model_infos(candidates), strict=True):
        if info is not None and info.get("owner") in (None, owner):
            return stored, info
    return None
