"""One callback attempt over HTTP: POST to an address already checked, cut at a deadline.

The connection goes to the address the policy checked (never a fresh lookup of the name), with
the URL's host in Host and, for https, in SNI and the certificate check. Redirects are never
followed. urllib3's timeouts bound each connect and each read; the deadline bounds the whole
attempt, so a receiver trickling its answer cannot hold a dispatcher thread past its claim.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import urllib3
import urllib3.connection

from .contract import callbacks

ANSWER_BYTES = 1024
"""Bytes of a failed attempt's answer read (up to 200 are kept in its error)."""


def send(
    target: callbacks.Target, addresses: list[str], body: bytes, headers: dict, timeout: float
) -> tuple[int | None, str | None]:
    """POST body to target at the first of addresses that connects; return (status, error).

    timeout bounds the connect and each read; the whole attempt is cut at twice timeout.
    """
    per_step = urllib3.Timeout(connect=timeout, read=timeout)
    limit = 2 * timeout
    with _Deadline(limit) as deadline:
        try:
            return _send(target, addresses, body, headers, per_step)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline.expired:
                return None, f"no answer within {limit:g} s"
            return None, f"{type(exc).__name__}: {_reason(exc)}"


def _send(
    target: callbacks.Target, addresses: list[str], body: bytes, headers: dict, timeout
) -> tuple[int | None, str | None]:
    error = "no address to connect to"
    for address in addresses:
        pool = _pool(target, address, timeout)
        try:
            answer = pool.urlopen(
                "POST",
                target.path,
                body=body,
                headers=headers,
                redirect=False,
                retries=False,
                preload_content=False,
                assert_same_host=False,
            )
            try:
                code = answer.status
                if 200 <= code < 300:
                    return code, None
                if 300 <= code < 400:
                    where = answer.headers.get("Location", "")[:200]
                    return code, f"answered {code} to {where!r}; redirects are not followed"
                text = answer.read(ANSWER_BYTES, decode_content=False)
            finally:
                answer.release_conn()
        except urllib3.exceptions.NewConnectionError as exc:
            error = f"cannot connect to {address}: {_reason(exc)}"
            continue  # the next address of the host, if any
        finally:
            pool.close()
        snippet = text[:200].decode("utf-8", "replace").strip()
        return code, f"answered {code}: {snippet}".rstrip(": ")
    return None, error


_attempt_deadline = threading.local()


class _Deadline:
    """Cut every socket an attempt opens once it has run for seconds in all.

    urllib3's timeouts bound each connect and each read, not a whole request: a receiver that
    sends its answer a byte at a time could hold a thread (and outlive its claim) for hours.
    """

    def __init__(self, seconds: float):
        self.sockets: list[socket.socket] = []
        self.expired = False
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True

    def __enter__(self) -> _Deadline:
        _attempt_deadline.current = self
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        _attempt_deadline.current = None

    def _expire(self) -> None:
        self.expired = True
        for sock in list(self.sockets):
            _cut(sock)

    def watch(self, sock: socket.socket) -> None:
        self.sockets.append(sock)
        if self.expired:
            _cut(sock)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watched(sock: socket.socket) -> socket.socket:
    deadline = getattr(_attempt_deadline, "current", None)
    if deadline is not None:
        deadline.watch(sock)
    return sock


class _HTTPConnection(urllib3.connection.HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _watched(super()._new_conn())


class _HTTPSConnection(urllib3.connection.HTTPSConnection):
    def _new_conn(self) -> socket.socket:  # the TCP socket, before the TLS handshake
        return _watched(super()._new_conn())


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


def host_header(target: callbacks.Target) -> str:
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = callbacks.SCHEMES[target.scheme]
    return host if target.port == default else f"{host}:{target.port}"


def _pool(target: callbacks.Target, address: str, timeout) -> urllib3.HTTPConnectionPool:
    if target.scheme == "https":
        return _HTTPSPool(
            address,
            target.port,
            timeout=timeout,
            retries=False,
            server_hostname=target.host,
            assert_hostname=target.host,
        )
    return _HTTPPool(address, target.port, timeout=timeout, retries=False)


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)[:200]
