"""ONNX nodes other than windows as convq layers: Gemm/MatMul, bias Add, Flatten, global pools,
BatchNormalization, LRN, Softmax, Relu/Sigmoid/Tanh/Clip, and Add/Sum/Concat of activations.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .onnx_graph import BATCH, Graph, Value, attrs, fail, sized


def dense(graph: Graph, node, v: Value, weight: np.ndarray, bias) -> Value:
    """Add a fully-connected layer, weight (F_in, K), as a conv over the whole remaining extent."""
    if not v.flat and (v.h, v.w) != (1, 1):
        raise fail(f"{node.op_type} node {node.name!r} must follow Flatten")
    h, w = sized(node, v) if v.flat else (1, 1)
    if weight.ndim != 2 or weight.shape[0] != v.c * h * w:
        raise fail(
            f"{node.op_type} node {node.name!r}: weights {weight.shape} do not take "
            f"{v.c * h * w} inputs"
        )
    k = weight.shape[1]
    name = graph.name(node)
    # ONNX flattened NCHW: column index c*H*W + y*W + x; our window is (y, x, c).
    graph.arrays[f"{name}.w"] = weight.T.reshape(k, v.c, h, w).transpose(0, 2, 3, 1)
    layer = {
        "name": name,
        "type": "conv",
        "filters": int(k),
        "size": [h, w],
        "stride": [1, 1],
        "pad": [0, 0, 0, 0],
        "dilation": [1, 1],
        "bias": None,
    }
    if bias is not None:
        graph.arrays[f"{name}.b"] = np.broadcast_to(np.asarray(bias).reshape(-1), (k,)).copy()
        layer["bias"] = f"{name}.b"
    out = graph.add(node, layer, [v], Value(name, int(k), 1, 1, rank=2))
    graph.bias_owner[name] = node.output[0]
    return out


def add_bias(graph: Graph, node, v: Value, value: np.ndarray) -> Value:
    """Fold Add(x, constant) into the bias of the conv or fc layer that made x."""
    last = next((layer for layer in graph.layers if layer["name"] == v.layer), {})
    k = int(last.get("filters") or 0)
    ok_owner = graph.bias_owner.get(v.layer) is not None and not v.flat and v.pad is None
    if last.get("type") != "conv" or last.get("bias") is not None or not ok_owner:
        raise fail(
            f"Add node {node.name!r}: only a bias added straight after Conv, Gemm or "
            "MatMul is supported",
            field="op",
        )
    # The constant must broadcast along channels only: (K,) after an fc's (N, K),
    # (K, 1, 1) after a conv's (N, K, H, W).
    shape = tuple(value.shape)
    squeezed = tuple(d for d in shape if d != 1) or (1,)
    fc = (v.h, v.w) == (1, 1)
    if not (squeezed in ((k,), (1,)) and (fc or len(shape) >= 3 or value.size == 1)):
        raise fail(
            f"Add node {node.name!r}: constant of shape {shape} is not a per-channel bias "
            f"for {k} channels",
            field="op",
        )
    name = f"{last['name']}.b"
    graph.arrays[name] = np.broadcast_to(value.reshape(-1), (k,)).copy()
    last["bias"] = name
    graph.values[node.output[0]] = v
    graph.tensors[v.layer] = node.output[0]
    return v


def gemm(graph: Graph, node, v: Value, ins, consts) -> Value:
    a = attrs(node)
    if a.get("transA", 0):
        raise fail(f"Gemm node {node.name!r}: transA=1 is not supported", field="transA")
    b = consts[ins[1]]
    weight = (b.T if a.get("transB", 0) else b) * np.float32(a.get("alpha", 1.0))
    bias = consts[ins[2]] * np.float32(a.get("beta", 1.0)) if len(ins) > 2 and ins[2] else None
    return dense(graph, node, v, weight, bias)


def flatten(graph: Graph, node, v: Value, consts, ins) -> Value:
    """Flatten / Reshape to (N, -1): no layer; the next Gemm reads the NCHW order."""
    if node.op_type == "Flatten":
        if attrs(node).get("axis", 1) != 1:
            raise fail(f"Flatten node {node.name!r}: only axis=1 is supported", field="axis")
    else:
        target = np.asarray(consts[ins[1]]).reshape(-1)
        # Shape(x)[0] (the batch, unknown at import) in the first place keeps the batch
        shape = [0 if i == 0 and s == BATCH else int(s) for i, s in enumerate(target)]
        total = v.c * v.h * v.w if v.h is not None and v.w is not None else None
        if len(shape) != 2 or shape[1] not in (-1, total) or shape[0] not in (-1, 0, 1):
            raise fail(f"Reshape node {node.name!r}: only a flatten to (N, -1) is supported")
    out = replace(v, rank=2) if (v.h, v.w) == (1, 1) else replace(v, flat=True, rank=2)
    graph.values[node.output[0]] = out
    return out


def global_pool(graph: Graph, node, v: Value) -> Value:
    """GlobalAveragePool / GlobalMaxPool: (N, 1, 1, C).

    With a fixed H x W it is a pool whose window is the whole extent (the same sums); with a
    symbolic one, a globalavgpool / globalmaxpool layer that takes any size.
    """
    average = node.op_type in ("GlobalAveragePool", "ReduceMean")
    name = graph.name(node)
    layer: dict
    if v.h is None or v.w is None:
        layer = {"name": name, "type": "globalavgpool" if average else "globalmaxpool"}
    else:
        kind = "avgpool" if average else "maxpool"
        layer = {"name": name, "type": kind, "size": [v.h, v.w], "stride": [1, 1]}
        layer |= {"pad": [0, 0, 0, 0]}
        layer |= {"count_pad": False} if average else {"dilation": [1, 1]}
    return graph.add(node, layer, [v], Value(name, v.c, 1, 1, nonneg=v.nonneg))


def batchnorm(graph: Graph, node, v: Value, ins, consts) -> Value:
    a = attrs(node)
    if a.get("training_mode", 0) or len(node.output) > 1 and any(node.output[1:]):
        raise fail(
            f"BatchNormalization node {node.name!r}: only inference mode is supported",
            field="training_mode",
        )
    if len(ins) != 5:
        raise fail(f"BatchNormalization node {node.name!r} needs 5 inputs, has {len(ins)}")
    name = graph.name(node)
    for key, tensor in zip(("scale", "shift", "mean", "var"), ins[1:], strict=True):
        value = consts[tensor].reshape(-1)
        if value.shape != (v.c,):
            raise fail(
                f"BatchNormalization node {node.name!r}: {key} has shape {consts[tensor].shape}, "
                f"expected ({v.c},)",
                field=key,
            )
        graph.arrays[f"{name}.{key}"] = value
    layer = {"name": name, "type": "batchnorm", "eps": float(a.get("epsilon", 1e-5))}
    return graph.add(node, layer, [v], replace(v, nonneg=False))


def lrn(graph: Graph, node, v: Value) -> Value:
    a = attrs(node)
    if "size" not in a:
        raise fail(f"LRN node {node.name!r} has no size", field="size")
    layer = {
        "name": graph.name(node),
        "type": "lrn",
        "size": int(a["size"]),
        "alpha": float(a.get("alpha", 1e-4)),
        "beta": float(a.get("beta", 0.75)),
        "bias": float(a.get("bias", 1.0)),
    }
    return graph.add(node, layer, [v], v)


def softmax(graph: Graph, node, v: Value, opset: int) -> Value:
    axis = int(attrs(node).get("axis", 1 if opset < 13 else -1))
    axis = axis + v.rank if axis < 0 else axis
    if opset < 13:  # softmax over everything from axis on: channels only when H = W = 1
        channel = axis == 1 and (v.rank == 2 or (v.h, v.w) == (1, 1))
    else:
        channel = axis == 1
    if not channel or (v.flat and (v.h, v.w) != (1, 1)):
        raise fail(
            f"Softmax node {node.name!r}: only a softmax over channels is supported "
            f"(axis={axis}, opset {opset}, input rank {v.rank}, H x W {v.h} x {v.w})",
            field="axis",
        )
    layer = {"name": graph.name(node), "type": "softmax"}
    return graph.add(node, layer, [v], replace(v, nonneg=True))


def elementwise(graph: Graph, node, v: Value, ins, consts, opset: int) -> Value:
    """Relu, Sigmoid, Tanh, Clip: one layer each, shape unchanged (a pending Flatten stays)."""
    op = node.op_type
    layer: dict = {"name": graph.name(node), "type": op.lower()}
    nonneg = op in ("Relu", "Sigmoid")
    if op == "Clip":
        if opset < 11:
            a = attrs(node)
            lo, hi = a.get("min"), a.get("max")
        else:
            lo = float(consts[ins[1]].reshape(-1)[0]) if len(ins) > 1 and ins[1] else None
            hi = float(consts[ins[2]].reshape(-1)[0]) if len(ins) > 2 and ins[2] else None
        if lo is not None and math.isfinite(lo):
            layer["min"] = float(lo)
        if hi is not None and math.isfinite(hi):
            layer["max"] = float(hi)
        nonneg = lo is not None and lo >= 0
    if v.pad is not None:
        raise fail(f"{op} node {node.name!r} follows a Pad; convq folds Pad into a conv or pool")
    return graph.add(node, layer, [v], replace(v, nonneg=nonneg))


def merge(graph: Graph, node, vs: list[Value], opset: int) -> Value:
    """Add / Sum of activations (equal shapes) or Concat along channels (equal H x W)."""
    op = node.op_type
    for v in vs:
        if v.pad is not None or (v.flat and (v.h, v.w) != (1, 1)):
            raise fail(f"{op} node {node.name!r}: its inputs must be plain (N, C, H, W) maps")
    if op == "Concat":
        axis = int(attrs(node).get("axis", 1))
        if (axis + vs[0].rank if axis < 0 else axis) != 1:
            raise fail(
                f"Concat node {node.name!r}: only a concat along channels (axis 1) is "
                f"supported, got axis {axis}",
                field="axis",
            )
        if len({(v.h, v.w) for v in vs}) > 1:
            raise fail(f"Concat node {node.name!r}: inputs differ in height x width")
        out = Value("", sum(v.c for v in vs), vs[0].h, vs[0].w, nonneg=all(v.nonneg for v in vs))
        return graph.add(node, {"name": graph.name(node), "type": "concat"}, vs, out)
    if len({(v.c, v.h, v.w) for v in vs}) > 1:
        shapes = [(v.c, v.h, v.w) for v in vs]
        raise fail(f"{op} node {node.name!r}: inputs differ in shape {shapes} (no broadcasting)")
    out = replace(vs[0], nonneg=all(v.nonneg for v in vs))
    return graph.add(node, {"name": graph.name(node), "type": "add"}, vs, out)


def gather_channels(graph: Graph, node, v: Value, index: np.ndarray) -> Value:
    """Gather along channels (x[:, i] or x[:, [i, j]]) as a 1x1 conv of one-hot filters.

    A scalar index drops the channel axis (rank 3) until an Unsqueeze puts it back, as
    torchvision's GoogLeNet and Inception-v3 do with transform_input.
    """
    axis = int(attrs(node).get("axis", 0))
    if v.flat or v.pad is not None or v.rank != 4 or (axis + 4 if axis < 0 else axis) != 1:
        raise fail(
            f"Gather node {node.name!r}: only picking channels (axis 1) of an (N, C, H, W) map "
            "is supported",
            field="axis",
        )
    picks = np.asarray(index).reshape(-1).astype(np.int64)
    if np.asarray(index).ndim > 1 or not ((-v.c <= picks) & (picks < v.c)).all():
        raise fail(f"Gather node {node.name!r}: indices {index.tolist()} are not channels of {v.c}")
    name = graph.name(node)
    k = len(picks)
    w = np.zeros((k, 1, 1, v.c), np.float32)
    w[np.arange(k), 0, 0, picks % v.c] = 1.0
    graph.arrays[f"{name}.w"] = w
    layer = {"name": name, "type": "conv", "filters": k, "size": [1, 1], "bias": None}
    rank = 3 if np.asarray(index).ndim == 0 else 4
    out = graph.add(node, layer, [v], Value(name, k, v.h, v.w, nonneg=v.nonneg, rank=rank))
    graph.bias_owner[name] = node.output[0]
    return out


def unsqueeze(graph: Graph, node, v: Value, axes) -> Value:
    """Unsqueeze(axes=[1]) of a channel Gather's (N, H, W): the (N, 1, H, W) map again."""
    axes = [int(a) for a in np.asarray(axes).reshape(-1)]
    if v.rank != 3 or axes not in ([1], [-3]):
        raise fail(
            f"Unsqueeze node {node.name!r}: only restoring the channel axis a Gather of one "
            "channel removed is supported",
            field="axes",
        )
    out = replace(v, rank=4)
    graph.values[node.output[0]] = out
    return out


