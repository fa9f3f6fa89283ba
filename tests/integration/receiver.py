"""A webhook receiver for tests: a small HTTP server thread that records every POST it gets."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Call:
    at: float  # time.monotonic() when the request arrived
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """Listens on host (a free port); answers each POST with the next of answers (then the last).

    An answer is a status code, or (302, location) for a redirect. With hold set, each request
    waits until release() (at most hold seconds) before it is answered.
    """

    def __init__(self, answers=(200,), host: str = "127.0.0.1", hold: float | None = None):
        self.answers = list(answers)
        self.calls: list[Call] = []
        self.answered = 0
        self.hold = hold
        self.released = threading.Event()
        lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                with lock:
                    owner.calls.append(
                        Call(time.monotonic(), self.path, dict(self.headers.items()), body)
                    )
                    n = len(owner.calls)
                if owner.hold is not None:
                    owner.released.wait(owner.hold)
                answer = owner.answers[min(n, len(owner.answers)) - 1]
                code, location = answer if isinstance(answer, tuple) else (answer, None)
                self.send_response(code)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                with lock:
                    owner.answered += 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.released.set()

    def wait_calls(self, n: int, timeout: float = 10.0) -> list[Call]:
        """Wait until n calls arrived (or timeout); return the calls."""
        deadline = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.calls)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
