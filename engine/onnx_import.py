"""Turn an ONNX ConvNet (e.g. a PyTorch export) into a convq graph spec plus OHWI float32 arrays.

Every supported node becomes one layer named after the node (a PyTorch export's
"/layer1/layer1.0/conv1/Conv" becomes "layer1.0.conv1"), reading the layers its inputs come
from, so ResNet's residual Adds and GoogLeNet's Concats are kept as they are. Identity, Dropout
and Constant fold away; nodes whose inputs are all constants (the exporter's pad arithmetic)
are computed at import; a constant Pad folds into the conv or pool after it; Add of a constant
folds into a bias; Flatten/Reshape feed a Gemm that becomes a conv over the whole remaining
H x W x C extent. ONNX pads are [top, left, bottom, right], like ours; NCHW weights move to OHWI
(in engine.onnx_layers). The spec uses `fit: floor`, ONNX's rounding.
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from . import onnx_layers as ol
from . import onnx_windows as ow
from .onnx_graph import BATCH, Graph, Value, array, attrs, constant, fail
from .onnx_patterns import restore_lrn

MAX_ONNX_BYTES = 1 << 30
"""Largest .onnx accepted (bytes)."""
SUPPORTED = (
    "Add, AveragePool, BatchNormalization, Clip, Concat, Constant, Conv (any group), Dropout, "
    "Flatten, Gather (channels), Gemm, GlobalAveragePool, GlobalMaxPool, Identity, LRN "
    "(or PyTorch's decomposition of it), MatMul, MaxPool, Mul (by a constant after a conv), "
    "Pad (constant), ReduceMax (over H and W), ReduceMean (over H and W), Relu, Reshape (to "
    "N x -1), Shape, Sigmoid, Softmax (channels), Sum, Tanh, Unsqueeze (after Gather)"
)
_OPS = frozenset(op.split(" ")[0] for op in SUPPORTED.split(", "))
_FLOAT = 1  # onnx.TensorProto.FLOAT
_BAD = re.compile(r"[^A-Za-z0-9_.:\-]+")
_KIND = {  # fallback layer names for unnamed nodes
    "Conv": "conv",
    "Gemm": "fc",
    "MatMul": "fc",
    "BatchNormalization": "bn",
    "GlobalAveragePool": "globalavgpool",
    "GlobalMaxPool": "globalmaxpool",
    "MaxPool": "maxpool",
    "AveragePool": "avgpool",
}


def _name(raw: str) -> str:
    name = _BAD.sub("-", raw or "").strip("-._:")[:128]
    return name or "onnx-model"


def _module_path(node) -> tuple[str, ...]:
    """'/layer1/layer1.0/conv1/Conv' -> ('layer1.0', 'conv1'): the exporter's module path."""
    parts = [p for p in node.name.split("/") if p]
    if len(parts) < 2 or not node.name.startswith("/"):
        return ()
    parts = parts[:-1]  # the last part is the op (Conv, Relu_1, ...)
    # A child module repeats its parent's path: layer1 / layer1.0 -> layer1.0.
    return tuple(
        p
        for i, p in enumerate(parts)
        if not parts[i + 1 : i + 2] or not parts[i + 1].startswith(p + ".")
    )


def layer_names(nodes) -> dict[str, str]:
    """Return first output -> a valid, unique layer name taken from the node's name."""
    paths = {n.output[0]: _module_path(n) for n in nodes}
    shared = Counter(paths.values())
    counts: Counter = Counter()
    names: dict[str, str] = {}
    taken = {"image"}
    for node in nodes:
        path = paths[node.output[0]]
        op = node.name.rsplit("/", 1)[-1] if node.name.startswith("/") else ""
        if path and shared[path] == 1:
            base = ".".join(path)  # a leaf module: its own name says what it is
        elif path:
            base = ".".join(path) + "." + op.lower()
        elif op:
            base = op.lower()
        elif node.name:
            base = node.name
        else:
            kind = _KIND.get(node.op_type, node.op_type.lower())
            counts[kind] += 1
            base = f"{kind}{counts[kind]}"
        base = _BAD.sub("_", base).lstrip("_.:-")[:120] or node.op_type.lower()
        name, i = base, 1
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        names[node.output[0]] = name
    return names


def _input(graph, consts) -> Value:
    """Return the graph's one image input as a Value; H and W None when symbolic."""
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
    return Value("image", dims[1], h, w)


_MOVES_BATCH = ("Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Identity")