def scale(graph: Graph, node, v: Value, value: np.ndarray) -> Value:
    """Fold Mul(x, constant) into the weights (and bias) of the conv or fc layer that made x."""
    last = next((layer for layer in graph.layers if layer["name"] == v.layer), {})
    k = int(last.get("filters") or 0)
    owner = graph.bias_owner.get(v.layer) is not None and not v.flat and v.pad is None
    shape = tuple(value.shape)
    squeezed = tuple(d for d in shape if d != 1) or (1,)
    fc = (v.h, v.w) == (1, 1)
    per_channel = squeezed in ((k,), (1,)) and (fc or len(shape) >= 3 or value.size == 1)
    if last.get("type") != "conv" or not owner or not per_channel:
        raise fail(
            f"Mul node {node.name!r}: only a per-channel constant scale straight after Conv, "
            "Gemm, MatMul or a channel Gather is supported",
            field="op",
        )
    factor = np.broadcast_to(value.reshape(-1).astype(np.float64), (k,))
    w = f"{last['name']}.w"
    graph.arrays[w] = (graph.arrays[w] * factor[:, None, None, None]).astype(np.float32)
    if last.get("bias") is not None:
        b = last["bias"]
        graph.arrays[b] = (graph.arrays[b] * factor).astype(np.float32)
    graph.values[node.output[0]] = v
    graph.tensors[v.layer] = node.output[0]
    return v


def reduce_spatial(graph: Graph, node, v: Value, axes) -> Value:
    """ReduceMean / ReduceMax over height and width (the dynamo exporter's adaptive pool to 1):
    a global pool; without keepdims the (N, C) result a Gemm may read."""
    a = attrs(node)
    axes = a.get("axes", axes)
    picked = sorted(int(x) % 4 for x in np.asarray(axes if axes is not None else []).reshape(-1))
    if v.flat or v.rank != 4 or picked != [2, 3] or a.get("noop_with_empty_axes", 0):
        raise fail(
            f"{node.op_type} node {node.name!r}: only a reduction over height and width (axes "
            f"2 and 3) of an (N, C, H, W) map is supported, got axes {picked}",
            field="axes",
        )
    out = global_pool(graph, node, v)
    if not a.get("keepdims", 1):
        out = replace(out, rank=2)
        graph.values[node.output[0]] = out
    return out
