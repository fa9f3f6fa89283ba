"""Explanations of one channel of one layer (a class score, say) over the input pixels.

- "gradient": d score / d input, (N, H, W, C): the raw input gradient;
- "saliency": max over channels of |d score / d input|, (N, H, W) (Simonyan et al. 2014);
- "gradcam": at a conv layer A (N, h, w, K): ReLU(sum_k mean_yx(d score / d A_k) * A_k),
  bilinearly upsampled to the image, (N, H, W) (Selvaraju et al. 2017).
The score is channel k of the target layer summed over its positions; channel "top" takes, per
image, the channel with the largest score. Each map also comes as an RGB heatmap overlaid on
the image, (N, H, W, 3) uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backprop import INPUT, run_backward
from .errors import ModelError

METHODS = ("saliency", "gradcam", "gradient")
# A job's result arrays for an explanation (float32): the maps, the overlays (N, H, W, 3) in
# 0..255, and the channel explained per image (N,).
MAP, OVERLAY, CHANNEL = "explain:map", "explain:overlay", "explain:channel"
RESULTS = (MAP, OVERLAY, CHANNEL)
HEAT_WEIGHT = 0.5  # share of the heatmap in an overlay pixel; the image keeps the rest


@dataclass
class Explanation:
    """maps (N, H, W) float32 ((N, H, W, C) for "gradient"), the channel explained per image
    (N,), overlays (N, H, W, 3) uint8, and the conv layer a Grad-CAM was taken at."""

    maps: np.ndarray
    channels: np.ndarray
    overlays: np.ndarray
    at: str | None = None


def check_request(model, explain, hw: tuple[int, int] | None = None) -> dict:
    """Return {"method", "layer", "channel", "at"} checked against model, or ModelError.

    hw, the images' (H, W), lets a channel be checked when the model declares no input size.
    """
    if not isinstance(explain, dict):
        raise ModelError(
            'explain must be {"method": "saliency" | "gradcam" | "gradient", "layer": <name>, '
            '"channel": <int> or "top"}',
            field="explain",
        )
    extra = set(explain) - {"method", "layer", "channel", "at"}
    if extra:
        raise ModelError(f"explain has unknown keys: {', '.join(sorted(extra))}", field="explain")
    method = explain.get("method")
    if method not in METHODS:
        raise ModelError(
            f"explain.method must be one of {', '.join(METHODS)}, got {method!r}", field="explain"
        )
    names = model.layer_names
    layer = explain.get("layer", names[-1])
    if layer not in names:
        raise ModelError(
            f"explain.layer {layer!r} is unknown; layers are: {', '.join(names)}", field="explain"
        )
    channel = explain.get("channel", "top")
    if channel != "top" and (isinstance(channel, bool) or not isinstance(channel, int)):
        raise ModelError(
            f'explain.channel must be an integer or "top", got {channel!r}', field="explain"
        )
    if isinstance(channel, int):
        h, w, _ = model.input_shape
        if h is None and hw is not None:
            h, w = hw
        k = model.output_shapes(h, w)[layer][2] if h is not None else None
        if channel < 0 or (k is not None and channel >= k):
            raise ModelError(
                f"explain.channel {channel} is out of range for {layer} ({k} channels)",
                field="explain",
            )
    at = explain.get("at")
    if method == "gradcam":
        at = _gradcam_layer(model, layer, at)
    elif at is not None:
        raise ModelError('explain.at is for method "gradcam" only', field="explain")
    return {"method": method, "layer": layer, "channel": channel, "at": at}


def _gradcam_layer(model, layer: str, at) -> str:
    """Return the conv layer for Grad-CAM: at, or the last conv at or before the target."""
    names = model.layer_names
    types = {row["name"]: row["type"] for row in model.spec["layers"]}
    if at is None:
        convs = [n for n in names[: names.index(layer) + 1] if types[n] == "conv"]
        if not convs:
            raise ModelError(f"no conv layer at or before {layer} for Grad-CAM", field="explain")
        return convs[-1]
    if at not in names or types[at] != "conv" or names.index(at) > names.index(layer):
        raise ModelError(
            f"explain.at must be a conv layer at or before {layer}, got {at!r}", field="explain"
        )
    return at


def explain(model, images, explain_request) -> Explanation:
    """Explain channel k of a layer over images (N, H, W, C) uint8 or float32 (see module)."""
    req = check_request(model, explain_request)
    target = {"layer": req["layer"], "channel": req["channel"]}
    if req["method"] == "gradcam":
        at = req["at"]
        grads, kept, channels = run_backward(model, images, target, [at], keep=[at])
        act, g = kept[at], grads[at]
        alpha = g.mean(axis=(1, 2), dtype=np.float64)  # (N, K)
        cam = np.maximum(np.einsum("nyxk,nk->nyx", act.astype(np.float64), alpha), 0.0)
        maps = upsample(cam.astype(np.float32), images.shape[1], images.shape[2])
    else:
        grads, _, channels = run_backward(model, images, target, [INPUT])
        g = grads[INPUT]
        maps = g if req["method"] == "gradient" else np.abs(g).max(axis=3)
    heat = maps if maps.ndim == 3 else np.sqrt((maps.astype(np.float64) ** 2).sum(axis=3))
    return Explanation(
        maps=np.ascontiguousarray(maps, np.float32),
        channels=np.asarray(channels, np.int64),
        overlays=overlay(images, heat),
        at=req["at"],
    )


def as_results(e: Explanation) -> dict[str, np.ndarray]:
    """Return an explanation as a job's float32 result arrays {MAP, OVERLAY, CHANNEL}."""
    return {
        MAP: e.maps,
        OVERLAY: e.overlays.astype(np.float32),
        CHANNEL: e.channels.astype(np.float32),
    }


