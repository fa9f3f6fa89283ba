"""Turn an ONNX ConvNet (e.g. a PyTorch export) into a convq spec plus OHWI float32 arrays.

Imports a straight chain of Conv (group 1), Relu, (Global)MaxPool, (Global)AveragePool,
Flatten/Reshape then Gemm or MatMul(+Add), with Identity, Dropout and Constant folded away.
ONNX pads are [top, left, bottom, right], like ours; NCHW weights are moved to OHWI (in
engine.onnx_layers), and a Gemm after Flatten becomes a conv over the whole remaining
H x W x C extent. The spec uses `fit: floor`, ONNX's rounding.
"""

from __future__ import annotations

import re

import numpy as np

from .onnx_layers import (
    Chain,
    add_bias,
    array,
    conv,
    dense,
    fail,
    flatten,
    gemm,
    global_pool,
    pool,
)

MAX_ONNX_BYTES = 1 << 30
"""Largest .onnx accepted (bytes)."""
SUPPORTED = (
    "Conv, Relu, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Flatten, Reshape, Gemm, "
    "MatMul, Add (a bias), Identity, Dropout, Constant"
)
_FLOAT = 1  # onnx.TensorProto.FLOAT


def _name(raw: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.:\-]+", "-", raw or "").strip("-._:")[:128]
    return name or "onnx-model"


def _input(graph, consts) -> tuple[str, int, int | None, int | None]:
    """Return the graph's one image input: (name, C, H, W), H and W None when symbolic."""
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1:
        raise fail(f"the graph must have one image input, it has {len(inputs)}", field="input")
    tensor = inputs[0].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    if tensor.elem_type != _FLOAT or len(dims) != 4 or dims[1] is None:
        raise fail(
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
        return array(a["value"].t)
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            return np.asarray(onnx.helper.get_attribute_value(a[key]))
    raise fail(f"Constant node {node.name!r}: unsupported value kind {sorted(a)}")


def _walk(graph, chain: Chain, consts: dict) -> None:
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
            raise fail(
                f"unsupported op {node.domain}.{op} (node {node.name!r}); convq imports {SUPPORTED}"
            )
        if not ins or ins[0] != chain.tensor:
            raise fail(
                f"{op} node {node.name!r} does not read the previous layer's output: convq "
                "imports a straight chain of layers"
            )
        for extra in ins[1:]:
            if extra and extra not in consts:
                raise fail(f"{op} node {node.name!r}: input {extra!r} must be a constant")
        if op == "Conv":
            conv(node, ins, consts, chain)
        elif op in ("MaxPool", "AveragePool"):
            if chain.flat:
                raise fail(f"{op} node {node.name!r} follows Flatten")
            pool(node, chain)
        elif op in ("GlobalAveragePool", "GlobalMaxPool"):
            if chain.flat:
                raise fail(f"{op} node {node.name!r} follows Flatten")
            global_pool(node, chain)
        elif op == "Relu":
            chain.layers.append({"name": chain.name("relu"), "type": "relu"})
        elif op in ("Flatten", "Reshape"):
            flatten(node, chain, consts, ins)
        elif op == "Gemm":
            gemm(node, ins, consts, chain)
        elif op == "MatMul":
            dense(node, consts[ins[1]], None, chain)
        elif op == "Add":
            add_bias(node, consts[ins[1]], chain)
        elif op in ("Identity", "Dropout"):
            pass
        else:
            raise fail(
                f"unsupported op {op} (node {node.name!r}); convq imports {SUPPORTED}", field="op"
            )
        chain.tensor = node.output[0]


def convert(onnx_bytes: bytes, *, name: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (spec dict, {name: float32 OHWI array}) for a serialized ONNX ConvNet."""
    try:
        import onnx
    except ImportError:
        raise fail("ONNX import needs the onnx package: pip install 'convq[onnx]'") from None
    if not isinstance(onnx_bytes, (bytes, bytearray)) or len(onnx_bytes) > MAX_ONNX_BYTES:
        raise fail(f"an .onnx upload must be bytes of at most {MAX_ONNX_BYTES}", field="weights")
    try:
        model = onnx.load_from_string(bytes(onnx_bytes))
    except Exception as err:  # protobuf's DecodeError and friends: the upload is not ONNX
        raise fail(
            f"not a readable ONNX model: {type(err).__name__}: {err}", field="weights"
        ) from None
    graph = model.graph
    consts = {t.name: array(t) for t in graph.initializer}
    tensor, c, h, w = _input(graph, consts)
    chain = Chain(tensor, c, h, w)
    _walk(graph, chain, consts)
    if chain.flat:
        raise fail("the graph ends in Flatten/Reshape with no Gemm after it", field="layers")
    if not chain.layers:
        raise fail("the graph has no layers convq can run", field="layers")
    outputs = [o.name for o in graph.output]
    if chain.tensor not in outputs:
        raise fail(f"the chain ends at {chain.tensor!r}, which is not a graph output {outputs}")
    arrays = {}
    for key, value in chain.arrays.items():
        if value.dtype.kind != "f":
            raise fail(
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
