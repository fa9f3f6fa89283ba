"""Size a model layer by layer (shapes, parameters, FLOPs, receptive field) and print it as a table.

Conventions, per image: FLOPs of conv and local layers are 2 x multiply-accumulates
(2*Hout*Wout*K*FH*FW*C/groups; the bias add is not counted); a pooling layer counts one operation
per window element (Hout*Wout*C*FH*FW), a global pool one per input element; add counts
(inputs - 1) per output element, batchnorm 2 (its multiply-add), lrn 2*size + 3 (a square and an
add per window tap, then scale, power and divide), softmax 3 (subtract, exp, divide), concat 0,
relu, sigmoid, tanh and clip 1. Receptive field is the side, in input pixels, of the region one
output pixel sees, from the recurrence rf += (D*(F-1)) * jump, jump *= S, taking the largest over
a layer's inputs (a global pool sees its whole input). Activation bytes are float32 output bytes
per image (and per batch when a batch is given); parameter bytes are float32 too.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import EngineError
from .graph import IMAGE
from .spec import Spec, load_spec


def im2col_shape(h: int, w: int, c: int, window) -> tuple[int, int]:
    """Return the im2col matrix shape [FH*FW*C x Hout*Wout] of one floor-fitted image."""
    hout, wout = window.out_hw(h, w, "floor")
    return window.fh * window.fw * c, hout * wout


def _params(layer, c: int, hw) -> int | None:
    if layer.type == "conv":
        per_filter = layer.window.fh * layer.window.fw * c // layer.groups
        return layer.filters * per_filter + (layer.filters if layer.bias is not None else 0)
    if layer.type == "local":
        if hw is None:
            return None
        per_filter = layer.window.fh * layer.window.fw * c
        units = hw[0] * hw[1] * layer.filters
        return units * per_filter + (units if layer.bias is not None else 0)
    if layer.type == "batchnorm":
        return 4 * c
    return 0


_PER_ELEMENT = {"batchnorm": 2, "softmax": 3, "concat": 0}


def _flops(layer, c: int, shape, in_shape) -> int | None:
    if shape is None:
        return None
    hout, wout, k = shape
    if layer.type in ("conv", "local"):
        groups = layer.groups if layer.type == "conv" else 1
        return 2 * hout * wout * k * layer.window.fh * layer.window.fw * c // groups
    if layer.type in ("maxpool", "avgpool"):
        return hout * wout * k * layer.window.fh * layer.window.fw
    if layer.type in ("globalavgpool", "globalmaxpool"):
        return in_shape[0] * in_shape[1] * k
    per = _PER_ELEMENT.get(layer.type, 1)
    if layer.type == "add":
        per = len(layer.inputs) - 1
    elif layer.type == "lrn":
        per = 2 * layer.size + 3
    return hout * wout * k * per


def _receptive(layer, rfs: dict, in_shape) -> tuple:
    """Return (rf, jump) per axis after layer from its inputs' (largest of each)."""
    ins = [rfs[src] for src in layer.inputs]
    if any(r[0] is None for r in ins):
        return None, None
    rf = [max(r[0][axis] for r in ins) for axis in (0, 1)]
    jump = [max(r[1][axis] for r in ins) for axis in (0, 1)]
    win = layer.window
    if win is not None:
        for axis, (f, s, d) in enumerate(((win.fh, win.sh, win.dh), (win.fw, win.sw, win.dw))):
            rf[axis] += d * (f - 1) * jump[axis]
            jump[axis] *= s
    elif layer.type in ("globalavgpool", "globalmaxpool"):
        if in_shape is None:
            return None, None
        for axis in (0, 1):
            rf[axis] += (in_shape[axis] - 1) * jump[axis]
            jump[axis] *= in_shape[axis]
    return tuple(rf), tuple(jump)


