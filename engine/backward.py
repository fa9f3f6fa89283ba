"""Backward passes of the fast layers: given dout, the gradient of a scalar objective with
respect to a layer's output, return the gradients with respect to its input (and weights).

Shapes as in engine.ops: x (N, H, W, C), w (K, FH, FW, C), dout (N, Hout, Wout, K). Every
function matches its *_reference in engine.backward_reference to float32 rounding
(tests/unit/test_backward*.py).

A conv's input gradient is itself a convolution: dout dilated by the stride
(stride - 1 zeros between its pixels) and padded by D*(F-1) - pad, convolved with the filters
flipped in space and transposed in channels (C filters of FH x FW x K). At stride 1 that
convolution runs through engine.ops.conv2d with all its paths (Winograd, implicit GEMM). At
stride > 1 all but 1/(SH*SW) of the dilated input would be zeros, so the same sum is done
without them: per image the GEMM dout_n (P, K) @ W (K, FH*FW*C) gives every window's share and
col2im adds the windows back (the transpose of im2col). The weight gradient is the correlation
of x with dout: dW = sum_n dout_n.T @ im2col(x_n).
"""

from __future__ import annotations

import numpy as np

from . import _args, _cache, _threads
from .errors import ShapeError
from .geometry import Window
from .ops import ConvWeights, conv2d

with _cache.versioned():
    from . import _backward

# Images per conv_dw launch are capped so the per-thread columns stay at most this many bytes.
COLS_BYTES = 64 * 1024 * 1024


class ConvGrad:
    """A conv's filters w (K, FH, FW, C/groups) with the flipped, channel-transposed filters
    the input gradient convolves with, made on first use and kept.

    Group g's flipped filters are its (K/groups, FH, FW, C/groups) block flipped in space and
    transposed to (C/groups, FH, FW, K/groups): the input gradient is again a grouped conv.
    """

    def __init__(self, w, groups: int = 1):
        if isinstance(w, ConvWeights):
            w, groups = w.w, w.groups
        self.w = _args.weights(w, 4, "(K, FH, FW, C/groups)")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ShapeError(f"groups must be a positive integer, got {groups!r}", field="groups")
        if self.w.shape[0] % groups:
            raise ShapeError(
                f"groups={groups} does not divide the {self.w.shape[0]} filters", field="groups"
            )
        self.groups = groups
        self._flipped: ConvWeights | None = None
        self._w2d: list[np.ndarray] | None = None

    @property
    def channels(self) -> int:
        """C, the input channels of the forward conv."""
        return self.w.shape[3] * self.groups

    def flipped(self) -> ConvWeights:
        if self._flipped is None:
            kg = self.w.shape[0] // self.groups
            parts = [
                self.w[i * kg : (i + 1) * kg, ::-1, ::-1, :].transpose(3, 1, 2, 0)
                for i in range(self.groups)
            ]
            self._flipped = ConvWeights(np.concatenate(parts), groups=self.groups)
        return self._flipped

    def w2d(self) -> list[np.ndarray]:
        """Return each group's filters as a (K/groups, FH*FW*C/groups) matrix."""
        if self._w2d is None:
            kg = self.w.shape[0] // self.groups
            self._w2d = [
                _args.read_only(np.ascontiguousarray(self.w[i * kg : (i + 1) * kg].reshape(kg, -1)))
                for i in range(self.groups)
            ]
        return self._w2d


def _dout(dout, n: int, hw: tuple[int, int], k: int) -> np.ndarray:
    """Return dout as read-only float32 (N, Hout, Wout, K), or ShapeError naming the shape."""
    g = _args.input_array(dout, "dout")
    want = (n, *hw, k)
    if g.shape != want:
        raise ShapeError(
            f"dout must have the forward output's shape {want}, got {g.shape}", field="dout"
        )
    return g


def _geometry(win: Window) -> tuple[int, ...]:
    return (win.fh, win.fw, win.sh, win.sw, win.dh, win.dw, win.top, win.left)


