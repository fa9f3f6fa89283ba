"""The shared objects of one app (Redis client, queue, store, settings, model cache), typed.

create_app() builds one Convq and hangs it on app.extensions["convq"]; views reach it through
convq(). This module imports no view, so views and the app factory can both import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis
from flask import current_app

from worker.contract.cache import ModelCache
from worker.contract.callbacks import Allow
from worker.contract.config import Settings
from worker.contract.queue import JobQueue
from worker.contract.store import Store


@dataclass
class Convq:
    """What every route shares: the Redis client, the job queue, the store and the models."""

    redis: redis.Redis
    queue: JobQueue
    store: Store
    settings: Settings
    models: ModelCache
    callback_allow: Allow = field(default_factory=Allow)
    """Where job callbacks may go besides public addresses (CONVQ_CALLBACK_ALLOW)."""


def convq() -> Convq:
    """Return the current app's shared objects."""
    return current_app.extensions["convq"]
