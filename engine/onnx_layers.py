"""Translate single ONNX nodes into convq layers: attributes, pads, NCHW weights to OHWI.

engine.onnx_import walks the graph and calls these; each appends to a Chain, which tracks the
activation's (C, H, W) as ONNX sees it so auto_pad, ceil_mode and Flatten can be resolved.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import ModelError


def fail(message: str, layer: str | None = None, field: str | None = None) -> ModelError:
    return ModelError(message, layer=layer, field=field)


class Chain:
    """The walk's state: the activation tensor, its (C, H, W), and the layers built so far."""

    def __init__(self, tensor: str, c: int, h: int | None, w: int | None):
        self.tensor, self.c, self.h, self.w = tensor, c, h, w
        self.flat = False  # after Flatten: ONNX holds (N, C*H*W) in NCHW order
        self.layers: list[dict] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def name(self, kind: str) -> str:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return f"{kind}{self.counts[kind]}"

    def sized(self, node) -> tuple[int, int]:
        if self.h is None or self.w is None:
            raise fail(
                f"{node.op_type} node {node.name!r} needs a fixed input height and width; "
                "export the model with a static input shape",
                field="input",
            )
        return self.h, self.w


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


def _window(node, a: dict, chain: Chain, kernel: tuple[int, int], defaults_stride=(1, 1)):
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
        h, w = chain.sized(node)
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


def _ceil_pads(node, chain: Chain, size, stride, pads, dilation, count_pad: bool):
    """Return pads that make floor rounding give ONNX's ceil_mode sizes (extra bottom/right pad)."""
    hw = chain.sized(node)
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


def advance(chain: Chain, layer: dict) -> None:
    """Append a windowed layer and update the tracked shape."""
    chain.layers.append(layer)
    if chain.h is not None:
        (fh, fw), (sh, sw), p, (dh, dw) = (
            layer["size"],
            layer["stride"],
            layer["pad"],
            layer.get("dilation", [1, 1]),
        )
        chain.h = _floor_out(chain.h, fh, sh, p[0], p[2], dh)
        chain.w = _floor_out(chain.w, fw, sw, p[1], p[3], dw)
        if chain.h < 1 or chain.w < 1:
            raise fail(
                f"{layer['name']}: window larger than its padded input", layer["name"], "size"
            )
    if "filters" in layer:
        chain.c = layer["filters"]


def conv(node, ins, consts, chain: Chain) -> None:
    a = attrs(node)
    if a.get("group", 1) != 1:
        raise fail(
            f"Conv node {node.name!r}: group={a['group']} (grouped/depthwise) is not supported",
            field="group",
        )
    w = consts[ins[1]]
    if w.ndim != 4 or w.shape[1] != chain.c:
        raise fail(
            f"Conv node {node.name!r}: weights {w.shape} do not fit {chain.c} input channels"
        )
    size, stride, pad, dilation = _window(node, a, chain, tuple(a.get("kernel_shape", w.shape[2:])))
    name = chain.name("conv")
    chain.arrays[f"{name}.w"] = w.transpose(0, 2, 3, 1)
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
    if len(ins) > 2 and ins[2]:
        chain.arrays[f"{name}.b"] = consts[ins[2]].reshape(-1)
        layer["bias"] = f"{name}.b"
    advance(chain, layer)


def pool(node, chain: Chain) -> None:
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
    kernel = tuple(a["kernel_shape"])
    size, stride, pad, dilation = _window(node, a, chain, kernel)
    count_pad = bool(a.get("count_include_pad", 0))
    if a.get("ceil_mode", 0):
        pad = _ceil_pads(node, chain, size, stride, pad, dilation, average and count_pad)
    name = chain.name("avgpool" if average else "maxpool")
    layer = {
        "name": name,
        "type": "avgpool" if average else "maxpool",
        "size": size,
        "stride": stride,
        "pad": pad,
    }
    if average:
        layer["count_pad"] = count_pad
    else:
        layer["dilation"] = dilation
    advance(chain, layer)


