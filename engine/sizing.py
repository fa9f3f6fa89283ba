"""Size a network along its layers: output shapes, where it does not fit, and what would.

The arithmetic per window is engine.geometry's; this module follows it through a whole Spec,
adds "the whole network fits input height 223 or 227" hints to strict-fit errors, and refuses
pooling windows that would see only padding.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .errors import ShapeError
from .geometry import out_size
from .graph import IMAGE

if TYPE_CHECKING:
    from .spec import Layer, Spec


def layer_shapes(spec: Spec, h: int, w: int) -> list[tuple[int, int, int]]:
    """Return each layer's (Hout, Wout, K) for an h x w input; ShapeError where it misfits."""
    depth = spec.depths()
    shapes: dict[str, tuple[int, int, int]] = {IMAGE: (h, w, spec.channels)}
    for layer in spec.layers:
        ins = [shapes[src] for src in layer.inputs]
        hin, win_, _ = ins[0]
        if layer.window is not None:
            try:
                hout, wout = layer.window.out_hw(hin, win_, spec.fit, layer=layer.name)
            except ShapeError as err:
                raise _with_input_hint(spec, err, h, w) from None
            if layer.type == "maxpool" or (layer.type == "avgpool" and not layer.count_pad):
                check_pool_windows(layer, hin, win_, hout, wout)
        elif layer.type in ("globalavgpool", "globalmaxpool"):
            hout, wout = 1, 1
        else:
            hout, wout = hin, win_
            _check_joined(layer, ins, h, w)
        shapes[layer.name] = (hout, wout, depth[layer.name])
    return [shapes[layer.name] for layer in spec.layers]


def _check_joined(layer: Layer, ins: list, h: int, w: int) -> None:
    """Raise ShapeError unless an add's inputs share a shape, a concat's their height x width."""
    key = slice(0, 3) if layer.type == "add" else slice(0, 2)
    if len(ins) < 2 or len({s[key] for s in ins}) == 1:
        return
    what = "shapes" if layer.type == "add" else "heights x widths"
    shown = ", ".join(
        f"{src} {'x'.join(map(str, s[key]))}" for src, s in zip(layer.inputs, ins, strict=True)
    )
    raise ShapeError(
        f"{layer.name}: {layer.type} needs inputs of equal {what}, but for a {h}x{w} input "
        f"they are {shown}",
        layer=layer.name,
        field="inputs",
    )


def axis_fits(spec: Spec, n: int, axis: str) -> bool:
    """Return whether an input of n pixels along axis ("height"/"width") fits every layer."""
    sizes = {IMAGE: n}
    for layer in spec.layers:
        ins = [sizes[src] for src in layer.inputs]
        m = ins[0]
        win = layer.window
        if layer.type in ("add", "concat") and len(set(ins)) > 1:
            return False
        if layer.type in ("globalavgpool", "globalmaxpool"):
            m = 1
        elif win is not None:
            f, s, lo, hi, d = (
                (win.fh, win.sh, win.top, win.bottom, win.dh)
                if axis == "height"
                else (win.fw, win.sw, win.left, win.right, win.dw)
            )
            try:
                m = out_size(m, f, s, lo, hi, d, spec.fit, layer=layer.name, axis=axis)
            except ShapeError:
                return False
        sizes[layer.name] = m
    return True


def _axis_windows(spec: Spec, axis: str) -> list[tuple[int, int, int]]:
    """Return (stride, extent, total pad) of each window along axis, in layer order."""
    out = []
    for lay in spec.layers:
        win = lay.window
        if win is None:
            continue
        if axis == "height":
            out.append((win.sh, win.dh * (win.fh - 1) + 1, win.top + win.bottom))
        else:
            out.append((win.sw, win.dw * (win.fw - 1) + 1, win.left + win.right))
    return out


SEARCH_REACH = 256
"""Sizes tried each way around n where the layers are not one chain (branches, joins)."""


def _is_chain(spec: Spec) -> bool:
    """Return whether each layer reads only the one before it (the image, for the first)."""
    for i, layer in enumerate(spec.layers):
        ins = getattr(layer, "inputs", None)  # graph specs name each layer's inputs
        if layer.type in ("add", "concat", "globalavgpool", "globalmaxpool"):
            return False
        if ins and (len(ins) != 1 or (i > 0 and ins[0] != spec.layers[i - 1].name)):
            return False
    return True