def conv2d_backward_input(
    dout, w, hw, stride=1, pad=0, dilation=1, via_conv=None, groups=1
) -> np.ndarray:
    """Return dx (N, H, W, C) of conv2d(x, w, ..., groups) for x of spatial size hw = (H, W).

    w may be a ConvGrad (its flipped filters are then kept between calls). via_conv forces the
    dilated-convolution route (True) or the GEMM + col2im one (False); by default stride 1 and
    grouped convs take the convolution, other strides the GEMM.
    """
    cg = w if isinstance(w, ConvGrad) else ConvGrad(w, groups)
    k, fh, fw, _ = cg.w.shape
    c = cg.channels
    win = Window.make([fh, fw], stride, pad, dilation)
    h, w_in = hw
    g = _dout(dout, np.asarray(dout).shape[0] if np.ndim(dout) == 4 else -1, win.out_hw(h, w_in), k)
    n = g.shape[0]
    if via_conv is None:
        # Grouped convs too: one grouped conv2d (the depthwise kernel when C/groups == 1) beats a
        # GEMM per group even over the zeros (depthwise 3x3 s2 56x56x128 N=8: 5.2 vs 41.7 ms).
        via_conv = (win.sh, win.sw) == (1, 1) or cg.groups > 1
    if via_conv:
        # big[o + y*S] = dout[y], o = D*(F-1) - pad: a stride-1 conv of big with the flipped
        # filters at dilation D gives dx at every in-image pixel; rows of dout that touch only
        # padding fall outside big and are dropped.
        oy, ox = win.dh * (fh - 1), win.dw * (fw - 1)
        big = np.zeros((n, h + oy, w_in + ox, k), np.float32)
        if g.size:
            _threads.enter(g.size)
            _backward.dilate(g, big, win.sh, win.sw, oy - win.top, ox - win.left)
        return conv2d(big, cg.flipped(), None, 1, 0, (win.dh, win.dw))
    if cg.groups == 1:
        dx = np.zeros((n, h, w_in, c), np.float32)
        if g.size:
            nthreads = _threads.enter(g.size * fh * fw * c)
            _backward.conv_dx(g, cg.w2d()[0], dx, nthreads, *_geometry(win))
        return dx
    kg, parts = k // cg.groups, []
    for i, w2d in enumerate(cg.w2d()):
        part = np.zeros((n, h, w_in, c // cg.groups), np.float32)
        gi = _args.read_only(np.ascontiguousarray(g[..., i * kg : (i + 1) * kg]))
        if g.size:
            nthreads = _threads.enter(gi.size * fh * fw * part.shape[3])
            _backward.conv_dx(gi, w2d, part, nthreads, *_geometry(win))
        parts.append(part)
    return np.concatenate(parts, axis=-1)


def conv2d_backward_weights(x, dout, size, stride=1, pad=0, dilation=1, groups=1) -> np.ndarray:
    """Return dw (K, FH, FW, C/groups) of conv2d(x, w, ..., groups) for filters (FH, FW)."""
    x = _args.input_array(x)
    if groups > 1:
        g = _args.input_array(dout, "dout")
        cg, kg = x.shape[3] // groups, g.shape[3] // groups
        return np.concatenate(
            [
                conv2d_backward_weights(
                    x[..., i * cg : (i + 1) * cg],
                    g[..., i * kg : (i + 1) * kg],
                    size,
                    stride,
                    pad,
                    dilation,
                )
                for i in range(groups)
            ]
        )
    win = Window.make(size, stride, pad, dilation)
    n, h, w_in, c = x.shape
    hout, wout = win.out_hw(h, w_in)
    k = np.asarray(dout).shape[-1] if np.ndim(dout) == 4 else 0
    g = _dout(dout, n, (hout, wout), k)
    width = win.fh * win.fw * c
    nthreads = _threads.enter(g.size * width) if g.size else 1
    partial = np.zeros((nthreads, k, width), np.float32)
    if g.size:
        cols = np.empty((nthreads, hout * wout, width), np.float32)
        _backward.conv_dw(x, g, partial, cols, *_geometry(win))
    return partial.sum(axis=0).reshape(k, win.fh, win.fw, c)


def conv2d_backward(x, w, dout, stride=1, pad=0, dilation=1, groups=1):
    """Return (dx, dw, db) of conv2d(x, w, b, stride, pad, dilation, groups=groups) given dout.

    Matches conv2d_backward_reference; db is dout summed over N, Hout and Wout.
    """
    x = _args.input_array(x)
    cg = w if isinstance(w, ConvGrad) else ConvGrad(w, groups)
    _args.channels(x, cg.channels)
    dx = conv2d_backward_input(dout, cg, x.shape[1:3], stride, pad, dilation)
    dw = conv2d_backward_weights(x, dout, cg.w.shape[1:3], stride, pad, dilation, cg.groups)
    db = np.asarray(dout, np.float32).sum(axis=(0, 1, 2), dtype=np.float64).astype(np.float32)
    return dx, dw, db


def local2d_backward(x, w, dout, stride=1, pad=0, dilation=1):
    """Return (dx, dw, db) of local2d(x, w, b, ...); matches local2d_backward_reference."""
    x = _args.input_array(x)
    w = _args.weights(w, 6, "(Hout, Wout, K, FH, FW, C)")
    hout, wout, k, fh, fw, c = w.shape
    _args.channels(x, c)
    win = Window.make([fh, fw], stride, pad, dilation)
    if win.out_hw(x.shape[1], x.shape[2]) != (hout, wout):
        raise ShapeError(
            f"w is for a {hout}x{wout} output, x gives {win.out_hw(x.shape[1], x.shape[2])}",
            field="w",
        )
    g = _dout(dout, x.shape[0], (hout, wout), k)
    dx = np.zeros(x.shape, np.float32)
    dw = np.zeros(w.shape, np.float32)
    if g.size:
        _threads.enter(g.size * fh * fw * c)
        _backward.local_backward_dx(g, w, dx, *_geometry(win))
        _backward.local_backward_dw(x, g, dw, *_geometry(win))
    return dx, dw, g.sum(axis=0, dtype=np.float64).astype(np.float32)


def local2d_backward_input(dout, w, hw, stride=1, pad=0, dilation=1) -> np.ndarray:
    """Return dx (N, H, W, C) of local2d(x, w, ...) for x of spatial size hw = (H, W)."""
    w = _args.weights(w, 6, "(Hout, Wout, K, FH, FW, C)")
    hout, wout, k, fh, fw, c = w.shape
    win = Window.make([fh, fw], stride, pad, dilation)
    g = _args.input_array(dout, "dout")
    if g.shape[1:] != (hout, wout, k):
        raise ShapeError(f"dout must be (N, {hout}, {wout}, {k}), got {g.shape}", field="dout")
    dx = np.zeros((g.shape[0], *hw, c), np.float32)
    if g.size:
        _threads.enter(g.size * fh * fw * c)
        _backward.local_backward_dx(g, w, dx, *_geometry(win))
    return dx


def max_pool2d_argmax(x, size, stride=None, pad=0, dilation=1):
    """Return (out, idx): max_pool2d's output and each window's first maximum as iy*W + ix."""
    x = _args.input_array(x)
    win = Window.make(size, size if stride is None else stride, pad, dilation)
    hout, wout = win.out_hw(x.shape[1], x.shape[2])
    out = np.empty((x.shape[0], hout, wout, x.shape[3]), np.float32)
    idx = np.empty(out.shape, np.int64)
    if out.size:
        _threads.enter(out.size * win.fh * win.fw)
        _backward.max_pool_argmax(x, out, idx, *_geometry(win))
    return out, idx


def max_pool2d_backward_idx(idx: np.ndarray, dout, hw) -> np.ndarray:
    """Return dx (N, H, W, C): dout added at each window's argmax idx (max_pool2d_argmax)."""
    n, _, _, c = idx.shape
    g = _dout(dout, n, idx.shape[1:3], c)
    dx = np.zeros((n, *hw, c), np.float32)
    if g.size:
        _threads.enter(g.size)
        _backward.max_pool_backward(g, idx, dx)
    return dx


def max_pool2d_backward(x, dout, size, stride=None, pad=0, dilation=1) -> np.ndarray:
    """Return dx of max_pool2d: each window's dout to its first maximum (as PyTorch)."""
    x = _args.input_array(x)
    _, idx = max_pool2d_argmax(x, size, stride, pad, dilation)
    return max_pool2d_backward_idx(idx, dout, x.shape[1:3])


def avg_pool2d_backward(x, dout, size, stride=None, pad=0, count_pad=False) -> np.ndarray:
    """Return dx of avg_pool2d: each window's dout / count spread over its in-image cells.

    Only x's shape is read (an array or an (N, H, W, C) tuple).
    """
    shape = tuple(x) if isinstance(x, tuple) else _args.input_array(x).shape
    win = Window.make(size, size if stride is None else stride, pad)
    g = _dout(dout, shape[0], win.out_hw(shape[1], shape[2]), shape[3])
    dx = np.zeros(shape, np.float32)
    if g.size:
        _threads.enter(g.size * win.fh * win.fw)
        _backward.avg_pool_backward(
            g, dx, win.fh, win.fw, win.sh, win.sw, win.top, win.left, bool(count_pad)
        )
    return dx


def relu_backward(y, dout) -> np.ndarray:
    """Return dout where y (the ReLU's output or input) > 0, else 0; any shape."""
    y = _args.read_only(np.ascontiguousarray(y, np.float32))
    g = _args.read_only(np.ascontiguousarray(dout, np.float32))
    if g.shape != y.shape:
        raise ShapeError(f"dout must have the shape {y.shape}, got {g.shape}", field="dout")
    out = np.empty(y.shape, np.float32)
    if y.size:
        _threads.enter(y.size)
        _backward.relu_backward(y.reshape(-1), g.reshape(-1), out.reshape(-1))
    return out


__all__ = [
    "ConvGrad",
    "avg_pool2d_backward",
    "conv2d_backward",
    "conv2d_backward_input",
    "conv2d_backward_weights",
    "local2d_backward",
    "local2d_backward_input",
    "max_pool2d_argmax",
    "max_pool2d_backward",
    "max_pool2d_backward_idx",
    "relu_backward",
    "warmup",
]


def warmup() -> None:
    """Compile, or load from Numba's cache, every backward kernel (convq warmup runs this)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 5, 2)).astype(np.float32)
    w = np.ones((2, 3, 3, 2), np.float32)
    for stride in (1, 2):
        hout = (5 + 2 - 3) // stride + 1
        conv2d_backward(x, w, np.ones((1, hout, hout, 2), np.float32), stride, 1)
    local2d_backward(x, np.ones((3, 3, 2, 3, 3, 2), np.float32), np.ones((1, 3, 3, 2), np.float32))
    max_pool2d_backward(x, np.ones((1, 2, 2, 2), np.float32), 3, 2)
    avg_pool2d_backward(x, np.ones((1, 2, 2, 2), np.float32), 3, 2)
    relu_backward(x, x)
