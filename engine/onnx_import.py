"""Turn an ONNX ConvNet (e.g. a PyTorch export) into a convq spec plus OHWI float32 arrays.

Imports a straight chain of Conv (group 1), Relu, MaxPool, AveragePool, Flatten/Reshape then
Gemm or MatMul(+Add), with Identity, Dropout and Constant folded away. ONNX pads are
[top, left, bottom, right], like ours; NCHW weights are moved to OHWI here, and a Gemm after
Flatten becomes a conv over the whole remaining H x W x C extent (its weight columns permuted
from NCHW flatten order to ours). The spec uses `fit: floor`, ONNX's rounding.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .errors import ModelError

MAX_ONNX_BYTES = 1 << 30
"""Largest .onnx accepted (bytes)."""
SUPPORTED = (
    "Conv, Relu, MaxPool, AveragePool, Flatten, Reshape, Gemm, MatMul, Add (a bias), Identity, "
    "Dropout, Constant"
)
_FLOAT = 1  # onnx.TensorProto.FLOAT


def _fail(message: str, layer: str | None = None, field: str | None = None) -> ModelError:
    return ModelError(message, layer=layer, field=field)


class _Chain:
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
        if self.h is None:
            raise _fail(
                f"{node.op_type} node {node.name!r} needs a fixed input height and width; "
                "export the model with a static input shape",
                field="input",
            )
        return self.h, self.w


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _array(tensor) -> np.ndarray:
    import onnx

    # External data would make onnx read files named by the upload: never follow it.
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise _fail(
            f"tensor {tensor.name!r} uses external data; convq takes self-contained .onnx files",
            field="weights",
        )
    try:
        return onnx.numpy_helper.to_array(tensor)
    except (ValueError, TypeError, KeyError) as err:
        raise _fail(f"tensor {tensor.name!r} is unreadable: {err}", field="weights") from None


def _window(node, a: dict, chain: _Chain, kernel: tuple[int, int], defaults_stride=(1, 1)):
    """Return (size, stride, pad [t, l, b, r], dilation) from ONNX attributes and auto_pad."""
    if len(kernel) != 2:
        raise _fail(
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
        raise _fail(
            f"{node.op_type} node {node.name!r}: unknown auto_pad {auto!r}", field="auto_pad"
        )
    if len(stride) != 2 or len(dilation) != 2 or len(pads) != 4:
        raise _fail(f"{node.op_type} node {node.name!r}: expected 2-D strides, dilations and pads")
    return list(kernel), list(stride), pads, list(dilation)


def _floor_out(n, f, s, lo, hi, d):
    return (n + lo + hi - d * (f - 1) - 1) // s + 1


def _ceil_pads(node, chain: _Chain, size, stride, pads, dilation, count_pad: bool):
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
            raise _fail(
                f"{node.op_type} node {node.name!r}: ceil_mode with count_include_pad=1 "
                "changes the divisor at the edge in a way convq does not model; export "
                "with ceil_mode=False",
                field="ceil_mode",
            )
        pads[axis + 2] = hi + (ceil - 1) * s + d * (f - 1) + 1 - (n + lo + hi)
    return pads


def _advance(chain: _Chain, layer: dict) -> None:
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
            raise _fail(
                f"{layer['name']}: window larger than its padded input", layer["name"], "size"
            )
    if "filters" in layer:
        chain.c = layer["filters"]


def _conv(node, ins, consts, chain: _Chain) -> None:
    a = _attrs(node)
    if a.get("group", 1) != 1:
        raise _fail(
            f"Conv node {node.name!r}: group={a['group']} (grouped/depthwise) is not supported",
            field="group",
        )
    w = consts[ins[1]]
    if w.ndim != 4 or w.shape[1] != chain.c:
        raise _fail(
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
    _advance(chain, layer)


def _pool(node, chain: _Chain) -> None:
    a = _attrs(node)
    if len(node.output) > 1 and node.output[1]:
        raise _fail(f"MaxPool node {node.name!r}: the Indices output is not supported")
    average = node.op_type == "AveragePool"
    if average and tuple(a.get("dilations", (1, 1))) != (1, 1):
        raise _fail(
            f"AveragePool node {node.name!r}: dilations are not supported", field="dilations"
        )
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
    _advance(chain, layer)


def _dense(node, weight: np.ndarray, bias, chain: _Chain) -> None:
    """Add a fully-connected layer, weight (F_in, K), as a conv over the whole remaining extent."""
    if not chain.flat and (chain.h, chain.w) != (1, 1):
        raise _fail(f"{node.op_type} node {node.name!r} must follow Flatten")
    h, w = chain.sized(node) if chain.flat else (1, 1)
    if weight.ndim != 2 or weight.shape[0] != chain.c * h * w:
        raise _fail(
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


def _add_bias(node, value: np.ndarray, chain: _Chain) -> None:
    """Fold Add(x, constant) into the bias of the conv or fc layer that made x."""
    last = chain.layers[-1] if chain.layers else {}
    k = last.get("filters")
    if last.get("type") != "conv" or last.get("bias") is not None:
        raise _fail(
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
        raise _fail(
            f"Add node {node.name!r}: constant of shape {shape} is not a per-channel bias "
            f"for {k} channels",
            field="op",
        )
    name = f"{last['name']}.b"
    chain.arrays[name] = np.broadcast_to(value.reshape(-1), (k,)).copy()
    last["bias"] = name


def _gemm(node, ins, consts, chain: _Chain) -> None:
    a = _attrs(node)
    if a.get("transA", 0):
        raise _fail(f"Gemm node {node.name!r}: transA=1 is not supported", field="transA")
    b = consts[ins[1]]
    weight = (b.T if a.get("transB", 0) else b) * np.float32(a.get("alpha", 1.0))
    bias = consts[ins[2]] * np.float32(a.get("beta", 1.0)) if len(ins) > 2 and ins[2] else None
    _dense(node, weight, bias, chain)


def _flatten(node, chain: _Chain, consts, ins) -> None:
    if node.op_type == "Flatten":
        if _attrs(node).get("axis", 1) != 1:
            raise _fail(f"Flatten node {node.name!r}: only axis=1 is supported", field="axis")
    else:
        shape = [int(v) for v in consts[ins[1]].reshape(-1)]
        total = chain.c * chain.h * chain.w if chain.h is not None else None
        if len(shape) != 2 or shape[1] not in (-1, total) or shape[0] not in (-1, 0, 1):
            raise _fail(f"Reshape node {node.name!r}: only a flatten to (N, -1) is supported")
    chain.flat = True


def _name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.:\-]+", "-", raw or "").strip("-._:")[:128]
    return name or "onnx-model"


def _input(graph, consts) -> tuple[str, int, int | None, int | None]:
    """Return the graph's one image input: (name, C, H, W), H and W None when symbolic."""
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise _fail(f"the graph must have one image input, it has {len(inputs)}", field="input")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != _FLOAT or len(dims) != 4 or dims[1] is None:
        raise _fail(
            f"input {inputs[0].name!r} must be float32 (N, C, H, W) with a fixed C, "
            f"got elem_type {tensor.elem_type} and shape {dims}",
            field="input",
        )
    h, w = dims[2], dims[3]
    if h is None or w is None:
        h = w = None
    return inputs[0].name, dims[1], h, w


