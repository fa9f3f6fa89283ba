"""Recognise op patterns an exporter writes for one layer, and put that layer's node back.

PyTorch's TorchScript exporter writes nn.LocalResponseNorm (torch.nn.functional's
local_response_norm) not as ONNX LRN but as its decomposition:

    d = Mul(x, x) -> Reshape to (N, 1, C, H, W) -> Pad the channel axis -> AveragePool (size,1,1)
        -> If (squeeze or not) -> Reshape to (N, C, H, W)
    y = Div(x, Pow(Add(Mul(d, alpha), k), beta))

AveragePool over `size` zero-padded channels is the window sum / size, so y is ONNX
LRN(x, size, alpha, beta, bias=k) when the pads are (size-1)/2 on both sides, i.e. for an odd
size. The shape arithmetic around it (Shape, Gather, Concat, If, ...) is dropped with the
decomposition, since nothing else reads it.
"""

from __future__ import annotations

import numpy as np

from .onnx_graph import attrs, constant, fail

# Nodes between the AveragePool and the Mul by alpha that only move or reshape values.
_RESHAPES = ("Reshape", "Squeeze", "Unsqueeze", "Identity", "If")


def _scalar(name: str, consts: dict, constant_nodes: dict) -> float | None:
    """Return a one-element constant's value, None if name is not a constant."""
    value = consts.get(name)
    if value is None and name in constant_nodes:
        value = constant(constant_nodes[name])
    if value is None or np.size(value) != 1:
        return None
    return float(np.asarray(value).reshape(-1)[0])


def _if_source(node, producers: dict) -> str | None:
    """Return the outer tensor an If's branches read (both must read the same one)."""
    seen: set[str] = set()
    for attr in node.attribute:
        if attr.g is None:
            continue
        local = {o for n in attr.g.node for o in n.output}
        seen.update(i for n in attr.g.node for i in n.input if i and i not in local)
    outer = [s for s in seen if s in producers and producers[s].op_type != "Constant"]
    return outer[0] if len(outer) == 1 else None


def _split(node, consts, constant_nodes) -> tuple[str, float] | None:
    """Return (the activation input, the constant) of a binary node with one constant input."""
    a, b = node.input[0], node.input[1]
    for act, const in ((a, b), (b, a)):
        value = _scalar(const, consts, constant_nodes)
        if value is not None:
            return act, value
    return None


def _lrn_of(div, producers: dict, consts: dict, constant_nodes: dict):
    """Return (x, size, alpha, beta, bias) if div is PyTorch's LRN decomposition, else None."""
    x, denom = div.input[0], div.input[1]
    pw = producers.get(denom)
    if pw is None or pw.op_type != "Pow":
        return None
    beta = _scalar(pw.input[1], consts, constant_nodes)
    add = producers.get(pw.input[0])
    if beta is None or add is None or add.op_type != "Add":
        return None
    split = _split(add, consts, constant_nodes)
    mul = producers.get(split[0]) if split else None
    if split is None or mul is None or mul.op_type != "Mul":
        return None
    bias = split[1]
    split = _split(mul, consts, constant_nodes)
    if split is None:
        return None
    alpha = split[1]
    at = producers.get(split[0])
    while at is not None and at.op_type in _RESHAPES:
        src = _if_source(at, producers) if at.op_type == "If" else at.input[0]
        at = producers.get(src) if src else None
    if at is None or at.op_type != "AveragePool":
        return None
    pool = attrs(at)
    kernel = list(pool.get("kernel_shape", []))
    if len(kernel) != 3 or kernel[1:] != [1, 1] or any(s != 1 for s in pool.get("strides", [1])):
        return None
    at = producers.get(at.input[0])
    if at is not None and at.op_type == "Pad":
        at = producers.get(at.input[0])
    while at is not None and at.op_type in _RESHAPES:
        at = producers.get(at.input[0])
    if at is None or at.op_type != "Mul" or list(at.input) != [x, x]:
        return None
    return x, int(kernel[0]), alpha, beta, bias


def restore_lrn(nodes: list, consts: dict) -> list:
    """Return nodes with each PyTorch LRN decomposition's Div replaced by one LRN node.

    ModelError for an even size: PyTorch pads such a window one channel more before than
    after, ONNX LRN (and convq's lrn) after than before, so the two differ.
    """
    import onnx

    producers = {o: n for n in nodes for o in n.output if o}
    constant_nodes = {n.output[0]: n for n in nodes if n.op_type == "Constant"}
    out = []
    for node in nodes:
        found = _lrn_of(node, producers, consts, constant_nodes) if node.op_type == "Div" else None
        if found is None:
            out.append(node)
            continue
        x, size, alpha, beta, bias = found
        if size % 2 == 0:
            raise fail(
                f"node {node.name!r} is PyTorch's LocalResponseNorm with an even size ({size}), "
                "whose window is not ONNX LRN's (it pads one more channel before than after); "
                "use an odd size",
                field="size",
            )
        name = node.name.rsplit("/", 1)[0] + "/LRN" if node.name.startswith("/") else node.name
        out.append(
            onnx.helper.make_node(
                "LRN",
                [x],
                [node.output[0]],
                name=name,
                size=size,
                alpha=alpha,
                beta=beta,
                bias=bias,
            )
        )
    return out
