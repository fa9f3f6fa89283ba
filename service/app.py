"""The Flask app factory: configuration, the Redis-backed objects every route shares, blueprints."""

from __future__ import annotations

import os

from flask import Flask
from flask.json.provider import DefaultJSONProvider

from worker.contract.cache import ModelCache
from worker.contract.callbacks import Allow
from worker.contract.config import Settings
from worker.contract.connection import connect
from worker.contract.queue import make_queue
from worker.contract.store import Store

from . import auth, defaults, guard, metrics, openapi, v2_jobs, v2_models, v2_webhooks, web
from .context import Convq
from .errors import register_error_handlers


def _connect(app: Flask) -> Convq:
    settings = app.config.get("SETTINGS") or Settings.from_env()
    redis = app.config.get("REDIS")
    if redis is None:
        url = app.config.get("REDIS_URL") or settings.redis_url
        redis = connect(url, socket_timeout=float(app.config["SOCKET_TIMEOUT"]))
    store = Store.from_settings(redis, settings)
    return Convq(
        redis=redis,
        queue=make_queue(redis, settings.queue),
        store=store,
        settings=settings,
        models=ModelCache(int(app.config["MODEL_CACHE_BYTES"]), keep_latest=True),
        callback_allow=Allow.parse(settings.callback_allow),  # ValueError: the server won't start
    )


class _JSONInOrder(DefaultJSONProvider):
    """Flask's JSON, keeping keys in the order the code builds them (V2 documents read so)."""

    sort_keys = False


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: defaults, then CONVQ_* environment, then test_config (REDIS, SETTINGS)."""
    app = Flask(__name__)
    app.config.from_object(defaults)
    app.config["REDIS_URL"] = os.environ.get("REDIS_URL")
    app.config.from_prefixed_env("CONVQ")
    # Taken as written: Flask's JSON parsing of the environment would turn false, 0 or [] into
    # "no keys", silently switching auth off (auth.parse_keys refuses them instead).
    app.config["API_KEYS"] = os.environ.get("CONVQ_API_KEYS", "")
    if test_config:
        app.config.update(test_config)
    app.json = _JSONInOrder(app)
    register_error_handlers(app)
    app.extensions["convq"] = _connect(app)

    auth.init_app(app)
    guard.init_app(app)
    app.register_blueprint(v2_models.bp)
    app.register_blueprint(v2_jobs.bp)
    app.register_blueprint(v2_webhooks.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(web.bp)
    metrics.init_app(app)
    return app