def _shape(g: Graph, node, consts: dict) -> None:
    """Shape of an activation: (BATCH, C, H, W), or (BATCH, C) after Flatten or Gemm."""
    v = g.values[node.input[0]]
    if v.h is None or v.w is None:
        raise fail(
            f"Shape node {node.name!r} reads an activation of symbolic height or width; "
            "export the model with a fixed input height and width",
            field="input",
        )
    dims = [BATCH, v.c * v.h * v.w] if v.flat else [BATCH, v.c, v.h, v.w][: v.rank]
    a = {attr.name: attr.i for attr in node.attribute}
    consts[node.output[0]] = np.array(dims, np.int64)[a.get("start", 0) : a.get("end", None)]


def _node(g: Graph, node, consts: dict, opset: int) -> None:
    """Translate one node, or fold it away."""
    op, ins = node.op_type, list(node.input)
    if op == "Constant":
        consts[node.output[0]] = constant(node)
        return
    if op == "Shape" and ins and ins[0] in g.values:
        _shape(g, node, consts)
        return
    if op in ("Identity", "Dropout") and ins and ins[0] in consts:
        consts[node.output[0]] = consts[ins[0]]
        return
    if ins and all(not i or i in consts for i in ins) and node.domain in ("", "ai.onnx"):
        _fold(node, ins, consts)
        return
    if node.domain not in ("", "ai.onnx"):
        raise fail(
            f"unsupported op {node.domain}.{op} (node {node.name!r}); convq imports {SUPPORTED}",
            field="op",
        )
    if op not in _OPS:
        raise fail(
            f"unsupported op {op} (node {node.name!r}); convq imports {SUPPORTED}", field="op"
        )
    if op in ("Add", "Mul") and len(ins) == 2 and ins[0] in consts and ins[1] in g.values:
        ins.reverse()  # Add(bias, x) adds the same, Mul(s, x) scales the same
    if op in ("Add", "Sum", "Concat") and all(i in g.values for i in ins):
        vs = [g.values[i] for i in ins]
        if len(vs) == 1:
            g.values[node.output[0]] = vs[0]
        elif op == "Add" and len(vs) != 2:
            raise fail(f"Add node {node.name!r} must have two inputs")
        else:
            ol.merge(g, node, vs, opset)
        return
    if not ins or ins[0] not in g.values:
        raise fail(
            f"{op} node {node.name!r}: input {ins[0] if ins else None!r} is not an activation "
            "convq computes (the image or an earlier node's output)"
        )
    v = g.values[ins[0]]
    for extra in ins[1:]:
        if extra and extra not in consts:
            raise fail(f"{op} node {node.name!r}: input {extra!r} must be a constant")
    if v.pad is not None and op not in ("Conv", "MaxPool", "AveragePool"):
        raise fail(
            f"{op} node {node.name!r} reads a Pad: convq folds Pad only into a following "
            "Conv, MaxPool or AveragePool",
            field="op",
        )
    if v.rank == 3 and op != "Unsqueeze":
        raise fail(f"{op} node {node.name!r} reads a Gather of one channel; only Unsqueeze may")
    if v.flat and op not in (
        "Gemm",
        "MatMul",
        "Relu",
        "Sigmoid",
        "Tanh",
        "Clip",
        "Identity",
        "Dropout",
    ):
        raise fail(f"{op} node {node.name!r} follows Flatten; only Gemm or MatMul may")
    if op == "Conv":
        ow.conv(g, node, v, ins, consts)
    elif op in ("MaxPool", "AveragePool"):
        ow.pool(g, node, v)
    elif op in ("GlobalAveragePool", "GlobalMaxPool"):
        ol.global_pool(g, node, v)
    elif op in ("ReduceMean", "ReduceMax"):
        axes = consts[ins[1]] if len(ins) > 1 and ins[1] else None
        ol.reduce_spatial(g, node, v, axes)
    elif op in ("Relu", "Sigmoid", "Tanh", "Clip"):
        ol.elementwise(g, node, v, ins, consts, opset)
    elif op in ("Flatten", "Reshape"):
        ol.flatten(g, node, v, consts, ins)
    elif op == "Gemm":
        ol.gemm(g, node, v, ins, consts)
    elif op == "MatMul":
        ol.dense(g, node, v, consts[ins[1]], None)
    elif op == "Add":
        ol.add_bias(g, node, v, consts[ins[1]])
    elif op == "Mul":
        ol.scale(g, node, v, consts[ins[1]])
    elif op == "Gather":
        ol.gather_channels(g, node, v, consts[ins[1]])
    elif op == "Unsqueeze":
        axes = consts[ins[1]] if len(ins) > 1 and ins[1] else attrs(node).get("axes", [])
        ol.unsqueeze(g, node, v, axes)
    elif op == "BatchNormalization":
        ol.batchnorm(g, node, v, ins, consts)
    elif op == "LRN":
        ol.lrn(g, node, v)
    elif op == "Softmax":
        ol.softmax(g, node, v, opset)
    elif op == "Pad":
        ow.pad(g, node, v, ins, consts, opset)
    elif op in ("Identity", "Dropout"):
        g.values[node.output[0]] = v
    else:
        raise fail(
            f"unsupported op {op} (node {node.name!r}); convq imports {SUPPORTED}", field="op"
        )


