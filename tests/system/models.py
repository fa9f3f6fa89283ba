"""Models the system tests run: slow enough to kill a worker in the middle of a job."""

from __future__ import annotations

import numpy as np


def conv_stack(layers: int, seed: int) -> tuple[dict, dict]:
    """Return (spec, arrays) of `layers` 3x3 pad-1 convs with 64 filters on a 3-channel input."""
    rng = np.random.default_rng(seed)
    spec: dict = {"name": "slow", "input": {"channels": 3}, "layers": []}
    arrays, cin = {}, 3
    for i in range(layers):
        spec["layers"].append({"name": f"c{i}", "type": "conv", "filters": 64, "size": 3, "pad": 1})
        w = rng.standard_normal((64, 3, 3, cin)) / np.sqrt(9 * cin)
        arrays[f"c{i}.w"] = w.astype(np.float32)
        arrays[f"c{i}.b"] = (rng.standard_normal(64) * 0.1).astype(np.float32)
        cin = 64
    return spec, arrays
