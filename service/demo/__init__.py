"""Placeholder: the demo model (AlexNet conv1 -> ReLU -> maxpool 3/2) and sample images land here."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def demo_model() -> tuple[dict, dict]:
    """Return (spec, arrays) of the demo model."""
    rng = np.random.default_rng(0)
    spec = {
        "name": "demo",
        "input": {"height": 227, "width": 227, "channels": 3},
        "preprocess": {"scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "layers": [
            {"name": "conv1", "type": "conv", "filters": 96, "size": 11, "stride": 4, "pad": 0},
            {"name": "relu1", "type": "relu"},
            {"name": "pool1", "type": "maxpool", "size": 3, "stride": 2},
        ],
    }
    arrays = {"conv1.w": rng.standard_normal((96, 11, 11, 3)).astype(np.float32) * 0.05,
              "conv1.b": np.zeros(96, np.float32)}
    return spec, arrays


def demo_images() -> list[tuple[str, bytes]]:
    """Return [(filename, png_bytes)] sample images for the demo."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (227, 227, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return [("noise.png", buf.getvalue())]
