"""The per-process state a job function needs: settings and the model cache.

The runner installs it before taking jobs; a forked work-horse inherits it (and every model
the parent loaded), so a cached model costs no Redis round trip and no parsing per job.
"""

from __future__ import annotations

from .contract.cache import ModelCache
from .contract.config import Settings


class Runtime:
    """The settings and model cache job functions in this process use."""

    def __init__(self, settings: Settings, cache: ModelCache | None = None) -> None:
        self.settings = settings
        self.cache = cache if cache is not None else ModelCache(settings.model_cache_bytes)


_current: Runtime | None = None


def install(runtime: Runtime) -> Runtime:
    """Make runtime the one job functions in this process use."""
    global _current
    _current = runtime
    return runtime


def current() -> Runtime:
    """Return the installed runtime, or one with default settings."""
    global _current
    if _current is None:
        _current = Runtime(Settings())
    return _current
