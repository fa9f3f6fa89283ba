"""Model.gradients: the gradient of one channel of one layer with respect to the input and to
other layers' outputs, by one forward pass and one backward pass through engine.backward.

The objective is the sum over the batch and every position of channel k of layer L's output
(k per image when "top": the channel with the largest sum in that image). The forward pass
keeps only what the backward pass reads: each ReLU's output (its mask), each max pool's argmax
indices, and the layers asked for by `keep`; a conv or local layer needs only its weights for
the input gradient, a pool only its geometry.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import numpy as np

from . import backward
from .errors import InputError, ModelError, ShapeError
from .spec import WEIGHTED

INPUT = "input"

# Each model's flipped conv filters (backward.ConvGrad), made on first use and kept with it.
_conv_grads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def parse_target(model, target) -> tuple[str, int | str]:
    """Return (layer, channel) of a target {"layer": L, "channel": k or "top"} or ModelError."""
    if not isinstance(target, dict) or "layer" not in target:
        raise ModelError(
            'target must be {"layer": <name>, "channel": <int> or "top"}', field="target"
        )
    extra = set(target) - {"layer", "channel"}
    if extra:
        raise ModelError(f"target has unknown keys: {', '.join(sorted(extra))}", field="target")
    layer, channel = target["layer"], target.get("channel", "top")
    names = model.layer_names
    if layer not in names:
        raise ModelError(
            f"target layer {layer!r} is unknown; layers are: {', '.join(names)}", field="target"
        )
    if channel != "top" and (isinstance(channel, bool) or not isinstance(channel, int)):
        raise ModelError(
            f'target channel must be an integer or "top", got {channel!r}', field="target"
        )
    return layer, channel


def parse_wrt(model, wrt) -> list[str]:
    """Return the checked list of "input" and layer names the gradients are asked for."""
    if isinstance(wrt, str):
        wrt = [wrt]
    if not isinstance(wrt, (list, tuple)) or not wrt:
        raise ModelError('wrt must be a non-empty list of "input" and layer names', field="wrt")
    names = model.layer_names
    for name in wrt:
        if name != INPUT and name not in names:
            raise ModelError(
                f"wrt {name!r} is neither 'input' nor a layer; layers are: {', '.join(names)}",
                field="wrt",
            )
    return list(dict.fromkeys(wrt))


def _prepared(model, images) -> np.ndarray:
    x = model.prepare(images)
    try:
        model.output_shapes(x.shape[1], x.shape[2])
    except ShapeError as err:
        raise InputError(
            f"images of {x.shape[1]}x{x.shape[2]} do not fit: {err.message}",
            layer=err.layer,
            field=err.field,
        ) from None
    return x


def _conv_grad(model, name: str) -> backward.ConvGrad:
    per_model = _conv_grads.setdefault(model, {})
    if name not in per_model:
        per_model[name] = backward.ConvGrad(model._conv_weights[name])
    return per_model[name]


def run_backward(model, images, target, wrt: Iterable[str], keep: Iterable[str] = ()):
    """Return (gradients {name: array}, kept outputs {name: array}, channel per image (N,)).

    images go through model.prepare; gradients are float32 shaped like what they are of.
    """
    layer_name, channel = parse_target(model, target)
    wanted = parse_wrt(model, wrt)
    keep = set(keep)
    x = _prepared(model, images)
    layers = model._spec.layers
    names = model.layer_names
    last = names.index(layer_name)
    for name in keep:
        if names.index(name) > last:
            raise ModelError(f"{name} comes after the target layer {layer_name}", field="keep")
    # Forward: layer i's input size, what its backward reads, and the kept outputs.
    in_hw: list[tuple[int, int]] = []
    saved: dict[int, np.ndarray] = {}
    kept: dict[str, np.ndarray] = {}
    i = 0
    while i <= last:
        layer = layers[i]
        in_hw.append((x.shape[1], x.shape[2]))
        fuse = (
            layer.type in WEIGHTED
            and i < last
            and layers[i + 1].type == "relu"
            and layer.name not in keep
        )
        if layer.type == "maxpool":
            win = layer.window
            x, saved[i] = backward.max_pool2d_argmax(
                x, (win.fh, win.fw), (win.sh, win.sw), win.pad, (win.dh, win.dw)
            )
        else:
            x = model._apply(layer, x, relu=fuse)
        if fuse:
            i += 1
            in_hw.append((x.shape[1], x.shape[2]))
        if layers[i].type == "relu":
            saved[i] = x
        if layers[i].name in keep:
            kept[layers[i].name] = x
        i += 1
    k = x.shape[3]
    n = x.shape[0]
    if channel == "top":
        channels = np.argmax(x.sum(axis=(1, 2), dtype=np.float64), axis=1)
    else:
        if not 0 <= channel < k:
            raise ModelError(
                f"target channel {channel} is out of range: {layer_name} has {k} channels "
                f"(0..{k - 1})",
                field="target",
            )
        channels = np.full(n, channel)
    g = np.zeros(x.shape, np.float32)
    g[np.arange(n), :, :, channels] = 1.0
    del x
    grads: dict[str, np.ndarray] = {}
    shapes = model.output_shapes(*in_hw[0])
    for name in wanted:
        if name != INPUT and names.index(name) > last:  # the objective does not depend on it
            grads[name] = np.zeros((n, *shapes[name]), np.float32)
    lowest = -1 if INPUT in wanted else min(names.index(w) for w in wanted if w not in grads)
    for i in range(last, max(lowest, 0) - 1, -1):
        layer = layers[i]
        if layer.name in wanted:
            grads[layer.name] = g
        if i == lowest:
            break
        g = _layer_backward(model, layer, g, in_hw[i], saved.get(i))
    if INPUT in wanted:
        grads[INPUT] = g
    return {name: grads[name] for name in wanted}, kept, channels


def _layer_backward(model, layer, g: np.ndarray, hw, saved) -> np.ndarray:
    """Return the gradient with respect to layer's input given g with respect to its output."""
    if layer.type == "relu":
        return backward.relu_backward(saved, g)
    win = layer.window
    stride, pad, dilation = (win.sh, win.sw), win.pad, (win.dh, win.dw)
    if layer.type == "maxpool":
        return backward.max_pool2d_backward_idx(saved, g, hw)
    if layer.type == "avgpool":
        shape = (g.shape[0], *hw, g.shape[3])
        return backward.avg_pool2d_backward(
            shape, g, (win.fh, win.fw), stride, pad, layer.count_pad
        )
    if layer.type == "conv":
        return backward.conv2d_backward_input(
            g, _conv_grad(model, layer.name), hw, stride, pad, dilation
        )
    if layer.type == "local":
        w = model._arrays[layer.weights]
        return backward.local2d_backward_input(g, w, hw, stride, pad, dilation)
    raise ModelError(
        f"{layer.name}: no backward pass for layer type {layer.type!r}", layer=layer.name
    )


def gradients(model, images, target, wrt=(INPUT,)) -> dict[str, np.ndarray]:
    """Return {name: d objective / d name} for each name in wrt (see the module docstring)."""
    return run_backward(model, images, target, wrt)[0]
