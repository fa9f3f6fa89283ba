"""Model.gradients: the gradient of one channel of one layer with respect to the input and to
other layers' outputs, by one forward pass and one backward pass through engine.backward.

The objective is the sum over the batch and every position of channel k of layer L's output
(k per image when "top": the channel with the largest sum in that image). The forward pass runs
only the layers L depends on and keeps only what the backward pass reads: the outputs of ReLU,
softmax, sigmoid, tanh and add-with-ReLU, the inputs of lrn, clip and global max pool, each
max pool's argmax indices, and the layers asked for by `keep`; a conv or local layer needs only
its weights for the input gradient, pools and batchnorm only their geometry and arrays. The
backward pass walks the layers in reverse, summing the gradients of a value read by several
layers (a residual's two branches), and stops once every asked-for gradient is complete.
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Iterable
from dataclasses import replace

import numpy as np

from . import backward, backward_graph
from .errors import ModelError
from .graph import IMAGE
from .plan import plan

INPUT = "input"

# Each model's flipped conv filters (backward.ConvGrad), made on first use and kept with it.
_conv_grads_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    if isinstance(channel, str) and channel == "top":
        return layer, channel
    if isinstance(channel, (bool, np.bool_)) or not isinstance(channel, numbers.Integral):
        raise ModelError(
            f'target channel must be an integer or "top", got {channel!r}', field="target"
        )
    return layer, int(channel)


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


def _conv_grad(model, layer) -> backward.ConvGrad:
    """Return a conv's ConvGrad (its flipped filters are kept with the model)."""
    per_model = _conv_grads_cache.setdefault(model, {})
    if layer.name not in per_model:
        per_model[layer.name] = backward.ConvGrad(model._arrays[layer.weights], layer.groups)
    return per_model[layer.name]


# What each layer type's backward reads from its forward pass: its output or its input.
_SAVES_OUTPUT = {"relu", "softmax", "sigmoid", "tanh", "add"}
_SAVES_INPUT = {"lrn", "clip", "globalmaxpool"}


def run_backward(model, images, target, wrt: Iterable[str], keep: Iterable[str] = ()):
    """Return (gradients {name: array}, kept outputs {name: array}, channel per image (N,)).

    images go through model.prepare; gradients are float32 shaped like what they are of.
    """
    layer_name, channel = parse_target(model, target)
    wanted = parse_wrt(model, wrt)
    keep = list(dict.fromkeys(keep))
    x = model.prepare_fitting(images)
    n = x.shape[0]
    names = model.layer_names
    for name in keep:
        if name not in names:
            raise ModelError(f"unknown layer {name!r} to keep", field="keep")
    shapes = model.output_shapes(x.shape[1], x.shape[2]) | {IMAGE: x.shape[1:]}
    # Forward, one layer per step (nothing fused, so every layer's gradient exists), keeping
    # what each backward reads; the plan frees every other value once read.
    steps = plan(model._spec.layers, [layer_name, *keep], fuse=False)
    values: dict[str, np.ndarray] = {IMAGE: x}
    del x
    saved: dict[str, np.ndarray] = {}
    order = []
    for step in steps:
        layer = step.head
        xs = [values[src] for src in layer.inputs]
        if layer.type == "maxpool" and layer.window is not None:
            win = layer.window
            out, saved[layer.name] = backward.max_pool2d_argmax(
                xs[0], (win.fh, win.fw), (win.sh, win.sw), win.pad, (win.dh, win.dw)
            )
        else:
            # never over an input: the backward pass may hold that array (a ReLU's output, say)
            out = model._apply(replace(step, in_place=None), xs)
        if layer.type in _SAVES_INPUT:
            saved[layer.name] = xs[0]
        elif layer.type in _SAVES_OUTPUT and (layer.type != "add" or layer.relu):
            saved[layer.name] = out
        values[layer.name] = out
        order.append(layer)
        for src in step.frees:
            del values[src]
    y = values[layer_name]
    k = y.shape[3]
    if not isinstance(channel, int):  # "top"
        channels = np.argmax(y.sum(axis=(1, 2), dtype=np.float64), axis=1)
    else:
        if not 0 <= channel < k:
            raise ModelError(
                f"target channel {channel} is out of range: {layer_name} has {k} channels "
                f"(0..{k - 1})",
                field="target",
            )
        channels = np.full(n, channel)
    kept = {name: values[name] for name in keep}
    del values, y
    g = np.zeros((n, *shapes[layer_name]), np.float32)
    g[np.arange(n), :, :, channels] = 1.0
    pending: dict[str, np.ndarray] = {layer_name: g}
    grads: dict[str, np.ndarray] = {}
    want = {IMAGE if name == INPUT else name for name in wanted}
    for layer in reversed(order):
        if layer.name not in pending:
            continue  # the target does not depend on it
        g = pending.pop(layer.name)
        if layer.name in want:
            grads[layer.name] = g
        if not want - set(grads):
            break
        hw = [shapes[src][:2] for src in layer.inputs]
        chans = [shapes[src][2] for src in layer.inputs]
        parts = _layer_backward(model, layer, g, hw, chans, saved.pop(layer.name, None))
        for src, part in zip(layer.inputs, parts, strict=True):
            pending[src] = part if src not in pending else pending[src] + part
    if IMAGE in pending and IMAGE in want:
        grads[IMAGE] = pending[IMAGE]
    out = {}
    for name in wanted:
        key = IMAGE if name == INPUT else name
        out[name] = grads.get(key)
        if out[name] is None:  # the objective does not depend on it
            out[name] = np.zeros((n, *shapes[key]), np.float32)
    return out, kept, channels


