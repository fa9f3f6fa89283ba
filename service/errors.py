"""The service's HTTP errors and the one handler that turns every error into JSON."""

from __future__ import annotations

import logging

import redis
from flask import Flask, jsonify
from PIL import Image
from werkzeug.exceptions import HTTPException

from engine import EngineError
from worker.contract.blobs import BlobDirError
from worker.contract.store import BlobMissing

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API answers with status and a JSON body {"error", "type", "field"?}."""

    status = 400

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        status: int | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.field = field
        self.retry_after = retry_after
        if status is not None:
            self.status = status

    def to_dict(self) -> dict:
        """Return the JSON body."""
        out = {"error": self.message, "type": type(self).__name__}
        if self.field is not None:
            out["field"] = self.field
        return out


class BadRequest(ApiError):
    status = 400


class Unauthorized(ApiError):
    status = 401


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class JobFailed(ApiError):
    status = 422


class Unprocessable(ApiError):
    status = 422


class TooLarge(ApiError):
    status = 413


class TooManyRequests(ApiError):
    status = 429


class UnsupportedMediaType(ApiError):
    status = 415


class Unavailable(ApiError):
    status = 503


class InferTimeout(ApiError):
    status = 504


def _answer(body: dict, status: int, retry_after: int | None = None, headers: dict | None = None):
    response = jsonify(body)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Map our, engine, werkzeug, Redis and Pillow errors to JSON; 500 only for bugs."""
    retry = lambda: int(app.config["RETRY_AFTER"])  # noqa: E731 - read late so tests can change it

    @app.errorhandler(ApiError)
    def api_error(e: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(e, Unauthorized) else None
        return _answer(e.to_dict(), e.status, e.retry_after, headers)

    @app.errorhandler(EngineError)
    def engine_error(e: EngineError):
        # Every EngineError is about what the client sent (a spec, weights or images).
        return _answer(e.to_dict(), 400)

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        body = {"error": e.description or e.name, "type": type(e).__name__}
        headers = dict(e.get_headers())
        headers.pop("Content-Type", None)
        return _answer(body, e.code or 500, headers=headers)

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    @app.errorhandler(redis.exceptions.BusyLoadingError)
    def redis_down(e: Exception):
        log.warning("redis unavailable: %s", e)
        return _answer(
            {"error": "the job store (Redis) is unavailable; retry later", "type": "Unavailable"},
            503,
            retry(),
        )

    @app.errorhandler(redis.exceptions.OutOfMemoryError)
    def redis_full(e: Exception):
        log.warning("redis full: %s", e)
        return _answer(
            {"error": "the job store (Redis) is full; retry later", "type": "InsufficientStorage"},
            507,
            retry(),
        )

    @app.errorhandler(BlobDirError)
    def blobs_full(e: BlobDirError):
        log.warning("blob directory unusable: %s", e)
        return _answer(
            {
                "error": "the blob directory (CONVQ_BLOB_DIR) cannot take the job's "
                "data (full or not writable); retry later",
                "type": "InsufficientStorage",
            },
            507,
            retry(),
        )

    @app.errorhandler(BlobMissing)
    def blob_missing(e: BlobMissing):
        # The detail (paths on this server) goes to the log, not to the client.
        log.warning("blob file missing: %s", e)
        return _answer(
            {
                "error": f"{e.name} has expired or is gone from the blob directory "
                "(details in the server log)",
                "type": "NotFound",
            },
            404,
        )

    @app.errorhandler(Image.DecompressionBombError)
    @app.errorhandler(Image.DecompressionBombWarning)
    def bomb(e: Exception):
        return _answer({"error": f"image too large: {e}", "type": "TooLarge"}, 413)

    @app.errorhandler(Exception)
    def bug(e: Exception):
        log.exception("unhandled error (a bug)")
        return _answer({"error": "internal server error", "type": "InternalError"}, 500)
