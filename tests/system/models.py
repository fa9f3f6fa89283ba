"""Models the system tests run: slow enough to kill a worker in the middle of a job."""

from __future__ import annotations

import functools
import math
import time

import numpy as np

import engine
from engine import Model

HEAD = "gap"
"""The stack's last layer, a global average pool: what the slow jobs ask for, so a job of many
256x256 images stores 256 bytes per image instead of a 16 MiB map."""

SLOW_SECONDS = 4.0
"""About how long one slow job computes on a one-thread worker of this machine: however fast the
CPU, a test that sees a job's progress has seconds to kill or pause something before it ends."""

SIZE = 256


def conv_stack(layers: int, seed: int) -> tuple[dict, dict]:
    """Return (spec, arrays) of `layers` 3x3 pad-1 convs with 64 filters on a 3-channel input,
    then a global average pool named HEAD."""
    rng = np.random.default_rng(seed)
    spec: dict = {"name": "slow", "input": {"channels": 3}, "layers": []}
    arrays, cin = {}, 3
    for i in range(layers):
        spec["layers"].append({"name": f"c{i}", "type": "conv", "filters": 64, "size": 3, "pad": 1})
        w = rng.standard_normal((64, 3, 3, cin)) / np.sqrt(9 * cin)
        arrays[f"c{i}.w"] = w.astype(np.float32)
        arrays[f"c{i}.b"] = (rng.standard_normal(64) * 0.1).astype(np.float32)
        cin = 64
    spec["layers"].append({"name": HEAD, "type": "globalavgpool"})
    return spec, arrays


@functools.cache
def slow_image_count(layers: int, most: int = 12) -> int:
    """How many SIZE x SIZE images make a job of conv_stack(layers) compute about SLOW_SECONDS
    on one thread here (at least 2, at most `most`), timed on this machine now.

    A fixed count made a job of ~1.5 s on a fast CPU: a test polling for its second layer
    could miss the whole run, or kill a worker just after its job had finished. Timed by the
    wall clock, the count shrank to 2 when the test's own workers were warming up meanwhile.
    """
    model = Model.from_arrays(*conv_stack(layers, seed=0))
    x = np.zeros((1, SIZE, SIZE, 3), np.uint8)
    threads = engine.get_threads()
    engine.set_threads(1)
    try:
        model.run(x, outputs=[HEAD])  # kernels loaded before the timed runs
        took = math.inf
        for _ in range(2):  # CPU time: workers starting beside this must not shrink the job
            began = time.process_time()
            model.run(x, outputs=[HEAD])
            took = min(took, time.process_time() - began)
    finally:
        engine.set_threads(threads)
    return max(2, min(most, math.ceil(SLOW_SECONDS / took)))


def slow_images(layers: int, seed: int, count: int | None = None) -> np.ndarray:
    """count (default slow_image_count(layers)) random uint8 SIZE x SIZE RGB images."""
    n = slow_image_count(layers) if count is None else count
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)
