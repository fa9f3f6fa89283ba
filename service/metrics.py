"""Placeholder: Prometheus metrics land here. init_app(app) registers /metrics."""


def init_app(app) -> None:
    """Register the /metrics route and request hooks on app."""