def _constant(node) -> np.ndarray:
    import onnx

    a = {attr.name: attr for attr in node.attribute}
    if "value" in a:
        return _array(a["value"].t)
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            return np.asarray(onnx.helper.get_attribute_value(a[key]))
    raise _fail(f"Constant node {node.name!r}: unsupported value kind {sorted(a)}")


def _walk(graph, chain: _Chain, consts: dict) -> None:
    """Follow the node list (topologically sorted, per the ONNX spec) as one chain of layers."""
    for node in graph.node:
        op, ins = node.op_type, list(node.input)
        if op == "Add" and len(ins) == 2 and ins[1] == chain.tensor:
            ins.reverse()  # Add(bias, x) adds the same
        if op == "Constant":
            consts[node.output[0]] = _constant(node)
            continue
        if op in ("Identity", "Dropout") and ins and ins[0] in consts:
            consts[node.output[0]] = consts[ins[0]]
            continue
        if node.domain not in ("", "ai.onnx"):
            raise _fail(
                f"unsupported op {node.domain}.{op} (node {node.name!r}); convq imports {SUPPORTED}"
            )
        if not ins or ins[0] != chain.tensor:
            raise _fail(
                f"{op} node {node.name!r} does not read the previous layer's output: convq "
                "imports a straight chain of layers"
            )
        for extra in ins[1:]:
            if extra and extra not in consts:
                raise _fail(f"{op} node {node.name!r}: input {extra!r} must be a constant")
        if op == "Conv":
            _conv(node, ins, consts, chain)
        elif op in ("MaxPool", "AveragePool"):
            if chain.flat:
                raise _fail(f"{op} node {node.name!r} follows Flatten")
            _pool(node, chain)
        elif op == "Relu":
            chain.layers.append({"name": chain.name("relu"), "type": "relu"})
        elif op in ("Flatten", "Reshape"):
            _flatten(node, chain, consts, ins)
        elif op == "Gemm":
            _gemm(node, ins, consts, chain)
        elif op == "MatMul":
            _dense(node, consts[ins[1]], None, chain)
        elif op == "Add":
            _add_bias(node, consts[ins[1]], chain)
        elif op in ("Identity", "Dropout"):
            pass
        else:
            raise _fail(
                f"unsupported op {op} (node {node.name!r}); convq imports {SUPPORTED}", field="op"
            )
        chain.tensor = node.output[0]


