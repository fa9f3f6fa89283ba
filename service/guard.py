"""Browser-facing guards: allowed Host names and same-origin writes with auth off; security headers.

With CONVQ_API_KEYS empty (`convq up`, the embedded default) anything that can reach the port
may use the API, and that includes every web page the user has open: a page cannot read another
origin's answers, but it can post forms to it, and with DNS rebinding it can make its own name
point at 127.0.0.1. So, with auth off only:
- a request whose Host is not in CONVQ_ALLOWED_HOSTS (default localhost, 127.0.0.1, [::1]) is
  refused with 400 (a rebound name arrives as its own Host); health checks are exempt;
- a state-changing request (POST, PUT, PATCH, DELETE) whose Origin, or else Referer, names
  another origin than the Host it was sent to is refused with 403. Clients that send neither
  (curl, tritonclient, `convq submit`) are not browsers and pass.
With auth on, the bearer key (which browsers never attach by themselves) is the guard.
Every answer carries X-Content-Type-Options, a frame-ancestors policy and a
Content-Security-Policy: the page may load only its own scripts, styles and images.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, current_app, request

from .auth import api_keys
from .defaults import ALLOWED_HOSTS
from .errors import ApiError

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
"""The page: its own script, styles and the pictures it fetches (as blob: URLs); nothing inline,
nothing from elsewhere, never framed."""

API_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"
"""Everything else (JSON, PNG, .npy) is data: nothing in it may run or be framed."""


class MisdirectedHost(ApiError):
    status = 400


class ForeignOrigin(ApiError):
    status = 403


def allowed_hosts(value: object) -> frozenset[str]:
    """Return the lower-case host names (no port) of a CONVQ_ALLOWED_HOSTS value; '*' = any."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value if value is not None else ALLOWED_HOSTS).split(",")
    return frozenset(item.strip().lower() for item in items if item.strip())


def _hostname(netloc: str) -> str:
    """Return the host part of host[:port] (IPv6 stays in brackets), lower case."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[: netloc.find("]") + 1] if "]" in netloc else netloc
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def _origin_of(url: str) -> str | None:
    """Return scheme://netloc of url, or None if it has none (e.g. Origin: null)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def _check() -> None:
    if api_keys() or request.path.startswith("/v2/health/"):
        return  # probes (load balancers, orchestrators) use whatever Host they like
    host = request.headers.get("Host", "")
    allowed = current_app.extensions["convq.allowed_hosts"]
    if "*" not in allowed and _hostname(host) not in allowed:
        raise MisdirectedHost(
            f"Host {host[:100]!r} is not one this server answers with auth off; add it to "
            "CONVQ_ALLOWED_HOSTS (or set CONVQ_API_KEYS)",
            field="Host",
        )
    if request.method not in STATE_CHANGING:
        return
    sent = request.headers.get("Origin")
    which = "Origin"
    if sent is None:
        sent, which = request.headers.get("Referer"), "Referer"
    if sent is None:
        return
    mine = f"{request.scheme}://{host.strip().lower()}"
    theirs = _origin_of(sent)
    if theirs is None or theirs != mine:
        raise ForeignOrigin(
            f"a {request.method} from another origin ({which} {sent[:100]!r}) is refused "
            "with auth off; use this server's own page or a client that is not a browser",
            field=which,
        )


def _headers(response: Response) -> Response:
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    page = request.path == "/" or request.path.startswith("/ui/static/")
    response.headers.setdefault("Content-Security-Policy", PAGE_CSP if page else API_CSP)
    return response


def init_app(app: Flask) -> None:
    """Check Host and Origin before every request (auth off); add security headers to answers."""
    app.extensions["convq.allowed_hosts"] = allowed_hosts(app.config.get("ALLOWED_HOSTS"))
    app.before_request(_check)
    app.after_request(_headers)
