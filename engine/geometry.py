"""Window geometry shared by every windowed layer: hyperparameter forms and output sizes.

Shape letters used across convq: N batch, H/W input height/width, C input channels, K filters,
FH/FW window, SH/SW stride, DH/DW dilation, pads (top, left, bottom, right),
Hout = (H + top + bottom - DH*(FH-1) - 1)/SH + 1 and likewise Wout.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelError, ShapeError

FITS = ("strict", "floor")


def _int(value, *, layer: str | None, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(
            f"{layer or 'layer'}: {field} must be an integer, got {value!r}",
            layer=layer,
            field=field,
        )
    if value < minimum:
        raise ModelError(
            f"{layer or 'layer'}: {field} must be >= {minimum}, got {value}",
            layer=layer,
            field=field,
        )
    return value


def pair(
    value, *, layer: str | None = None, field: str = "size", minimum: int = 1
) -> tuple[int, int]:
    """Return (h, w) from an int or an [h, w] list."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ModelError(
                f"{layer or 'layer'}: {field} must be an int or [h, w], got {list(value)!r}",
                layer=layer,
                field=field,
            )
        h, w = value
        return (
            _int(h, layer=layer, field=field, minimum=minimum),
            _int(w, layer=layer, field=field, minimum=minimum),
        )
    v = _int(value, layer=layer, field=field, minimum=minimum)
    return v, v


def pads(value, *, layer: str | None = None, field: str = "pad") -> tuple[int, int, int, int]:
    """Return (top, left, bottom, right) from an int, [h, w] or [top, left, bottom, right]."""
    if isinstance(value, (list, tuple)) and len(value) == 4:
        t, le, b, r = (_int(v, layer=layer, field=field, minimum=0) for v in value)
        return t, le, b, r
    if isinstance(value, (list, tuple)) and len(value) not in (2,):
        raise ModelError(
            f"{layer or 'layer'}: {field} must be an int, [h, w] or [top, left, bottom, right], "
            f"got {list(value)!r}",
            layer=layer,
            field=field,
        )
    h, w = pair(value, layer=layer, field=field, minimum=0)
    return h, w, h, w


_windows: dict[tuple, Window] = {}  # Window.make's results by the forms it was given


@dataclass(frozen=True)
class Window:
    """A layer's window: size, stride, dilation per axis and its four pads."""

    fh: int
    fw: int
    sh: int = 1
    sw: int = 1
    dh: int = 1
    dw: int = 1
    top: int = 0
    left: int = 0
    bottom: int = 0
    right: int = 0

    @classmethod
    def make(cls, size, stride=1, pad=0, dilation=1, *, layer: str | None = None) -> Window:
        """Build a window from the spec's int / [h, w] / [t, l, b, r] forms, checking each."""
        # repr, not the values: True == 1 and [3, 3] is unhashable; only valid forms are kept
        memo = (cls, repr((size, stride, pad, dilation)))
        win = _windows.get(memo)
        if win is None:
            fh, fw = pair(size, layer=layer, field="size")
            sh, sw = pair(stride, layer=layer, field="stride")
            dh, dw = pair(dilation, layer=layer, field="dilation")
            t, le, b, r = pads(pad, layer=layer)
            win = cls(fh, fw, sh, sw, dh, dw, t, le, b, r)
            if len(_windows) >= 4096:
                _windows.clear()
            _windows[memo] = win
        return win

    @property
    def pad(self) -> tuple[int, int, int, int]:
        return self.top, self.left, self.bottom, self.right

    def out_hw(
        self, h: int, w: int, fit: str = "floor", *, layer: str | None = None
    ) -> tuple[int, int]:
        """Return (Hout, Wout) for an (h, w) input, raising ShapeError where it does not fit."""
        return (
            out_size(
                h, self.fh, self.sh, self.top, self.bottom, self.dh, fit, layer=layer, axis="height"
            ),
            out_size(
                w, self.fw, self.sw, self.left, self.right, self.dw, fit, layer=layer, axis="width"
            ),
        )


def _arithmetic(n: int, f: int, s: int, lo: int, hi: int, d: int) -> str:
    if lo == hi and d == 1:
        return f"({n} - {f} + 2*{lo})/{s} + 1"
    return f"({n} + {lo} + {hi} - {d}*({f}-1) - 1)/{s} + 1"


def fitting_sizes(n: int, f: int, s: int, lo: int, hi: int, d: int) -> tuple[int, int]:
    """Return the nearest input sizes below and above n for which the window fits exactly."""
    span = n + lo + hi - d * (f - 1) - 1
    below = n - span % s
    above = below + s
    return below, above


NEARBY_STRIDES = 64
"""How far below the stride nearby_stride looks: the hint's cost is bounded, whatever the stride."""


def nearby_stride(span: int, s: int) -> int | None:
    """Return the largest stride c != s, c <= s + 2, that divides span, looking at most
    NEARBY_STRIDES below s (then 1, which divides everything); None when only s itself would do."""
    for c in range(s + 2, max(s - NEARBY_STRIDES, 1), -1):
        if c != s and span % c == 0:
            return c
    return 1 if s != 1 else None


def out_size(
    n: int,
    f: int,
    s: int,
    lo: int,
    hi: int,
    d: int,
    fit: str = "floor",
    *,
    layer: str | None = None,
    axis: str = "width",
) -> int:
    """Return the output size along one axis: (n + lo + hi - d*(f-1) - 1)/s + 1.

    With fit="strict" a non-integer result raises ShapeError showing the arithmetic and what would
    fit; with fit="floor" it floors like PyTorch and ONNX.
    """
    name = layer or "layer"
    if fit not in FITS:
        raise ModelError(
            f"{name}: fit must be one of {FITS}, got {fit!r}", layer=layer, field="fit"
        )
    extent = d * (f - 1) + 1
    span = n + lo + hi - extent
    if span < 0:
        raise ShapeError(
            f"{name}: the {axis} window ({extent} with size {f}, dilation {d}) is larger than the "
            f"padded input ({n} + {lo} + {hi} = {n + lo + hi})",
            layer=layer,
            field="size",
        )
    if fit == "strict" and span % s:
        below, above = fitting_sizes(n, f, s, lo, hi, d)
        extra = s - span % s
        stride = nearby_stride(span, s)
        hints = [
            f"an input {axis} of {above} or {below}" if below > 0 else f"an input {axis} of {above}"
        ]
        lo2, hi2 = lo + extra // 2, hi + extra - extra // 2
        hints.append(f"{extra} more pad along the {axis} ({lo2} before, {hi2} after)")
        if stride is not None:
            hints.append(f"stride {stride}")
        hints.append('fit="floor"')
        sum_ = _arithmetic(n, f, s, lo, hi, d)
        raise ShapeError(
            f"{name}: {axis} {sum_} = {span / s + 1:g} is not an integer; "
            f"{', '.join(hints[:-1])} or {hints[-1]} would work",
            layer=layer,
            field="stride",
        )
    return span // s + 1
