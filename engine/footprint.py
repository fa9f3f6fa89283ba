"""Peak working memory of a run, predicted from the spec and the batch's shape alone.

A chain run holds, at layer i: the layer's input, its output, every earlier output the caller
asked for, and a layer's scratch (a padded copy of its input where the window has pads, plus
im2col tiles of bounded size per thread). Before the first layer the uint8 batch and its float32
copy are both alive. The peak is the largest of these sums, an upper bound of what Model.run
allocates (it does not count that a ReLU folded into a conv writes no output of its own).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .sizing import layer_shapes

if TYPE_CHECKING:
    from .spec import Spec

FLOAT = 4
SCRATCH_BYTES = 64 * 1024 * 1024
"""Bytes of per-thread im2col tiles and packing buffers a layer may hold besides its arrays
(tiles are a fixed size, independent of the batch; this bounds them for any thread count)."""


def peak_bytes(spec: Spec, n: int, h: int, w: int, outputs: list[str]) -> int:
    """Return the bytes a run of n images h x w holding outputs (layer names) needs at most.

    Raises ShapeError where the layers do not fit h x w (as Spec.shapes does).
    """
    shapes = layer_shapes(spec, h, w)
    channels = spec.channels
    names = [layer.name for layer in spec.layers]
    last = max(names.index(name) for name in outputs)
    wanted = set(outputs)
    x = n * h * w * channels * FLOAT
    peak = x + n * h * w * channels  # a uint8 batch and its preprocessed float32 copy
    kept = 0  # requested outputs made so far, other than the current input
    c, hi, wi = channels, h, w
    for i in range(last + 1):
        layer = spec.layers[i]
        ho, wo, k = shapes[i]
        out = n * ho * wo * k * FLOAT
        scratch = 0
        if layer.window is not None:
            win = layer.window
            if win.top or win.bottom or win.left or win.right:
                scratch += n * (hi + win.top + win.bottom) * (wi + win.left + win.right) * c * FLOAT
            scratch += SCRATCH_BYTES
        peak = max(peak, kept + x + out + scratch)
        if i > 0 and spec.layers[i - 1].name in wanted:
            kept += x  # the input stays alive as a result once this layer no longer needs it
        x, c, hi, wi = out, k, ho, wo
    return peak
