"""ONNX windowed nodes as convq layers: Conv (any group), MaxPool, AveragePool and Pad.

Resolves auto_pad, ceil_mode and a constant Pad folded into the window; weights NCHW -> OHWI.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .onnx_graph import Graph, Value, attrs, fail, sized


def _window(node, a: dict, v: Value, kernel: tuple, defaults_stride=(1, 1)):
    """Return (size, stride, pad [t, l, b, r], dilation) from ONNX attributes and auto_pad."""
    if len(kernel) != 2:
        raise fail(
            f"{node.op_type} node {node.name!r}: only 2-D windows are supported, got {kernel}"
        )
    stride = tuple(a.get("strides", defaults_stride))
    dilation = tuple(a.get("dilations", (1, 1)))
    pads = list(a.get("pads", (0, 0, 0, 0)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto == "VALID":
        pads = [0, 0, 0, 0]
    elif auto in ("SAME_UPPER", "SAME_LOWER"):
        h, w = sized(node, v)
        for axis, n in enumerate((h, w)):
            extent = dilation[axis] * (kernel[axis] - 1) + 1
            total = max((math.ceil(n / stride[axis]) - 1) * stride[axis] + extent - n, 0)
            small, big = total // 2, total - total // 2
            pads[axis], pads[axis + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto != "NOTSET":
        raise fail(
            f"{node.op_type} node {node.name!r}: unknown auto_pad {auto!r}", field="auto_pad"
        )
    if len(stride) != 2 or len(dilation) != 2 or len(pads) != 4:
        raise fail(f"{node.op_type} node {node.name!r}: expected 2-D strides, dilations and pads")
    return list(kernel), list(stride), pads, list(dilation)


def _floor_out(n, f, s, lo, hi, d):
    return (n + lo + hi - d * (f - 1) - 1) // s + 1


def _ceil_pads(node, v: Value, size, stride, pads, dilation, count_pad: bool):
    """Return pads that make floor rounding give ONNX's ceil_mode sizes (extra bottom/right pad)."""
    hw = sized(node, v)
    pads = list(pads)
    for axis, n in enumerate(hw):
        f, s, d = size[axis], stride[axis], dilation[axis]
        lo, hi = pads[axis], pads[axis + 2]
        floor = _floor_out(n, f, s, lo, hi, d)
        ceil = -(-(n + lo + hi - d * (f - 1) - 1) // s) + 1
        if (ceil - 1) * s >= n + lo:  # the last window must start inside the input or its pad
            ceil -= 1
        if ceil == floor:
            continue
        if count_pad:
            raise fail(
                f"{node.op_type} node {node.name!r}: ceil_mode with count_include_pad=1 "
                "changes the divisor at the edge in a way convq does not model; export "
                "with ceil_mode=False",
                field="ceil_mode",
            )
        pads[axis + 2] = hi + (ceil - 1) * s + d * (f - 1) + 1 - (n + lo + hi)
    return pads


def _fold_pad(node, v: Value, pads: list) -> tuple[Value, list]:
    """Add a pending constant Pad to a window's pads; return the unpadded value and the pads."""
    if v.pad is None:
        return v, pads
    extra = v.pad[:4]
    h = None if v.h is None else v.h - extra[0] - extra[2]
    w = None if v.w is None else v.w - extra[1] - extra[3]
    return replace(v, h=h, w=w, pad=None), [p + e for p, e in zip(pads, extra, strict=True)]


def _windowed(graph: Graph, node, v: Value, layer: dict, c: int, nonneg=False) -> Value:
    """Add a conv or pool layer and work out its output (C, H, W) the way `fit: floor` does."""
    h = w = None
    if v.h is not None:
        (fh, fw), (sh, sw), p, (dh, dw) = (
            layer["size"],
            layer["stride"],
            layer["pad"],
            layer.get("dilation", [1, 1]),
        )
        h = _floor_out(v.h, fh, sh, p[0], p[2], dh)
        w = _floor_out(v.w, fw, sw, p[1], p[3], dw)
        if h < 1 or w < 1:
            raise fail(
                f"{layer['name']}: window larger than its padded input", layer["name"], "size"
            )
    return graph.add(node, layer, [v], Value(layer["name"], c, h, w, nonneg=nonneg))


def conv(graph: Graph, node, v: Value, ins, consts) -> Value:
    a = attrs(node)
    groups = int(a.get("group", 1))
    w = consts[ins[1]]
    if groups < 1 or v.c % groups or w.ndim != 4 or w.shape[0] % groups:
        raise fail(
            f"Conv node {node.name!r}: group={groups} must divide the {v.c} input channels and "
            f"the filters of weights {w.shape}",
            field="group",
        )
    if w.shape[1] * groups != v.c:
        raise fail(
            f"Conv node {node.name!r}: weights {w.shape} with group={groups} do not fit "
            f"{v.c} input channels"
        )
    size, stride, pad, dilation = _window(node, a, v, tuple(a.get("kernel_shape", w.shape[2:])))
    v, pad = _fold_pad(node, v, pad)
    name = graph.name(node)
    graph.arrays[f"{name}.w"] = w.transpose(0, 2, 3, 1)
    layer = {
        "name": name,
        "type": "conv",
        "filters": int(w.shape[0]),
        "size": size,
        "stride": stride,
        "pad": pad,
        "dilation": dilation,
        "bias": None,
    }
    if groups != 1:
        layer["groups"] = groups
    if len(ins) > 2 and ins[2]:
        graph.arrays[f"{name}.b"] = consts[ins[2]].reshape(-1)
        layer["bias"] = f"{name}.b"
    out = _windowed(graph, node, v, layer, int(w.shape[0]))
    graph.bias_owner[name] = node.output[0]
    return out


def pool(graph: Graph, node, v: Value) -> Value:
    a = attrs(node)
    if len(node.output) > 1 and node.output[1]:
        raise fail(f"MaxPool node {node.name!r}: the Indices output is not supported")
    average = node.op_type == "AveragePool"
    if average and tuple(a.get("dilations", (1, 1))) != (1, 1):
        raise fail(
            f"AveragePool node {node.name!r}: dilations are not supported", field="dilations"
        )
    if "kernel_shape" not in a:
        raise fail(f"{node.op_type} node {node.name!r} has no kernel_shape", field="kernel_shape")
    size, stride, pad, dilation = _window(node, a, v, tuple(a["kernel_shape"]))
    count_pad = bool(a.get("count_include_pad", 0))
    if v.pad is not None:
        fill = v.pad[4]
        if average and (count_pad or not any(pad)):
            count_pad = True  # the Pad's zeros are real elements to ONNX: count them
        elif average or not (fill == -np.inf or (fill == 0 and v.nonneg)):
            raise fail(
                f"{node.op_type} node {node.name!r}: a Pad of {fill} before it cannot be "
                "folded into its window (convq folds zeros before an average pool without "
                "pads of its own, and -inf, or zeros after ReLU, before a max pool)",
                field="pads",
            )
        v, pad = _fold_pad(node, v, pad)
    if a.get("ceil_mode", 0):
        pad = _ceil_pads(node, v, size, stride, pad, dilation, average and count_pad)
    kind = "avgpool" if average else "maxpool"
    layer = {"name": graph.name(node), "type": kind, "size": size, "stride": stride, "pad": pad}
    if average:
        layer["count_pad"] = count_pad
    else:
        layer["dilation"] = dilation
    return _windowed(graph, node, v, layer, v.c, nonneg=v.nonneg)


def pad(graph: Graph, node, v: Value, ins, consts, opset: int) -> Value:
    """Constant Pad on H and W only: remembered on the value, folded into the next window."""
    a = attrs(node)
    mode = a.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if opset < 11:
        pads, fill = list(a.get("pads", ())), float(a.get("value", 0.0))
    else:
        pads = [int(p) for p in consts[ins[1]].reshape(-1)]
        fill = float(consts[ins[2]].reshape(-1)[0]) if len(ins) > 2 and ins[2] else 0.0
        if len(ins) > 3 and ins[3]:
            raise fail(f"Pad node {node.name!r}: the axes input is not supported", field="axes")
    if mode != "constant" or len(pads) != 8 or any(pads[i] for i in (0, 1, 4, 5)) or v.flat:
        raise fail(
            f"Pad node {node.name!r}: only a constant pad of height and width is supported, "
            f"got mode {mode!r} and pads {pads}",
            field="pads",
        )
    if min(pads) < 0 or v.pad is not None:
        raise fail(f"Pad node {node.name!r}: negative or repeated pads are not supported")
    extra = (pads[2], pads[3], pads[6], pads[7], fill)
    h = None if v.h is None else v.h + pads[2] + pads[6]
    w = None if v.w is None else v.w + pads[3] + pads[7]
    out = replace(v, h=h, w=w, pad=extra)
    graph.values[node.output[0]] = out
    return out
