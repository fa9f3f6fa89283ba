"""The webhook dispatcher: threads that POST the job callbacks that are due, signed.

Every worker process (and `convq up`) runs one beside its worker loop, on its own Redis client,
in a few threads, so a receiver that hangs holds up one of them. The worker itself only records
a due callback (worker/contract/webhooks.py): a slow or failing receiver never holds up a job.
Each attempt is claimed with a lease, so dispatchers in many processes share the work without
sending an attempt twice.

An attempt resolves the host again, checks every address against the callback policy
(worker/contract/callbacks.py) and connects to the address it checked, with the URL's host in
the Host header and, for https, in SNI and the certificate check: a name that resolves to an
internal address by now (DNS rebinding) is refused, not connected to. Redirects are never
followed: a 3xx answer is a failed attempt. Anything but a 2xx is tried again after a pause
that doubles from CONVQ_CALLBACK_BACKOFF up to CONVQ_CALLBACK_BACKOFF_MAX (each pause drawn
from its upper half, so dispatchers do not retry in step), until CONVQ_CALLBACK_ATTEMPTS.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable

import redis
import urllib3
import urllib3.connection

from .contract import callbacks, webhooks
from .contract.config import Settings

log = logging.getLogger("convq.webhooks")

BATCH = 50
"""Due callbacks a dispatcher looks at per round."""

LEASE_MARGIN = 30.0
"""Seconds a claim outlives the longest attempt (connect + answer timeouts)."""

ANSWER_BYTES = 1024
"""Bytes of a receiver's answer read (and kept in the error of a failed attempt, up to 200)."""

USER_AGENT = "convq-webhook/1"


