"""Size a model layer by layer (shapes, parameters, FLOPs, receptive field) and print it as a table.

Conventions, per image: FLOPs of conv and local layers are 2 x multiply-accumulates
(2*Hout*Wout*K*FH*FW*C; the bias add is not counted); a pooling layer counts one operation per
window element (Hout*Wout*C*FH*FW); relu one per element. Receptive field is the side, in input
pixels, of the region one output pixel sees, from the recurrence rf += (D*(F-1)) * jump,
jump *= S. Activation bytes are float32 output bytes per image.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import EngineError
from .spec import Spec, load_spec


def im2col_shape(h: int, w: int, c: int, window) -> tuple[int, int]:
    """Return the im2col matrix shape [FH*FW*C x Hout*Wout] for one floor-fitted image."""
    hout, wout = window.out_hw(h, w, "floor")
    return window.fh * window.fw * c, hout * wout


def _params(layer, c: int, hw) -> int | None:
    if layer.type == "conv":
        per_filter = layer.window.fh * layer.window.fw * c
        return layer.filters * per_filter + (layer.filters if layer.bias is not None else 0)
    if layer.type == "local":
        if hw is None:
            return None
        per_filter = layer.window.fh * layer.window.fw * c
        units = hw[0] * hw[1] * layer.filters
        return units * per_filter + (units if layer.bias is not None else 0)
    return 0


def _flops(layer, c: int, shape) -> int | None:
    if shape is None:
        return None
    hout, wout, k = shape
    if layer.type in ("conv", "local"):
        return 2 * hout * wout * k * layer.window.fh * layer.window.fw * c
    if layer.type in ("maxpool", "avgpool"):
        return hout * wout * k * layer.window.fh * layer.window.fw
    return hout * wout * k


def summarize(
    spec: Spec, h: int | None = None, w: int | None = None, *, local_hw=None
) -> list[dict]:
    """Return one dict per layer: name, type, output_shape, params, flops, receptive_field,
    activation_bytes, im2col (conv/local), for h x w or the spec's input; size-dependent fields
    are None when neither is known.

    local_hw maps a local layer to its (Hout, Wout) when known from its weights.
    """
    if h is None or w is None:
        h, w = spec.height, spec.width
    shapes = spec.shapes(h, w) if h is not None and w is not None else [None] * len(spec.layers)
    local_hw = local_hw or {}
    rows = []
    rf, jump = [1, 1], [1, 1]
    for layer, c, shape in zip(spec.layers, spec.channels_in(), shapes, strict=True):
        win = layer.window
        if win is not None:
            for axis, (f, s, d) in enumerate(((win.fh, win.sh, win.dh), (win.fw, win.sw, win.dw))):
                rf[axis] += d * (f - 1) * jump[axis]
                jump[axis] *= s
        hw = shape[:2] if shape is not None else local_hw.get(layer.name)
        rows.append(
            {
                "name": layer.name,
                "type": layer.type,
                "output_shape": shape,
                "params": _params(layer, c, hw),
                "flops": _flops(layer, c, shape),
                "receptive_field": tuple(rf),
                "activation_bytes": None if shape is None else 4 * shape[0] * shape[1] * shape[2],
                "im2col": (win.fh * win.fw * c, shape[0] * shape[1])
                if layer.type in ("conv", "local") and shape is not None and win is not None
                else None,
            }
        )
    return rows


def _num(value) -> str:
    return "?" if value is None else f"{value:,}"


def _shape(shape) -> str:
    return "?" if shape is None else "x".join(map(str, shape))


def format_summary(rows: list[dict]) -> str:
    """Return rows as a readable table with totals (params, FLOPs, activation bytes per image)."""
    head = ("layer", "type", "output", "params", "FLOPs", "receptive field", "activations (B)")
    body = [
        (
            r["name"],
            r["type"],
            _shape(r["output_shape"]),
            _num(r["params"]),
            _num(r["flops"]),
            _shape(r["receptive_field"]),
            _num(r["activation_bytes"]),
        )
        for r in rows
    ]

    def total(key):
        values = [r[key] for r in rows]
        return None if any(v is None for v in values) else sum(values)

    foot = (
        "total",
        "",
        "",
        _num(total("params")),
        _num(total("flops")),
        "",
        _num(total("activation_bytes")),
    )
    table = [head, *body, foot]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    numeric = {3, 4, 6}

    def line(row):
        return "  ".join(
            cell.rjust(wd) if i in numeric else cell.ljust(wd)
            for i, (cell, wd) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * wd for wd in widths)
    return "\n".join([line(head), rule, *map(line, body), rule, line(foot)])


def main(argv=None) -> int:
    """`convq summary SPEC [--weights FILE] [--height H --width W] [--json]`: print the table."""
    parser = argparse.ArgumentParser(
        prog="convq summary", description="Print a model's layer table."
    )
    parser.add_argument("spec", help="spec.json")
    parser.add_argument(
        "--weights", help=".npz or .safetensors (optional: sizing needs only the spec)"
    )
    parser.add_argument(
        "--height", type=int, help="image height when the spec declares no input size"
    )
    parser.add_argument(
        "--width", type=int, help="image width when the spec declares no input size"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if (args.height is None) != (args.width is None):
        parser.error("give both --height and --width, or neither")
    from .model import Model  # imported late: engine.model imports engine.summary

    try:
        if args.weights:
            rows = Model.load(args.spec, args.weights).summary(args.height, args.width)
        else:
            spec = load_spec(args.spec)
            h, w = (
                (args.height, args.width) if args.height is not None else (spec.height, spec.width)
            )
            rows = summarize(spec, h, w)
    except (EngineError, OSError) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_summary(rows))
    return 0