def result_bytes(model, n: int, h: int, w: int, request: dict) -> int:
    """Return the float32 bytes of an explanation's results for n images of h x w."""
    c = model.input_shape[2] if request["method"] == "gradient" else 1
    return 4 * n * (h * w * (c + 3) + 1)


def upsample(maps: np.ndarray, h: int, w: int) -> np.ndarray:
    """Resize (N, h0, w0) to (N, h, w) bilinearly, pixel centres aligned (align_corners=False)."""

    def axis(n_in: int, n_out: int):
        pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (pos - lo).astype(np.float32)

    ylo, yhi, fy = axis(maps.shape[1], h)
    xlo, xhi, fx = axis(maps.shape[2], w)
    rows = maps[:, ylo] * (1 - fy)[None, :, None] + maps[:, yhi] * fy[None, :, None]
    return rows[:, :, xlo] * (1 - fx) + rows[:, :, xhi] * fx


def colormap(t: np.ndarray) -> np.ndarray:
    """Map t in [0, 1] to RGB in [0, 1]: blue (low) through green to red (high), jet-like."""
    t = t[..., None]
    centres = np.array([0.75, 0.5, 0.25], np.float32)  # r, g, b
    return np.clip(1.5 - np.abs(4.0 * (t - centres)), 0.0, 1.0)


def _display(images: np.ndarray) -> np.ndarray:
    """Return images (N, H, W, C) as float RGB in [0, 1]: uint8 as is, floats min-max scaled."""
    x = images if images.ndim == 4 else images[..., None]
    if x.dtype == np.uint8:
        rgb = x.astype(np.float32) / 255.0
    else:
        x = x.astype(np.float32)
        lo = x.min(axis=(1, 2, 3), keepdims=True)
        span = x.max(axis=(1, 2, 3), keepdims=True) - lo
        rgb = (x - lo) / np.where(span > 0, span, 1.0)
    if rgb.shape[3] != 3:
        rgb = np.repeat(rgb.mean(axis=3, keepdims=True), 3, axis=3)
    return rgb


def overlay(images: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """Blend each image with its heat map (N, H, W), scaled to [0, 1] per image; uint8 RGB."""
    lo = heat.min(axis=(1, 2), keepdims=True)
    span = heat.max(axis=(1, 2), keepdims=True) - lo
    t = (heat - lo) / np.where(span > 0, span, 1.0)
    mixed = (1 - HEAT_WEIGHT) * _display(images) + HEAT_WEIGHT * colormap(t.astype(np.float32))
    return np.rint(np.clip(mixed, 0.0, 1.0) * 255.0).astype(np.uint8)