class Dispatcher:
    """Sends due callbacks: run_once() does one round, serve() rounds until stopped."""

    def __init__(
        self,
        client,
        settings: Settings,
        *,
        resolver: callbacks.Resolver | None = None,
        jitter: Callable[[], float] = random.random,
    ):
        self.redis = client
        self.settings = settings
        self.allow = callbacks.Allow.parse(settings.callback_allow)
        self.resolver = resolver
        self.jitter = jitter
        self._server_secret: bytes | None = None

    @property
    def lease(self) -> float:
        return 2 * self.settings.callback_timeout + LEASE_MARGIN

    def pause(self, attempts: int) -> float:
        """Seconds before the attempt after attempts failed ones: doubling, capped, jittered."""
        s = self.settings
        ceiling = min(s.callback_backoff_max, s.callback_backoff * 2 ** (attempts - 1))
        return ceiling / 2 + self.jitter() * ceiling / 2

    def secret_for(self, owner: str | None) -> str:
        if self._server_secret is None:
            self._server_secret = webhooks.server_secret(self.redis, self.settings.webhook_secret)
        return webhooks.key_secret(self._server_secret, owner)

    def run_once(self) -> int:
        """Claim and send every callback due now (up to BATCH); return how many were tried."""
        tried = 0
        for job_id in webhooks.due(self.redis, time.time(), BATCH):
            token = uuid.uuid4().hex
            record = webhooks.claim(self.redis, job_id, token, lease=self.lease, now=time.time())
            if record is None:
                continue
            self._attempt(job_id, token, record)
            tried += 1
        return tried

    def _attempt(self, job_id: str, token: str, record: dict) -> None:
        attempts = record["attempts"] + 1
        code, error, final = self.post(job_id, record, attempts)
        delivered = code is not None and 200 <= code < 300
        next_at = None
        if not delivered and not final and attempts < self.settings.callback_attempts:
            next_at = time.time() + self.pause(attempts)
        state = webhooks.attempted(
            self.redis,
            job_id,
            token,
            attempts=attempts,
            delivered=delivered,
            code=code,
            error=error,
            next_at=next_at,
            now=time.time(),
        )
        if not delivered:
            log.warning(
                "job %s: callback attempt %d failed (%s); %s",
                job_id,
                attempts,
                error,
                "gave up" if state == "failed" else f"next in {next_at - time.time():.1f} s",
            )

    def post(self, job_id: str, record: dict, attempt: int) -> tuple[int | None, str | None, bool]:
        """POST record's body to its URL; return (status or None, error or None, give up now)."""
        try:
            target = callbacks.parse(record["url"])
            addresses = callbacks.addresses(target, self.allow, self.resolver)
        except callbacks.CallbackUnresolved as exc:
            return None, str(exc), False
        except callbacks.CallbackRefused as exc:
            return None, str(exc), True
        body = record["body"]
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Host": _host_header(target),
            "X-Convq-Job": job_id,
            "X-Convq-Attempt": str(attempt),
            webhooks.SIGNATURE_HEADER: webhooks.sign(
                self.secret_for(record["owner"]), body, int(time.time())
            ),
        }
        timeout = urllib3.Timeout(
            connect=self.settings.callback_timeout, read=self.settings.callback_timeout
        )
        limit = 2 * self.settings.callback_timeout
        with _Deadline(limit) as deadline:
            try:
                return self._send(target, addresses, body, headers, timeout)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                if deadline.expired:
                    return None, f"no answer within {limit:g} s", False
                return None, f"{type(exc).__name__}: {_reason(exc)}", False

    def _send(self, target, addresses, body: bytes, headers: dict, timeout):
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
                        return code, None, False
                    if 300 <= code < 400:
                        where = answer.headers.get("Location", "")[:200]
                        return (
                            code,
                            f"answered {code} to {where!r}; redirects are not followed",
                            False,
                        )
                    text = answer.read(ANSWER_BYTES, decode_content=False)
                finally:
                    answer.release_conn()
            except urllib3.exceptions.NewConnectionError as exc:
                error = f"cannot connect to {address}: {_reason(exc)}"
                continue  # the next address of the host, if any
            finally:
                pool.close()
            snippet = text[:200].decode("utf-8", "replace").strip()
            return code, f"answered {code}: {snippet}".rstrip(": "), False
        return None, error, False

    def serve(self, stop: threading.Event, poll: float) -> None:
        """Run rounds until stop is set; wait poll seconds whenever nothing was due."""
        pause = poll
        while not stop.is_set():
            try:
                tried = self.run_once()
                pause = poll
            except redis.RedisError as exc:
                log.warning("webhook dispatcher: Redis unavailable (%s)", exc)
                tried, pause = 0, min(max(pause * 2, 0.5), 30.0)
            except Exception:  # noqa: BLE001 - the thread must outlive any one bad record
                log.exception("webhook dispatcher round failed")
                tried, pause = 0, max(poll, 1.0)
            if not tried:
                stop.wait(pause)


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


def _host_header(target: callbacks.Target) -> str:
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


class Running:
    """A dispatcher's threads; stop() ends them after their current attempts."""

    def __init__(self, threads: list[threading.Thread], stopping: threading.Event):
        self.threads = threads
        self.stopping = stopping

    def stop(self, timeout: float | None = 30.0) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout)


def start(
    client, settings: Settings, *, poll: float | None = None, threads: int | None = None, **kw
) -> Running:
    """Start daemon threads dispatching callbacks over client (give it its own client).

    Each thread claims and sends on its own, so a receiver that hangs holds up one thread
    (for at most CONVQ_CALLBACK_TIMEOUT twice), not every other job's callback.
    """
    from .contract import defaults

    stopping = threading.Event()
    dispatcher = Dispatcher(client, settings, **kw)
    every = defaults.CALLBACK_POLL if poll is None else poll
    made = [
        threading.Thread(
            target=dispatcher.serve, args=(stopping, every), name=f"convq-webhooks-{i}", daemon=True
        )
        for i in range(defaults.CALLBACK_THREADS if threads is None else threads)
    ]
    for thread in made:
        thread.start()
    return Running(made, stopping)
