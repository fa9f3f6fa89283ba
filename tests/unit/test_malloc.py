"""A worker keeps freed big arrays for the next job (worker.horse.keep_freed_memory)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from worker.horse import _release_memory, keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
np.ones(37 << 18, np.float32)  # 37 MiB, freed at once: AlexNet conv1's output at N=32
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(37 << 18, np.float32)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
with open("/proc/self/statm") as f:
    kept = int(f.read().split()[1])
_release_memory()
with open("/proc/self/statm") as f:
    trimmed = int(f.read().split()[1])
print(faults, kept - trimmed)
"""


def _run(mode: str) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_the_next_big_array_reuses_freed_pages_and_idle_trim_returns_them():
    default_faults, _ = _run("default")
    kept_faults, returned_pages = _run("keep")
    # glibc maps each big array afresh: at least one fault per 2 MiB (huge) page, each zeroed.
    assert default_faults >= 37 // 2
    assert kept_faults <= default_faults // 10  # kept in the heap: the second one reuses it
    assert returned_pages > (37 << 20) // 4096 // 2  # and the idle trim gives it back to the OS
