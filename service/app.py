"""The Flask app factory: configuration, the Redis-backed objects every route shares, blueprints."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from flask import Flask, current_app

from engine import Model

from . import defaults
from .errors import register_error_handlers


class ModelCache:
    """Keep recently used validated models (for shape checks and metadata), byte-bounded LRU."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._models: OrderedDict[tuple[str, int], tuple[Model, int]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, store, name: str, version: int, spec: dict) -> Model | None:
        """Return the Model of name at version, loading its weights from store on a miss."""
        key = (name, version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
        weights = store.model_weights(name, version)
        if weights is None:
            return None
        model = Model.from_bytes(spec, weights, filename="weights.safetensors")
        with self._lock:
            self._models[key] = (model, len(weights))
            while (
                len(self._models) > 1
                and sum(size for _, size in self._models.values()) > self.max_bytes
            ):
                self._models.popitem(last=False)
        return model


@dataclass
class Convq:
    """The shared objects of one app: Redis connection, queue, blob store, worker settings."""

    redis: object
    queue: object
    store: object
    settings: object
    models: ModelCache = field(default_factory=lambda: ModelCache(defaults.MODEL_CACHE_BYTES))


def convq() -> Convq:
    """Return the current app's shared objects."""
    return current_app.extensions["convq"]


def _connect(app: Flask) -> Convq:
    from worker.contract.config import Settings
    from worker.contract.connection import connect
    from worker.contract.queue import make_queue
    from worker.contract.store import Store

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
        models=ModelCache(int(app.config["MODEL_CACHE_BYTES"])),
    )


def create_app(test_config: dict | None = None) -> Flask:
    """Build the app: defaults, then CONVQ_* environment, then test_config (REDIS, SETTINGS)."""
    app = Flask(__name__)
    app.config.from_object(defaults)
    app.config["REDIS_URL"] = os.environ.get("REDIS_URL")
    app.config["JSON_SORT_KEYS"] = False
    app.config.from_prefixed_env("CONVQ")
    # Taken as written: Flask's JSON parsing of the environment would turn false, 0 or [] into
    # "no keys", silently switching auth off (auth.parse_keys refuses them instead).
    app.config["API_KEYS"] = os.environ.get("CONVQ_API_KEYS", "")
    if test_config:
        app.config.update(test_config)
    app.json.sort_keys = False
    register_error_handlers(app)
    app.extensions["convq"] = _connect(app)

    from . import auth, guard, metrics, openapi, v2_jobs, v2_models, web

    auth.init_app(app)
    guard.init_app(app)
    app.register_blueprint(v2_models.bp)
    app.register_blueprint(v2_jobs.bp)
    app.register_blueprint(openapi.bp)
    app.register_blueprint(web.bp)
    metrics.init_app(app)
    return app
