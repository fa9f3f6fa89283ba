"""Grouped convolution in the model: engine.ops.conv2d's own `groups` where it has one, else one
conv2d per group on its channel slice, joined along channels (a stopgap kept small).

w is (K, FH, FW, C/groups) OHWI; group g reads input channels [g*C/groups, (g+1)*C/groups) and
makes filters [g*K/groups, (g+1)*K/groups).
"""

from __future__ import annotations

import inspect

import numpy as np

from . import ops

NATIVE = "groups" in inspect.signature(ops.conv2d).parameters


def pack(w: np.ndarray, groups: int = 1):
    """Return packed filters for conv2d: one ConvWeights, or one per group without native groups."""
    if groups == 1:
        return ops.ConvWeights(w)
    if NATIVE:
        return ops.ConvWeights(w, groups=groups)  # type: ignore[call-arg]
    kg = w.shape[0] // groups
    return [ops.ConvWeights(np.ascontiguousarray(w[g * kg : (g + 1) * kg])) for g in range(groups)]


def packed_nbytes(packed) -> int:
    """Return the bytes of what pack() made."""
    return sum(p.nbytes for p in packed) if isinstance(packed, list) else packed.nbytes


def convolve(
    x, packed, bias, stride, pad, dilation, relu: bool, groups: int = 1, out=None, acc=False
) -> np.ndarray:
    """Return conv2d of x with packed filters (from pack) and bias (K,) or None.

    out and acc: conv2d's out and accumulate (write into a concat's slice, add to a residual).
    """
    if groups == 1 or NATIVE:
        kw = {"groups": groups} if groups > 1 else {}
        return ops.conv2d(
            x, packed, bias, stride, pad, dilation, relu=relu, out=out, accumulate=acc, **kw
        )
    cg, kg = x.shape[3] // groups, len(bias) // groups if bias is not None else 0
    outs = []
    for g, part in enumerate(packed):
        xg = np.ascontiguousarray(x[..., g * cg : (g + 1) * cg])
        bg = bias[g * kg : (g + 1) * kg] if bias is not None else None
        outs.append(ops.conv2d(xg, part, bg, stride, pad, dilation, relu=relu and not acc))
    res = np.concatenate(outs, axis=3)
    if out is None:
        return res
    if acc:
        res += out
        if relu:
            np.maximum(res, np.float32(0), out=res)
    out[...] = res
    return out