def dense(node, weight: np.ndarray, bias, chain: Chain) -> None:
    """Add a fully-connected layer, weight (F_in, K), as a conv over the whole remaining extent."""
    if not chain.flat and (chain.h, chain.w) != (1, 1):
        raise fail(f"{node.op_type} node {node.name!r} must follow Flatten")
    h, w = chain.sized(node) if chain.flat else (1, 1)
    if weight.ndim != 2 or weight.shape[0] != chain.c * h * w:
        raise fail(
            f"{node.op_type} node {node.name!r}: weights {weight.shape} do not take "
            f"{chain.c * h * w} inputs"
        )
    k = weight.shape[1]
    name = chain.name("fc")
    # ONNX flattened NCHW: column index c*H*W + y*W + x; our window is (y, x, c).
    chain.arrays[f"{name}.w"] = weight.T.reshape(k, chain.c, h, w).transpose(0, 2, 3, 1)
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
        chain.arrays[f"{name}.b"] = np.broadcast_to(np.asarray(bias).reshape(-1), (k,)).copy()
        layer["bias"] = f"{name}.b"
    chain.flat = False
    chain.h, chain.w = 1, 1
    chain.layers.append(layer)
    chain.c = int(k)


def add_bias(node, value: np.ndarray, chain: Chain) -> None:
    """Fold Add(x, constant) into the bias of the conv or fc layer that made x."""
    last = chain.layers[-1] if chain.layers else {}
    k = int(last.get("filters") or 0)
    if last.get("type") != "conv" or last.get("bias") is not None:
        raise fail(
            f"Add node {node.name!r}: only a bias added straight after Conv, Gemm or "
            "MatMul is supported",
            field="op",
        )
    # The constant must broadcast along channels only: (K,) after an fc's (N, K),
    # (K, 1, 1) after a conv's (N, K, H, W).
    dense = last["name"].startswith("fc")
    shape = tuple(d for d in value.shape)
    squeezed = tuple(d for d in shape if d != 1) or (1,)
    ok = squeezed in ((k,), (1,)) and (dense or len(shape) >= 3 or value.size == 1)
    if not ok:
        raise fail(
            f"Add node {node.name!r}: constant of shape {shape} is not a per-channel bias "
            f"for {k} channels",
            field="op",
        )
    name = f"{last['name']}.b"
    chain.arrays[name] = np.broadcast_to(value.reshape(-1), (k,)).copy()
    last["bias"] = name


def gemm(node, ins, consts, chain: Chain) -> None:
    a = attrs(node)
    if a.get("transA", 0):
        raise fail(f"Gemm node {node.name!r}: transA=1 is not supported", field="transA")
    b = consts[ins[1]]
    weight = (b.T if a.get("transB", 0) else b) * np.float32(a.get("alpha", 1.0))
    bias = consts[ins[2]] * np.float32(a.get("beta", 1.0)) if len(ins) > 2 and ins[2] else None
    dense(node, weight, bias, chain)


def flatten(node, chain: Chain, consts, ins) -> None:
    if node.op_type == "Flatten":
        if attrs(node).get("axis", 1) != 1:
            raise fail(f"Flatten node {node.name!r}: only axis=1 is supported", field="axis")
    else:
        shape = [int(v) for v in consts[ins[1]].reshape(-1)]
        total = chain.c * chain.h * chain.w if chain.h is not None and chain.w is not None else None
        if len(shape) != 2 or shape[1] not in (-1, total) or shape[0] not in (-1, 0, 1):
            raise fail(f"Reshape node {node.name!r}: only a flatten to (N, -1) is supported")
    chain.flat = True


def global_pool(node, chain: Chain) -> None:
    """GlobalAveragePool / GlobalMaxPool: a pool whose window is the whole remaining extent."""
    h, w = chain.sized(node)
    average = node.op_type == "GlobalAveragePool"
    kind = "avgpool" if average else "maxpool"
    layer: dict[str, object] = {
        "name": chain.name(kind),
        "type": kind,
        "size": [h, w],
        "stride": [1, 1],
        "pad": [0, 0, 0, 0],
    }
    layer |= {"count_pad": False} if average else {"dilation": [1, 1]}
    advance(chain, layer)
