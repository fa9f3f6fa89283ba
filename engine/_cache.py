"""Keep Numba's on-disk cache of the engine's kernels in step with the code they call.

Numba keys a cached kernel on its own source file only: edit engine/_gemm.py and the kernels in
_conv.py and _winograd.py, which call into it, keep loading the old machine code; and a process
still running the old code keeps writing old entries. So the kernel modules are imported inside
versioned(), which points Numba's cache for them at a directory named after a hash of every
kernel module: each version of the code reads and writes only its own entries. The directory is
under NUMBA_CACHE_DIR when set, else engine/__pycache__; an unwritable one makes Numba fall back
to its usual places.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import os
import shutil
import time

import numba

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_MODULES = (
    "_conv.py",
    "_gemm.py",
    "_grouped_kernel.py",
    "_pool.py",
    "_reduce.py",
    "_winograd.py",
)
PREFIX = "kernels-"
STALE_AFTER = 24 * 3600  # s: other versions' directories untouched this long are removed


def source_hash() -> str:
    """Return a hash of every module that holds or is called by a cached kernel."""
    return _hash(HERE)


@functools.lru_cache(maxsize=8)
def _hash(here: str) -> str:
    # read once per process: the kernel choice asks for it on every conv, and the sources of a
    # running process do not change (a new version is a new process)
    digest = hashlib.sha256()
    for name in KERNEL_MODULES:
        with open(os.path.join(here, name), "rb") as src:
            digest.update(src.read())
    return digest.hexdigest()[:16]


def cache_dir() -> str:
    """Return this version's kernel cache directory."""
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(HERE, "__pycache__")
    return os.path.join(base, PREFIX + source_hash())


def prune(keep: str) -> list[str]:
    """Remove other versions' directories unused for STALE_AFTER seconds; return them."""
    removed = []
    for path in glob.glob(os.path.join(os.path.dirname(keep), PREFIX + "*")):
        if path == keep:
            continue
        try:
            if time.time() - os.path.getmtime(path) > STALE_AFTER:
                shutil.rmtree(path)
                removed.append(path)
        except OSError:  # another process got there first, or a read-only install
            pass
    return removed


@contextlib.contextmanager
def versioned():
    """Within the block, kernels decorated with cache=True use this version's directory."""
    before = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = path = cache_dir()
    try:
        yield path
    finally:
        numba.config.CACHE_DIR = before
    prune(path)
