"""Worker settings, read once from the environment into a frozen dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import defaults


def _int(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{name}={raw!r} must not be negative")
    return value


def _float(env: dict, name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name}={raw!r} must be a finite number, not negative")
    return value


@dataclass(frozen=True)
class Settings:
    """What a worker (and the service's queue side) needs to know; times in seconds."""

    redis_url: str | None = None
    queue: str = defaults.QUEUE_NAME
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    job_timeout: int = defaults.JOB_TIMEOUT
    result_ttl: int = defaults.RESULT_TTL
    input_ttl: int = defaults.INPUT_TTL
    model_cache_bytes: int = defaults.MODEL_CACHE_BYTES
    retries: int = defaults.RETRIES
    heartbeat: int = defaults.HEARTBEAT_SECONDS
    heartbeat_grace: int = defaults.HEARTBEAT_GRACE
    maintenance_interval: int = defaults.MAINTENANCE_SECONDS
    poll: float = defaults.POLL_SECONDS
    timeout_grace: int = defaults.TIMEOUT_GRACE
    log_level: str = "INFO"
    blob_dir: str | None = None
    callback_allow: str = ""
    callback_attempts: int = defaults.CALLBACK_ATTEMPTS
    callback_backoff: float = defaults.CALLBACK_BACKOFF
    callback_backoff_max: float = defaults.CALLBACK_BACKOFF_MAX
    callback_timeout: float = defaults.CALLBACK_TIMEOUT
    webhook_secret: str | None = field(default=None, repr=False)
    batch_max_images: int = defaults.BATCH_MAX_IMAGES
    batch_wait_ms: int = defaults.BATCH_WAIT_MS
    batch_max_bytes: int = defaults.BATCH_MAX_BYTES

    @classmethod
    def from_env(cls, env: dict | None = None) -> Settings:
        """Read REDIS_URL and the CONVQ_* variables; anything unset keeps its default."""
        env = dict(os.environ if env is None else env)
        return cls(
            redis_url=env.get("REDIS_URL") or None,
            queue=env.get("CONVQ_QUEUE") or defaults.QUEUE_NAME,
            threads=max(1, _int(env, "CONVQ_THREADS", os.cpu_count() or 1)),
            job_timeout=max(1, _int(env, "CONVQ_JOB_TIMEOUT", defaults.JOB_TIMEOUT)),
            result_ttl=max(1, _int(env, "CONVQ_RESULT_TTL", defaults.RESULT_TTL)),
            input_ttl=max(1, _int(env, "CONVQ_INPUT_TTL", defaults.INPUT_TTL)),
            model_cache_bytes=_int(env, "CONVQ_MODEL_CACHE_BYTES", defaults.MODEL_CACHE_BYTES),
            retries=_int(env, "CONVQ_RETRIES", defaults.RETRIES),
            heartbeat=max(1, _int(env, "CONVQ_HEARTBEAT", defaults.HEARTBEAT_SECONDS)),
            heartbeat_grace=max(1, _int(env, "CONVQ_HEARTBEAT_GRACE", defaults.HEARTBEAT_GRACE)),
            maintenance_interval=max(
                1, _int(env, "CONVQ_MAINTENANCE_INTERVAL", defaults.MAINTENANCE_SECONDS)
            ),
            poll=max(0.05, _float(env, "CONVQ_POLL_SECONDS", defaults.POLL_SECONDS)),
            timeout_grace=max(1, _int(env, "CONVQ_TIMEOUT_GRACE", defaults.TIMEOUT_GRACE)),
            log_level=env.get("CONVQ_LOG_LEVEL") or "INFO",
            blob_dir=env.get("CONVQ_BLOB_DIR") or None,
            callback_allow=env.get("CONVQ_CALLBACK_ALLOW") or "",
            callback_attempts=max(
                1, _int(env, "CONVQ_CALLBACK_ATTEMPTS", defaults.CALLBACK_ATTEMPTS)
            ),
            callback_backoff=_float(env, "CONVQ_CALLBACK_BACKOFF", defaults.CALLBACK_BACKOFF),
            callback_backoff_max=_float(
                env, "CONVQ_CALLBACK_BACKOFF_MAX", defaults.CALLBACK_BACKOFF_MAX
            ),
            callback_timeout=max(
                0.1, _float(env, "CONVQ_CALLBACK_TIMEOUT", defaults.CALLBACK_TIMEOUT)
            ),
            webhook_secret=env.get("CONVQ_WEBHOOK_SECRET") or None,
            batch_max_images=_int(env, "CONVQ_BATCH_MAX_IMAGES", defaults.BATCH_MAX_IMAGES),
            batch_wait_ms=_int(env, "CONVQ_BATCH_WAIT_MS", defaults.BATCH_WAIT_MS),
            batch_max_bytes=_int(env, "CONVQ_BATCH_MAX_BYTES", defaults.BATCH_MAX_BYTES),
        )
