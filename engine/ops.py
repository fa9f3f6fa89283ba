"""Fast-path layers (placeholder: delegates to the reference until the Numba kernels land)."""

from .reference import avg_pool2d_reference as avg_pool2d
from .reference import conv2d_reference as conv2d
from .reference import local2d_reference as local2d
from .reference import max_pool2d_reference as max_pool2d
from .reference import relu_reference as relu

_threads = 1


def set_threads(n: int) -> None:
    """Set how many threads the kernels use."""
    global _threads
    _threads = n


def get_threads() -> int:
    return _threads


def warmup() -> None:
    """Compile (or load from cache) every kernel."""


__all__ = ["avg_pool2d", "conv2d", "local2d", "max_pool2d", "relu", "set_threads", "get_threads", "warmup"]