def convert(onnx_bytes: bytes, *, name: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (spec dict, {name: float32 OHWI array}) for a serialized ONNX ConvNet."""
    try:
        import onnx
    except ImportError:
        raise _fail("ONNX import needs the onnx package: pip install 'convq[onnx]'") from None
    if not isinstance(onnx_bytes, (bytes, bytearray)) or len(onnx_bytes) > MAX_ONNX_BYTES:
        raise _fail(f"an .onnx upload must be bytes of at most {MAX_ONNX_BYTES}", field="weights")
    try:
        model = onnx.load_from_string(bytes(onnx_bytes))
    except Exception as err:  # protobuf's DecodeError and friends: the upload is not ONNX
        raise _fail(
            f"not a readable ONNX model: {type(err).__name__}: {err}", field="weights"
        ) from None
    graph = model.graph
    consts = {t.name: _array(t) for t in graph.initializer}
    tensor, c, h, w = _input(graph, consts)
    chain = _Chain(tensor, c, h, w)
    _walk(graph, chain, consts)
    if chain.flat:
        raise _fail("the graph ends in Flatten/Reshape with no Gemm after it", field="layers")
    if not chain.layers:
        raise _fail("the graph has no layers convq can run", field="layers")
    outputs = [o.name for o in graph.output]
    if chain.tensor not in outputs:
        raise _fail(f"the chain ends at {chain.tensor!r}, which is not a graph output {outputs}")
    arrays = {}
    for key, value in chain.arrays.items():
        if value.dtype.kind != "f":
            raise _fail(
                f"{key}: weights must be float, got {value.dtype}", key.split(".")[0], "weights"
            )
        arrays[key] = np.ascontiguousarray(value, dtype=np.float32)
    spec = {
        "name": _name(name or graph.name),
        "input": {"channels": c},
        "fit": "floor",
        "layout": "OHWI",
        "layers": chain.layers,
    }
    if h is not None:
        spec["input"] = {"height": h, "width": w, "channels": c}
    return spec, arrays
