"""A worker keeps freed big arrays for the next job (worker.horse.keep_freed_memory), an API
process its request-sized ones (worker.contract.heap, gunicorn_conf.post_fork)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
from worker.contract import heap
from worker.horse import _release_memory, keep_freed_memory
mib = int(sys.argv[2]) if len(sys.argv) > 2 else 37  # AlexNet conv1's output at N=32
if sys.argv[1] == "keep":
    keep_freed_memory()
if sys.argv[1] == "api":
    heap.keep_freed(heap.API_KEEP_BYTES)
np.ones(mib << 18, np.float32)  # freed at once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
np.ones(mib << 18, np.float32)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
with open("/proc/self/statm") as f:
    kept = int(f.read().split()[1])
_release_memory()
with open("/proc/self/statm") as f:
    trimmed = int(f.read().split()[1])
print(faults, kept - trimmed)
"""


def _run(mode: str, mib: int = 37) -> tuple[int, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(mib)], capture_output=True, text=True, check=True
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_an_api_process_reuses_request_sized_blocks_but_not_model_sized_ones():
    default_faults, _ = _run("default", 4)  # a 32-image request body is ~5 MB
    kept_faults, _ = _run("api", 4)
    assert default_faults >= 4 // 2 and kept_faults <= default_faults // 10
    big_faults, _ = _run("api", 130)  # past API_KEEP_BYTES (64 MiB): back to the OS when freed
    assert big_faults >= 64


def test_convq_api_hands_gunicorn_the_post_fork_hook(monkeypatch):
    from gunicorn.app.base import BaseApplication

    from service import cli, gunicorn_conf

    seen = {}

    def run(self):
        self.load_config()
        seen["post_fork"] = self.cfg.post_fork

    monkeypatch.setattr(BaseApplication, "run", run)
    assert cli.api(["--port", "0"]) == 0
    assert seen["post_fork"] is gunicorn_conf.post_fork
