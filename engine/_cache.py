"""Keep Numba's on-disk cache of the engine's kernels in step with the code they call.

Numba keys a cached kernel on its own source file only: edit engine/_gemm.py and the kernels
in _conv.py and _winograd.py, which call into it, keep loading the old machine code. refresh()
stamps the cache with a hash of every kernel module and drops the engine's cached kernels when
the hash changes. Only the in-tree cache (engine/__pycache__, Numba's default) is managed; with
NUMBA_CACHE_DIR set, clearing it after an upgrade is the deployer's job.
"""

from __future__ import annotations

import glob
import hashlib
import os

HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_MODULES = ("_conv.py", "_gemm.py", "_pool.py", "_winograd.py")
STAMP = "kernels.stamp"


def source_hash() -> str:
    """Return a hash of every module that holds or is called by a cached kernel."""
    digest = hashlib.sha256()
    for name in KERNEL_MODULES:
        with open(os.path.join(HERE, name), "rb") as src:
            digest.update(src.read())
    return digest.hexdigest()


def refresh() -> bool:
    """Drop cached kernels compiled from other sources; return whether any were dropped."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return False
    cache = os.path.join(HERE, "__pycache__")
    stamp = os.path.join(cache, STAMP)
    want = source_hash()
    try:
        with open(stamp) as f:
            if f.read().strip() == want:
                return False
    except OSError:
        pass
    dropped = False
    for name in KERNEL_MODULES:
        stem = name[:-3]
        for path in glob.glob(os.path.join(cache, f"{stem}.*.nb[ic]")):
            try:
                os.remove(path)
                dropped = True
            except OSError:  # another process got there first, or a read-only install
                pass
    try:
        os.makedirs(cache, exist_ok=True)
        tmp = f"{stamp}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(want)
        os.replace(tmp, stamp)
    except OSError:
        pass
    return dropped
