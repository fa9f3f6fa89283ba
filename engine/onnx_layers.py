"""Translate single ONNX nodes into convq layers: attributes, pads, NCHW weights to OHWI.

engine.onnx_import walks the graph and calls these. Each reads the Values of its inputs (the
(C, H, W) ONNX sees for a tensor and the convq layer that holds it) and adds one layer to the
Graph, so auto_pad, ceil_mode, a folded Pad and Flatten can be resolved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .errors import ModelError


def fail(message: str, layer: str | None = None, field: str | None = None) -> ModelError:
    return ModelError(message, layer=layer, field=field)


@dataclass(frozen=True)
class Value:
    """An activation tensor: the layer that holds it ('image' for the input) and its ONNX shape.

    flat: ONNX holds it as (N, C*H*W) in NCHW order (after Flatten); pad: a constant Pad
    [top, left, bottom, right, value] waiting to be folded into the next conv or pool;
    nonneg: every element is >= 0 (so a zero pad before a max pool changes nothing);
    rank: 4 for (N, C, H, W), 2 for (N, C) after Flatten or Gemm.
    """

    layer: str
    c: int
    h: int | None
    w: int | None
    flat: bool = False
    pad: tuple | None = None
    nonneg: bool = False
    rank: int = 4


class Graph:
    """The walk's state: ONNX tensor name -> Value, the layers built so far and their arrays."""

    def __init__(self, names: dict[str, str]):
        self.values: dict[str, Value] = {}
        self.layers: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.node_names = names  # node.output[0] -> the layer name that node gets
        self.bias_owner: dict[str, str] = {}  # layer -> the tensor it outputs, for Add folding
        self.tensors: dict[str, str] = {}  # layer -> the ONNX tensor holding the same values

    def add(self, node, layer: dict, sources: list[Value], out: Value) -> Value:
        """Append layer (named after node) reading sources; map node's output to out."""
        name = layer["name"]
        previous = self.layers[-1]["name"] if self.layers else "image"
        if len(sources) == 1:
            if sources[0].layer != previous:
                layer["input"] = sources[0].layer
        else:
            layer["inputs"] = [s.layer for s in sources]
        self.layers.append(layer)
        self.tensors[name] = node.output[0]
        out = replace(out, layer=name)
        self.values[node.output[0]] = out
        return out

    def name(self, node) -> str:
        return self.node_names[node.output[0]]


def sized(node, v: Value) -> tuple[int, int]:
    if v.h is None or v.w is None:
        raise fail(
            f"{node.op_type} node {node.name!r} needs a fixed input height and width; "
            "export the model with a static input shape",
            field="input",
        )
    return v.h, v.w


def attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def array(tensor) -> np.ndarray:
    import onnx

    # External data would make onnx read files named by the upload: never follow it.
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise fail(
            f"tensor {tensor.name!r} uses external data; convq takes self-contained .onnx files",
            field="weights",
        )
    try:
        return onnx.numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as err:
        raise fail(f"tensor {tensor.name!r} is unreadable: {err}", field="weights") from None


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
        shape = [int(s) for s in consts[ins[1]].reshape(-1)]
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
    average = node.op_type == "GlobalAveragePool"
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
