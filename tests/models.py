"""The tiny model most tests run: conv -> ReLU -> maxpool -> conv-as-fc, 3 channels in.

Fixed at 9x9 for the API tests (an FC-as-conv head over the whole map); with open_input the
same layers accept any input whose sizes fit (odd, 9 or more), as the worker tests use them.
"""

from __future__ import annotations

import copy

import numpy as np

from engine import Model

TINY_SPEC = {
    "name": "tiny",
    "input": {"height": 9, "width": 9, "channels": 3},
    "preprocess": {"scale": 0.00392156862745098, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25]},
    "layers": [
        {"name": "conv1", "type": "conv", "filters": 4, "size": 3, "stride": 2, "pad": 1},
        {"name": "relu1", "type": "relu"},
        {"name": "pool1", "type": "maxpool", "size": 2, "stride": 1},
        {"name": "fc", "type": "conv", "filters": 5, "size": 4},
    ],
}


def tiny_spec(*, open_input: bool = False) -> dict:
    """Return a copy of TINY_SPEC; open_input leaves the input height and width unset."""
    spec = copy.deepcopy(TINY_SPEC)
    if open_input:
        spec["input"] = {"channels": 3}
    return spec


def tiny_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """Return random OHWI weights and biases for TINY_SPEC's two convs."""
    rng = np.random.default_rng(seed)
    return {
        "conv1.w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv1.b": rng.standard_normal(4).astype(np.float32),
        "fc.w": rng.standard_normal((5, 4, 4, 4)).astype(np.float32),
        "fc.b": rng.standard_normal(5).astype(np.float32),
    }


def tiny_model(seed: int = 0, *, open_input: bool = False) -> Model:
    return Model.from_arrays(tiny_spec(open_input=open_input), tiny_arrays(seed))
