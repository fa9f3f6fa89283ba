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

import logging
import os
import random
import threading
import time
import uuid
from collections.abc import Callable

import redis

from . import delivery
from .contract import callbacks, webhooks
from .contract.config import Settings

log = logging.getLogger("convq.webhooks")

BATCH = 50
"""Due callbacks a dispatcher looks at per round."""

LEASE_MARGIN = 120.0
"""Seconds a claim outlives the longest HTTP exchange (twice CONVQ_CALLBACK_TIMEOUT): room for
the host name lookup before it (a resolver retrying dead servers takes up to ~30 s, and a
thread may wait for another's lookup first). A dispatcher that dies mid-attempt delays that
callback by the lease."""

USER_AGENT = "convq-webhook/1"

SECRET_TTL = 60.0
"""Seconds a dispatcher keeps the server secret before reading it from Redis again."""


class _ForkGate:
    """Lets many threads resolve host names at once, and a fork wait until none is.

    A worker forks its work-horse while dispatcher threads run, and glibc's getaddrinfo holds
    locks a forked child would find taken (the horse resolves the Redis host). Before a fork
    the gate waits for the lookups under way and keeps new ones out until the fork is done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0

    def __enter__(self) -> None:
        with self._cond:
            self._active += 1

    def __exit__(self, *exc) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    def before_fork(self) -> None:
        self._cond.acquire()  # held across the fork: no lookup starts meanwhile
        while self._active:
            self._cond.wait()

    def after_fork(self) -> None:
        self._cond.release()


_RESOLVING = _ForkGate()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_RESOLVING.before_fork,
        after_in_parent=_RESOLVING.after_fork,
        after_in_child=_RESOLVING.after_fork,
    )


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
        self._server_secret: tuple[bytes, float] | None = None  # (secret, when read)

    @property
    def lease(self) -> float:
        return 2 * self.settings.callback_timeout + LEASE_MARGIN

    def pause(self, attempts: int) -> float:
        """Seconds before the attempt after attempts failed ones: doubling, capped, jittered."""
        s = self.settings
        ceiling = min(s.callback_backoff_max, s.callback_backoff * 2 ** (attempts - 1))
        return ceiling / 2 + self.jitter() * ceiling / 2

    def secret_for(self, owner: str | None) -> str:
        # Read again now and then: a generated secret lives in Redis and may be replaced there.
        if self._server_secret is None or time.monotonic() - self._server_secret[1] > SECRET_TTL:
            found = webhooks.server_secret(self.redis, self.settings.webhook_secret)
            self._server_secret = (found, time.monotonic())
        return webhooks.key_secret(self._server_secret[0], owner)

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
        webhooks.attempted(
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
            then = "gave up" if next_at is None else f"next in {next_at - time.time():.1f} s"
            log.warning(
                "job %s: callback attempt %d failed (%s); %s", job_id, attempts, error, then
            )

    def post(self, job_id: str, record: dict, attempt: int) -> tuple[int | None, str | None, bool]:
        """POST record's body to its URL; return (status or None, error or None, give up now)."""
        try:
            target = callbacks.parse(record["url"])
            with _RESOLVING:
                addresses = callbacks.addresses(target, self.allow, self.resolver)
        except callbacks.CallbackUnresolved as exc:
            return None, str(exc), False
        except callbacks.CallbackRefused as exc:
            return None, str(exc), True
        body = record["body"]
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "Host": delivery.host_header(target),
            "X-Convq-Job": job_id,
            "X-Convq-Attempt": str(attempt),
            webhooks.SIGNATURE_HEADER: webhooks.sign(
                self.secret_for(record["owner"]), body, int(time.time())
            ),
        }
        return (
            *delivery.send(target, addresses, body, headers, self.settings.callback_timeout),
            False,
        )

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