def summarize(
    spec: Spec,
    h: int | None = None,
    w: int | None = None,
    *,
    local_hw=None,
    batch: int | None = None,
) -> list[dict]:
    """Return one dict per layer in run order: name, type, inputs, output_shape, params,
    param_bytes, flops, receptive_field, activation_bytes (per image), im2col (conv/local), and
    batch_activation_bytes when a batch is given, for h x w or the spec's input; size-dependent
    fields are None when neither is known.

    local_hw maps a local layer to its (Hout, Wout) when known from its weights.
    """
    if h is None or w is None:
        h, w = spec.height, spec.width
    shapes = spec.shapes(h, w) if h is not None and w is not None else [None] * len(spec.layers)
    by_name = {IMAGE: None if h is None else (h, w, spec.channels)}
    by_name |= {layer.name: s for layer, s in zip(spec.layers, shapes, strict=True)}
    local_hw = local_hw or {}
    rows = []
    rfs: dict = {IMAGE: ((1, 1), (1, 1))}
    for layer, c, shape in zip(spec.layers, spec.channels_in(), shapes, strict=True):
        in_shape = by_name[layer.inputs[0]]
        rfs[layer.name] = _receptive(layer, rfs, in_shape)
        hw = shape[:2] if shape is not None else local_hw.get(layer.name)
        params = _params(layer, c, hw)
        act = None if shape is None else 4 * shape[0] * shape[1] * shape[2]
        win = layer.window
        row = {
            "name": layer.name,
            "type": layer.type,
            "inputs": list(layer.inputs),
            "output_shape": shape,
            "params": params,
            "param_bytes": None if params is None else 4 * params,
            "flops": _flops(layer, c, shape, in_shape),
            "receptive_field": rfs[layer.name][0],
            "activation_bytes": act,
            "im2col": (win.fh * win.fw * c // layer.groups, shape[0] * shape[1])
            if layer.type in ("conv", "local") and shape is not None and win is not None
            else None,
        }
        if batch is not None:
            row["batch_activation_bytes"] = None if act is None else act * batch
        rows.append(row)
    return rows


def peak_bytes(spec: Spec, h: int, w: int, n: int, outputs=None) -> int:
    """Return the live-set peak (engine.plan.peak_bytes) of a run of n h x w images."""
    from . import plan

    shapes = dict(zip((lay.name for lay in spec.layers), spec.shapes(h, w), strict=True))
    shapes[IMAGE] = (h, w, spec.channels)
    wanted = list(shapes)[:-1] if outputs == "all" else [spec.layers[-1].name]
    return plan.peak_bytes(plan.plan(spec.layers, wanted, depth=spec.depths()), shapes, n)


def _num(value) -> str:
    return "?" if value is None else f"{value:,}"


def _shape(shape) -> str:
    return "?" if shape is None else "x".join(map(str, shape))


def format_summary(rows: list[dict]) -> str:
    """Return rows as a readable table with totals (params, FLOPs, activation bytes per image
    and, when the rows carry one, per batch)."""
    cols = [
        ("layer", lambda r: r["name"], False),
        ("type", lambda r: r["type"], False),
        ("inputs", lambda r: ",".join(r["inputs"]), False),
        ("output", lambda r: _shape(r["output_shape"]), False),
        ("params", lambda r: _num(r["params"]), True),
        ("param bytes", lambda r: _num(r["param_bytes"]), True),
        ("FLOPs", lambda r: _num(r["flops"]), True),
        ("receptive field", lambda r: _shape(r["receptive_field"]), False),
        ("activations (B)", lambda r: _num(r["activation_bytes"]), True),
    ]
    totals = {"params", "param bytes", "FLOPs", "activations (B)"}
    keys = {"params": "params", "param bytes": "param_bytes", "FLOPs": "flops"}
    keys["activations (B)"] = "activation_bytes"
    if rows and "batch_activation_bytes" in rows[0]:
        cols.append(("per batch (B)", lambda r: _num(r["batch_activation_bytes"]), True))
        totals.add("per batch (B)")
        keys["per batch (B)"] = "batch_activation_bytes"

    def total(key):
        values = [r[key] for r in rows]
        return None if any(v is None for v in values) else sum(values)

    head = tuple(name for name, _, _ in cols)
    body = [tuple(get(r) for _, get, _ in cols) for r in rows]
    foot = tuple(
        "total" if i == 0 else _num(total(keys[name])) if name in totals else ""
        for i, (name, _, _) in enumerate(cols)
    )
    table = [head, *body, foot]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    numeric = {i for i, (_, _, right) in enumerate(cols) if right}

    def line(row):
        return "  ".join(
            cell.rjust(wd) if i in numeric else cell.ljust(wd)
            for i, (cell, wd) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * wd for wd in widths)
    return "\n".join([line(head), rule, *map(line, body), rule, line(foot)])


def main(argv=None) -> int:
    """`convq summary SPEC [--weights FILE] [--height H --width W] [--batch N] [--json]`."""
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
    parser.add_argument(
        "--batch", type=int, help="also show activation bytes for a batch of this many images"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if (args.height is None) != (args.width is None):
        parser.error("give both --height and --width, or neither")
    if args.batch is not None and args.batch < 1:
        parser.error("--batch must be at least 1")
    from .model import Model  # imported late: engine.model imports engine.summary

    try:
        spec = load_spec(args.spec)
        h, w = (args.height, args.width) if args.height is not None else (spec.height, spec.width)
        if args.weights:
            rows = Model.load(args.spec, args.weights).summary(h, w, batch=args.batch)
        else:
            rows = summarize(spec, h, w, batch=args.batch)
    except (EngineError, OSError) as err:
        print(f"error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    print(json.dumps(rows, indent=1) if args.json else format_summary(rows))
    if not args.json and args.batch is not None and h is not None and w is not None:
        last, every = (peak_bytes(spec, h, w, args.batch, out) for out in (None, "all"))
        print(
            f"peak activations for a batch of {args.batch}: {last:,} B asking for the last layer, "
            f"{every:,} B asking for all"
        )
    return 0
