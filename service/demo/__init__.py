"""The demo `convq up` loads: AlexNet conv1 -> ReLU -> maxpool 3/2 with readable filters.

conv1 is 96 filters of 11x11x3, stride 4, on 227x227x3 input (55x55x96 out); pool1 gives 27x27x96.
"""

from __future__ import annotations

import numpy as np

from .filters import filter_bank, filter_labels
from .images import demo_images

NAME = "demo"


def demo_spec() -> dict:
    """Return the demo's spec dict (the model format of the README's "Models" section)."""
    return {
        "name": NAME,
        "input": {"height": 227, "width": 227, "channels": 3},
        "preprocess": {
            "scale": 1 / 255,
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        "fit": "strict",
        "layers": [
            {"name": "conv1", "type": "conv", "filters": 96, "size": 11, "stride": 4, "pad": 0},
            {"name": "relu1", "type": "relu"},
            {"name": "pool1", "type": "maxpool", "size": 3, "stride": 2},
        ],
    }


def demo_model() -> tuple[dict, dict[str, np.ndarray]]:
    """Return (spec, arrays) of the demo model; the same every call."""
    return demo_spec(), {"conv1.w": filter_bank(), "conv1.b": np.zeros(96, np.float32)}


__all__ = ["NAME", "demo_model", "demo_spec", "demo_images", "filter_labels"]