MAX_FOLD_ELEMENTS = 1 << 20
"""Largest constant input (elements) a node computed at import time may read."""


def _fold(node, ins: list[str], consts: dict) -> None:
    """Compute a node whose inputs are all constants (an exporter's pad or shape arithmetic)."""
    from onnx.reference import ReferenceEvaluator

    values = [consts[i] for i in ins if i]
    if node.op_type not in _MOVES_BATCH and any(
        np.asarray(v).dtype == np.int64 and (np.asarray(v) == BATCH).any() for v in values
    ):
        raise fail(
            f"{node.op_type} node {node.name!r} computes with the batch size, which convq does "
            "not know at import; export with a flatten to (N, -1) such as torch.flatten(x, 1)",
            field="op",
        )
    if sum(np.asarray(v).size for v in values) > MAX_FOLD_ELEMENTS:
        raise fail(
            f"{node.op_type} node {node.name!r} computes on constants larger than "
            f"{MAX_FOLD_ELEMENTS} elements; convq folds only small shape arithmetic",
            field="op",
        )
    try:
        outputs = ReferenceEvaluator(node).run(None, {i: consts[i] for i in ins if i})
    except Exception as err:  # an op the evaluator lacks, or inputs it refuses
        raise fail(
            f"{node.op_type} node {node.name!r}: cannot compute it from its constant inputs "
            f"({type(err).__name__}: {str(err)[:200]}); convq imports {SUPPORTED}",
            field="op",
        ) from None
    for name, value in zip(node.output, outputs, strict=False):
        if name:
            consts[name] = np.asarray(value)


def _needed(nodes, output: str) -> list:
    """Return the nodes the output depends on, in their order (dead branches are dropped)."""
    wanted, kept = {output}, []
    for node in reversed(nodes):
        if any(o in wanted for o in node.output):
            kept.append(node)
            wanted.update(i for i in node.input if i)
    return kept[::-1]


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def convert(
    onnx_bytes: bytes, *, name: str | None = None, labels: list[str] | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """Return (spec dict, {name: float32 OHWI array}) for a serialized ONNX ConvNet."""
    spec, arrays, _ = convert_graph(onnx_bytes, name=name, labels=labels)
    return spec, arrays


def convert_graph(
    onnx_bytes: bytes, *, name: str | None = None, labels: list[str] | None = None
) -> tuple[dict, dict[str, np.ndarray], dict[str, str]]:
    """Return what convert does plus {layer name: the ONNX tensor that holds its output}."""
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
    image = _input(graph, consts)
    outputs = [o.name for o in graph.output]
    if len(outputs) != 1:
        raise fail(f"the graph must have one output, it has {outputs}", field="outputs")
    nodes = _needed(restore_lrn(list(graph.node), consts), outputs[0])
    g = Graph(layer_names(nodes))
    g.values[_image_name(graph, consts)] = image
    opset = _opset(model)
    for node in nodes:
        _node(g, node, consts, opset)
    if not g.layers:
        raise fail("the graph has no layers convq can run", field="layers")
    if outputs[0] not in g.values:
        raise fail(f"the graph must have one output convq computes, it has {outputs}")
    out = g.values[outputs[0]]
    if out.flat or out.pad is not None:
        raise fail("the graph ends in Flatten, Reshape or Pad with no layer after it")
    if out.layer != g.layers[-1]["name"]:
        raise fail(
            f"the graph's output comes from layer {out.layer!r}, but the last layer is "
            f"{g.layers[-1]['name']!r}; convq's model output is its last layer",
            field="layers",
        )
    arrays = {}
    for key, value in g.arrays.items():
        if value.dtype.kind != "f":
            raise fail(
                f"{key}: weights must be float, got {value.dtype}", key.rsplit(".", 1)[0], "weights"
            )
        arrays[key] = np.ascontiguousarray(value, dtype=np.float32)
    spec: dict = {
        "name": _name(name or graph.name),
        "input": {"channels": image.c},
        "fit": "floor",
        "layout": "OHWI",
        "layers": g.layers,
    }
    if image.h is not None:
        spec["input"] = {"height": image.h, "width": image.w, "channels": image.c}
    if labels is not None:
        if len(labels) != out.c:
            raise fail(f"{len(labels)} labels for a last layer of {out.c} channels", field="labels")
        spec["labels"] = list(labels)
    return spec, arrays, dict(g.tensors)


def _image_name(graph, consts) -> str:
    return next(i.name for i in graph.input if i.name not in consts)
