"""Read a file from disk with its size checked first, so a huge file is refused, not loaded."""

from __future__ import annotations

import os

from .errors import ModelError


def read_capped(path, limit: int, what: str, error: type[ModelError]) -> bytes:
    """Return the bytes of path; raise error (field=what) when it is too big or unreadable."""
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise error(f"{path}: {size} bytes is over the {limit}-byte {what} limit", field=what)
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise error(f"cannot read {what} {path}: {err.strerror or err}", field=what) from None
