"""JSON error answers from the HTTP servers themselves (requests that never reach Flask).

A request line or header the server cannot parse is refused by gunicorn or werkzeug before the
app sees it; their stock answers are HTML pages. These hooks make them the same
{"error", "type"} JSON every other answer uses.
"""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

from werkzeug.serving import WSGIRequestHandler


def error_body(status: int, reason: str, message: str) -> bytes:
    """Return the JSON body of a server-level error."""
    return json.dumps({"error": message or reason, "type": reason.replace(" ", "")}).encode()


def _gunicorn_write_error(sock, status_int, reason, mesg) -> None:
    from gunicorn import util

    body = error_body(int(status_int), str(reason), str(mesg))
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin1") + body)


def install_gunicorn_json_errors() -> None:
    """Make gunicorn answer its own errors (bad request line, headers too big) in JSON.

    Call it from the gunicorn config module; gunicorn's workers look write_error up at call time.
    """
    from gunicorn import util

    util.write_error = _gunicorn_write_error


class JsonErrorRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler, answering the errors it raises itself in JSON."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None):
        reason = BaseHTTPRequestHandler.responses.get(code, ("Error", ""))[0]
        body = error_body(code, reason, message or explain or reason)
        try:
            self.log_error("code %d, message %s", code, message)
            self.send_response(code, message)
            self.send_header("Connection", "close")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(body)
        except OSError:
            pass
        self.close_connection = True
