"""Placeholder: job timings for /metrics land here (Redis-backed, so every process can read them)."""


def record_job(redis, state: str, queue_seconds: float | None, compute_seconds: float | None) -> None:
    """Count a job that ended in state ('finished'/'failed') with its queue-wait and compute time."""
