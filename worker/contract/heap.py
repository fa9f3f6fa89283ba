"""glibc heap settings for convq's long-lived processes (the API's and the worker's).

glibc serves every block over its mmap threshold (at most 32 MiB) from fresh pages and hands
it back to the OS when freed, so a process that handles one big array after another faults
each one in anew: AlexNet conv1's 37 MB output at N=32 (~9,000 page faults a job in a
worker), a 1.2 MB request body copied a few times on its way through gunicorn (~5 ms of a
32-image job's read on an AMD EPYC Zen 1). Raising the thresholds lets the heap keep freed
blocks for the next request or job; release() gives them back once a process is idle.
"""

from __future__ import annotations

import ctypes

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
WORKER_KEEP_BYTES = 1 << 30
"""A worker's horse keeps freed blocks up to this size and trims its heap once idle."""
API_KEEP_BYTES = 64 << 20
"""An API process keeps freed blocks up to this size (request bodies, results on their way
out); bigger ones (model uploads) still go back to the OS when freed."""


def keep_freed(limit: int) -> None:
    """Keep freed blocks of up to limit bytes in the heap, and that much free at its top."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, limit)
        libc.mallopt(_M_TRIM_THRESHOLD, limit)
    except (OSError, AttributeError):  # not glibc
        pass


def release() -> None:
    """Hand freed heap back to the OS (~0.5 ms); for an idle process."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
