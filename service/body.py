"""Read request bodies within a byte limit (Content-Length or chunked) and parse strict JSON."""

from __future__ import annotations

import json
import zlib

from flask import request

from .errors import BadRequest, TooLarge, UnsupportedMediaType

_CHUNK = 1 << 20


def read_body(limit: int) -> bytes:
    """Return the request body, decompressed if Content-Encoding says so; 413 past limit bytes."""
    length = request.content_length
    if length is not None and length > limit:
        raise TooLarge(f"request body is {length} bytes; the limit is {limit}")
    request.max_content_length = limit  # werkzeug then bounds chunked bodies too (413)
    stream = request.stream
    parts, total = [], 0
    while True:
        try:
            part = stream.read(_CHUNK)
        except (OSError, ValueError) as e:  # a malformed chunk size, a connection cut short
            raise BadRequest(f"request body could not be read: {e}") from None
        if not part:
            break
        total += len(part)
        if total > limit:
            raise TooLarge(f"request body is over the limit of {limit} bytes")
        parts.append(part)
    data = b"".join(parts)
    return _decode(data, request.headers.get("Content-Encoding", "identity"), limit)


def _decode(data: bytes, encoding: str, limit: int) -> bytes:
    """Undo gzip/deflate content coding without letting the output pass limit bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return data
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported (use gzip, deflate or none)"
        )
    # 32 + 15: accept a zlib or gzip header, whichever the client sent.
    inflater = zlib.decompressobj(47)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as e:
        raise BadRequest(f"body is not valid {encoding} data: {e}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"decompressed body is over the limit of {limit} bytes")
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(data: bytes | str, what: str = "request body"):
    """Parse strict JSON (no NaN/Infinity); 400 with the reason when it is malformed or too deep."""
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise BadRequest(f"{what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"{what} is not valid JSON: {e}") from None


def blank(data: bytes) -> bool:
    """True when data holds only JSON whitespace (space, tab, CR, LF): an absent body."""
    return not data.strip(b" \t\r\n")


def json_object(data: bytes | str, what: str = "request body") -> dict:
    """Parse data as a JSON object; 400 if it is anything else."""
    value = parse_json(data, what)
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object, not {type(value).__name__}")
    return value
