"""Peak working memory of a run, predicted from the spec and the batch's shape alone.

A chain run holds, at layer i: the layer's input, its output, every earlier output the caller
asked for, and a layer's scratch (a padded copy of its input where the window has pads, plus
im2col tiles of bounded size per thread). Before the first layer the uint8 batch and its float32
copy are both alive. A concat's output is counted from its first input's layer on (its conv
branches write straight into it, engine.plan). The peak is the largest of these sums, an upper
bound of what Model.run allocates (it does not count that a ReLU folded into a conv writes no
output of its own).
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


def _inputs(spec: Spec) -> list[list[str | None]]:
    """Each layer's input names; None is the image. A chain layer reads the one before it."""
    names = {layer.name for layer in spec.layers}
    out: list[list[str | None]] = []
    previous: str | None = None
    for layer in spec.layers:
        ins = getattr(layer, "inputs", None)  # graph specs name them; chain specs do not
        out.append([previous] if not ins else [i if i in names else None for i in ins])
        previous = layer.name
    return out


def peak_bytes(spec: Spec, n: int, h: int, w: int, outputs: list[str]) -> int:
    """Return the bytes a run of n images h x w holding outputs (layer names) needs at most.

    Each array lives from the layer that makes it to the last layer that reads it (the image from
    the start), or to the end of the run if it was asked for. Raises ShapeError where the layers
    do not fit h x w (as Spec.shapes does).
    """
    shapes = layer_shapes(spec, h, w)
    names = [layer.name for layer in spec.layers]
    last = max(names.index(name) for name in outputs)
    inputs = _inputs(spec)[: last + 1]
    wanted = set(outputs)
    size: dict[str | None, int] = {None: n * h * w * spec.channels * FLOAT}
    hw: dict[str | None, tuple[int, int, int]] = {None: (h, w, spec.channels)}
    last_read: dict[str | None, int] = {}
    for i, ins in enumerate(inputs):
        for src in ins:
            last_read[src] = i
    live: set[str | None] = {None}
    peak = size[None] + n * h * w * spec.channels  # a uint8 batch and its float32 copy
    for layer, (ho, wo, k) in zip(spec.layers, shapes, strict=False):
        size[layer.name] = n * ho * wo * k * FLOAT
    # the concats each layer is the first input of: their output is allocated with it
    opens: dict[int, list[str]] = {}
    index = {name: i for i, name in enumerate(names)}
    for i, ins in enumerate(inputs):
        if getattr(spec.layers[i], "type", None) == "concat":
            first = min((index[s] for s in ins if s is not None), default=i)
            opens.setdefault(first, []).append(spec.layers[i].name)
    for i, ins in enumerate(inputs):
        layer = spec.layers[i]
        ho, wo, k = shapes[i]
        hw[layer.name] = (ho, wo, k)
        live.update(opens.get(i, ()))
        scratch = 0
        if layer.window is not None:
            win = layer.window
            hi, wi, c = hw[ins[0]]
            if win.top or win.bottom or win.left or win.right:
                scratch += n * (hi + win.top + win.bottom) * (wi + win.left + win.right) * c * FLOAT
            scratch += SCRATCH_BYTES
        live.add(layer.name)
        peak = max(peak, sum(size[a] for a in live) + scratch)
        # free what no later layer reads and the caller did not ask for
        live = {a for a in live if a in wanted or last_read.get(a, -1) > i}
    return peak