def _searched_inputs(spec: Spec, n: int, axis: str) -> list[int]:
    """The nearest fitting sizes within SEARCH_REACH of n, one axis_fits per size tried."""
    below = next(
        (m for m in range(n - 1, max(n - SEARCH_REACH, 0), -1) if axis_fits(spec, m, axis)), None
    )
    above = next((m for m in range(n + 1, n + SEARCH_REACH) if axis_fits(spec, m, axis)), None)
    return [m for m in (below, above) if m is not None]


def fitting_inputs(spec: Spec, n: int, axis: str) -> list[int]:
    """Return the nearest input sizes below and above n for which the whole network fits.

    Closed form, no search: walking back from the last layer, the input of a window whose output
    is m is (m - 1)*s + extent - pads exactly (strict), or at least that (floor); composed over
    the layers the inputs that fit are P*m + Q for every final output m >= m0 (strict), or every
    size from Q + P*(m0 - 1) up (floor), P the product of the strides. Cost: one pass per layer.
    """
    if not _is_chain(spec):
        return _searched_inputs(spec, n, axis)
    windows = _axis_windows(spec, axis)
    if spec.fit == "floor":
        least = 1  # the smallest input of the last window, going backwards to the first
        for s, extent, pads in reversed(windows):
            least = max(1, (least - 1) * s + extent - pads)
        below = n - 1 if n - 1 >= least else None
        return [m for m in (below, max(n + 1, least)) if m is not None]
    # Strict: size_i(m) = P_i*m + Q_i for the input of window i, m the last output (m >= 1).
    p, q, m0 = 1, 0, 1  # the last output itself: 1*m + 0
    for s, extent, pads in reversed(windows):
        p, q = p * s, (q - 1) * s + extent - pads
        m0 = max(m0, -((q - 1) // p))  # smallest m with p*m + q >= 1
    m_above = max(m0, (n - q) // p + 1)  # smallest m with p*m + q > n
    m_below = -((n - q) // -p) - 1  # largest m with p*m + q < n
    out = [p * m_below + q] if m_below >= m0 else []
    return [*out, p * m_above + q]


def _with_input_hint(spec: Spec, err: ShapeError, h: int, w: int) -> ShapeError:
    """Add the input sizes for which the whole network fits to a geometry error."""
    hints = []
    for axis, n in (("height", h), ("width", w)):
        if not axis_fits(spec, n, axis):
            sizes = fitting_inputs(spec, n, axis)
            if sizes:
                hints.append(f"{axis} {' or '.join(map(str, sizes))}")
    if not hints:
        return err
    msg = f"{err.message}; the whole network fits input {' and '.join(hints)}"
    return ShapeError(msg, layer=err.layer, field=err.field)


def check_pool_windows(layer: Layer, h: int, w: int, hout: int, wout: int) -> None:
    """Raise ShapeError if some pooling window holds only padding (its max or mean is undefined)."""
    win = layer.window
    if win is None:
        return  # not a windowed layer: nothing to pool over
    for axis, n, out, f, s, lo, d in (
        ("height", h, hout, win.fh, win.sh, win.top, win.dh),
        ("width", w, wout, win.fw, win.sw, win.left, win.dw),
    ):
        # Only windows starting in the leading pad or past the input can miss it: at most
        # lo/s + hi/s + 2 of them, checked at once (numpy) rather than one Python step each.
        lead = np.arange(min(out, -(-lo // s)), dtype=np.int64)
        tail = np.arange(max(0, (n + lo) // s), out, dtype=np.int64)
        o = np.concatenate([lead, tail])
        start = o * s - lo
        # the first tap at or after pixel 0
        first = np.where(start >= 0, start, start + (-start + d - 1) // d * d)
        bad = ~((first < n) & (first <= start + d * (f - 1)))
        if bad.any():
            first_bad = int(o[np.argmax(bad)])
            raise ShapeError(
                f"{layer.name}: output {axis} index {first_bad} of {out} pools only padding "
                f"(input {axis} {n}, size {f}, stride {s}, pad {lo}, dilation {d}); "
                "use less pad, e.g. at most half the window",
                layer=layer.name,
                field="pad",
            )