def _layer_backward(model, layer, g: np.ndarray, hw, chans, saved) -> list[np.ndarray]:
    """Return the gradients with respect to layer's inputs given g with respect to its output."""
    kind = layer.type
    a = model._arrays
    if kind == "relu":
        return [backward.relu_backward(saved, g)]
    if kind == "add":
        g = backward.relu_backward(saved, g) if layer.relu else g
        return [g] * len(layer.inputs)
    if kind == "concat":
        return backward_graph.concat_backward(g, chans)
    if kind == "batchnorm":
        scale, shift, mean, var = (a[k] for k in layer.arrays)
        return [backward_graph.batchnorm_backward(g, scale, shift, mean, var, layer.eps)]
    if kind == "lrn":
        return [
            backward_graph.lrn_backward(
                saved, g, layer.size or 1, layer.alpha, layer.beta, layer.lrn_bias
            )
        ]
    if kind == "softmax":
        return [backward_graph.softmax_backward(saved, g)]
    if kind == "sigmoid":
        return [backward_graph.sigmoid_backward(saved, g)]
    if kind == "tanh":
        return [backward_graph.tanh_backward(saved, g)]
    if kind == "clip":
        return [backward_graph.clip_backward(saved, g, layer.lo, layer.hi)]
    if kind == "globalavgpool":
        return [backward_graph.global_avg_pool_backward(g, hw[0])]
    if kind == "globalmaxpool":
        return [backward_graph.global_max_pool_backward(saved, g)]
    win = layer.window
    if win is None:  # every other type is windowed (layer_spec.WINDOWED)
        raise ModelError(
            f"{layer.name}: no backward pass for layer type {kind!r}", layer=layer.name
        )
    stride, pad, dilation = (win.sh, win.sw), win.pad, (win.dh, win.dw)
    if kind == "maxpool":
        return [backward.max_pool2d_backward_idx(saved, g, hw[0])]
    if kind == "avgpool":
        shape = (g.shape[0], *hw[0], g.shape[3])
        return [
            backward.avg_pool2d_backward(shape, g, (win.fh, win.fw), stride, pad, layer.count_pad)
        ]
    if kind == "conv":
        cg = _conv_grad(model, layer)
        return [backward.conv2d_backward_input(g, cg, hw[0], stride, pad, dilation)]
    if kind == "local":
        w = a[layer.weights]
        return [backward.local2d_backward_input(g, w, hw[0], stride, pad, dilation)]
    raise ModelError(f"{layer.name}: no backward pass for layer type {kind!r}", layer=layer.name)


def gradients(model, images, target, wrt=(INPUT,)) -> dict[str, np.ndarray]:
    """Return {name: d objective / d name} for each name in wrt (see the module docstring)."""
    return run_backward(model, images, target, wrt)[0]
