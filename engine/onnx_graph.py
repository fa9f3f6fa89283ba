"""The ONNX import's state: Values (a tensor's ONNX shape and the layer holding it) and Graph.

engine.onnx_import walks the nodes; engine.onnx_windows (conv, pools, Pad) and
engine.onnx_layers (everything else) each read the Values of a node's inputs and add one layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .errors import ModelError

BATCH = np.int64(-(2**62) + 12345)
"""What Shape of an activation gives for its batch dimension (the batch is not known at
import): a value no real dimension has, which Gather, Concat and the like carry along, and a
Reshape target takes as "keep the batch" (0). Arithmetic on it is refused."""


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


def constant(node) -> np.ndarray:
    """Return the value of a Constant node."""
    import onnx

    a = {attr.name: attr for attr in node.attribute}
    if "value" in a:
        return array(a["value"].t)
    for key in ("value_float", "value_floats", "value_int", "value_ints"):
        if key in a:
            return np.asarray(onnx.helper.get_attribute_value(a[key]))
    raise fail(f"Constant node {node.name!r}: unsupported value kind {sorted(a)}")
