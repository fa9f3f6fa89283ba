"""Fast-path layers: the same arguments and results as engine.reference, computed by Numba kernels.

x is (N, H, W, C) float32 NHWC; conv weights w are (K, FH, FW, C) (OHWI) with bias (K,); local
weights are (Hout, Wout, K, FH, FW, C) with bias (Hout, Wout, K). stride and dilation are an int
or (h, w); pad an int, (h, w) or (top, left, bottom, right). Output sizes floor like PyTorch:
Hout = (H + top + bottom - DH*(FH-1) - 1)//SH + 1. Every function matches its *_reference to
float32 rounding (tests/unit/test_ops*.py); threading is explained in engine._threads.

conv2d runs one of the kernels of engine.kernels, all with bias and ReLU fused into the GEMM's
store, chosen per layer shape (by measurement on this machine, else by the CPU's ISA):
- pointwise: 1x1, stride 1, no pad: a direct GEMM on the input's pixels (no im2col);
- winograd: 3x3, stride 1: Winograd F(2x2, 3x3) (engine._winograd);
- implicit: outputs >= IMPLICIT_MIN_WIDTH wide: the micro-kernel reading windows straight from
  the input (a padded copy of it when the layer pads), no column buffer;
- im2col: tiles of TILE_BYTES per thread, each packed then multiplied.
The GEMM is one of engine._gemm's micro-kernel families (avx512, avx2) or one single-threaded
BLAS sgemm per tile (blas). Tiles never cross images and their sizes depend on neither N nor
the thread count, so an image's result is bit-identical whatever batch it came in.

conv2d's groups (PyTorch's): w is (K, FH, FW, C/groups). Depthwise (C/groups == 1, any
multiplier K/C) runs engine._conv.conv_depthwise, a direct kernel: each output is FH*FW
multiply-adds, too few for a GEMM to pay for its packing.
Other groups run the paths above once per group on that group's channels (copied out, once)
and filters (packed per group).
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from . import _args, _cache, _threads, kernels
from ._threads import get_threads, set_threads
from .errors import InputError, ShapeError
from .geometry import Window

with _cache.versioned():  # the kernels find (and save) their compiled code by source version
    from . import _conv, _gemm, _grouped_kernel, _pool, _winograd

# Rows of im2col packed per tile: tile_bytes / (Kc * 4), so a tile's columns stay in L2 whatever
# Kc is; measured in bench/engine.py (see bench/README.md).
TILE_BYTES = 512 * 1024
MIN_TILE_ROWS = 16
# Threads also split a GEMM's columns when there are fewer row tiles per thread than this and
# rows alone would give the busiest thread more than SPLIT_IMBALANCE times the average work.
COLUMN_SPLIT_TILES = 4
SPLIT_IMBALANCE = 1.15
IMPLICIT_MIN_WIDTH = kernels.IMPLICIT_MIN_WIDTH  # the tallest micro-kernel block
assert _gemm.TALLEST <= IMPLICIT_MIN_WIDTH
# Thin inputs (C <= this) whose filter count fills few micro-kernel lanes (K=32 of a 48-lane
# block) run two adjacent output pixels per GEMM row instead: 2K lanes over a window one pixel
# wider (32x3 K32 F5: 75 of 90 multiply-adds useful instead of 32 of 48 lanes). Measured at
# N=32: K32 F5 1.30 -> 1.21 ms, K24 F5 1.69 -> 1.21, K32 F7 2.59 -> 2.35; but K32 F3 0.62 ->
# 0.81 (the wider window costs more than the lanes save), three pixels (K16) and stride 2 no
# better: so only 5x5 and wider, stride 1. (K=32 now has a 3x32 block of its own, no padding;
# two pixels serve filter counts whose two pixels fill one block exactly: K=24 and K=16.)
WIDE_MAX_C = 16
WIDE_MIN_FW = 5

_workspace = threading.local()


def _scratch(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Return a reused float32 buffer of this shape, grown as needed, per Python thread (trap 2)."""
    need = math.prod(shape)
    buf = getattr(_workspace, name, None)
    if buf is None or buf.size < need:
        buf = np.empty(max(need, 1), np.float32)
        setattr(_workspace, name, buf)
    return buf[:need].reshape(shape)


def _columns(nthreads: int, rows: int, width: int) -> np.ndarray:
    """Return the reused (nthreads, rows, width) im2col workspace, one slot per thread."""
    return _scratch("buf", (nthreads, rows, width))


def _counter() -> np.ndarray:
    """Return a fresh tile counter for a kernel that hands out tiles atomically (_gemm.claim)."""
    return np.zeros(1, np.int64)


def _tile_rows(per_image: int, width: int) -> int:
    """Pick rows per tile: about TILE_BYTES of columns, and an image split over every core.

    Depends on neither N nor set_threads(), so results are bit-identical whatever the batch
    and thread count (tests/unit/test_ops.py).
    """
    rows = max(MIN_TILE_ROWS, TILE_BYTES // (4 * width))
    tiles = max(_threads.max_threads(), -(-per_image // rows))
    return _round_up(-(-per_image // tiles))


def _column_splits(
    table: np.ndarray, n: int, per_image: int, tile: int, nthreads: int
) -> np.ndarray:
    """Return the weight-block boundaries cutting a GEMM's columns into parts (see
    _conv.conv_im2col_mk): one part, unless handing out row tiles alone would leave the
    busiest thread more than SPLIT_IMBALANCE times the average work; then one per thread.

    One small image has a few row tiles of unequal size (7x7 outputs: 48 rows and 1), so rows
    alone leave threads idle. Parts change no result: each column is computed the same way in
    any part. Splitting costs a re-read (im2col: a re-pack) of each row tile per part, so it
    is kept for when the rows cannot be shared out evenly.
    """
    nblocks = table.shape[0]
    whole = _one_part(table)
    tiles_per_image = -(-per_image // tile)
    if nthreads < 2 or nblocks < 2 or n * tiles_per_image >= COLUMN_SPLIT_TILES * nthreads:
        return whole
    # MR-row blocks each thread computes when free threads take the next tile (a partial
    # block costs a whole one)
    last = per_image - (tiles_per_image - 1) * tile
    work = [-(-tile // _gemm.MR)] * (tiles_per_image - 1) + [-(-last // _gemm.MR)]
    loads = [0] * nthreads
    for w in work * n:
        loads[loads.index(min(loads))] += w
    if max(loads) <= SPLIT_IMBALANCE * sum(loads) / nthreads:
        return whole
    return _even_parts(table, nthreads)


def _one_part(table: np.ndarray) -> np.ndarray:
    """Return the block boundaries [0, nblocks]: every column in one part (made once per count;
    kernels only read it)."""
    nblocks = table.shape[0]
    whole = _whole.get(nblocks)
    if whole is None:
        whole = _whole[nblocks] = np.array([0, nblocks], np.int64)
    return whole


_whole: dict[int, np.ndarray] = {}


def _even_parts(table: np.ndarray, parts: int) -> np.ndarray:
    """Return block boundaries cutting table's blocks into at most `parts` runs of about
    equal column counts."""
    nblocks = table.shape[0]
    starts = table[:, 2]  # each block's first column
    total = int(starts[-1] + table[-1, 1])
    cuts = {int(np.searchsorted(starts, total * j / parts)) for j in range(1, parts)}
    return np.array(sorted({0, nblocks} | cuts), np.int64)


def _round_up(rows: int) -> int:
    """Round rows up to whole micro-kernel blocks (MR rows)."""
    return -(-rows // _gemm.MR) * _gemm.MR


class ConvWeights:
    """Conv weights w (K, FH, FW, C/groups) and bias b (K,) or None, checked once, with each
    packed form made on first use.

    conv2d takes one in place of w (and uses its b when given none); a Model keeps one per
    layer, so a worker packs its filters once rather than on every run (1x1 28x28x256 K64 at
    N=1: 23 of 300 us; a 3x3x128x128 Winograd filter transform: ~130 us of 1.1 ms). With
    groups > 1 filters [g*K/groups, (g+1)*K/groups) see only channels [g*C/groups, ...) and are
    packed per group; depthwise filters are kept as (FH, FW, m, C) taps instead (K = C*m).
    """

    def __init__(self, w, b=None, groups=1) -> None:
        self.w = _args.weights(w, 4, "(K, FH, FW, C/groups)")
        k = self.w.shape[0]
        self.groups = _groups(groups, k)
        self.b = None if b is None else _args.param(b, (k,), "b")
        self._parts: list[ConvWeights] | None = None
        self._depthwise: np.ndarray | None = None
        self._wmat: np.ndarray | None = None
        self._gemm: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # by GEMM family
        self._winograd: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._wide: dict[tuple[int, int, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._grouped: tuple[np.ndarray, np.ndarray] | None = None
        self._grouped_tiles: dict[str, np.ndarray] = {}  # by grouped kernel family

    def _matrix(self) -> np.ndarray:
        k = self.w.shape[0]
        return _args.read_only(np.ascontiguousarray(self.w.reshape(k, -1).T))

    def wmat(self) -> np.ndarray:
        """Return w as the (FH*FW*C, K) GEMM operand (the BLAS fallback's; kept)."""
        if self._wmat is None:
            self._wmat = self._matrix()
        return self._wmat

    def gemm_blocks(self, family: str = "avx512") -> tuple[np.ndarray, np.ndarray]:
        """Return the micro-kernel's packed (blocks, table) of wmat for a GEMM family.

        The operand it is packed from is not kept: the blocks are all the micro-kernel reads.
        """
        if family not in self._gemm:
            wmat = self._wmat if self._wmat is not None else self._matrix()
            self._gemm[family] = _gemm.pack_weights(wmat, family)
        return self._gemm[family]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed forms made so far (w itself not counted)."""
        parts = [self._wmat]
        parts += [a for packed in (*self._gemm.values(), *self._winograd.values()) for a in packed]
        parts += [a for packed in self._wide.values() for a in packed]
        parts.append(self._depthwise)
        parts.append(self._grouped[0] if self._grouped is not None else None)
        parts += list(self._grouped_tiles.values())
        groups = sum(part.nbytes for part in self._parts or ())
        return groups + sum(p.nbytes for p in parts if p is not None)

    def group_parts(self) -> list[ConvWeights]:
        """Return one ConvWeights per group (filters of that group, C/groups channels)."""
        if self._parts is None:
            kg = self.w.shape[0] // self.groups
            self._parts = [ConvWeights(self.w[g * kg : (g + 1) * kg]) for g in range(self.groups)]
        return self._parts

    def depthwise_taps(self) -> np.ndarray:
        """Return depthwise w (C*m, FH, FW, 1) as the (FH, FW, m, C) taps of the direct kernel."""
        if self._depthwise is None:
            k, fh, fw, _ = self.w.shape
            per_channel = self.w.reshape(self.groups, k // self.groups, fh, fw)  # [ci, q, fy, fx]
            taps = np.ascontiguousarray(per_channel.transpose(2, 3, 1, 0))
            self._depthwise = _args.read_only(taps)
        return self._depthwise

    def grouped_taps(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (wp (FH, FW, CG, KG, G), bias index (KG, G)) for the grouped direct kernel:
        filter g*KG + kj's taps at wp[..., kj, g] (engine._grouped_kernel)."""
        if self._grouped is None:
            k, fh, fw, cg = self.w.shape
            ng = self.groups
            kg = k // ng
            wp = self.w.reshape(ng, kg, fh, fw, cg).transpose(2, 3, 4, 1, 0)
            order = np.arange(k).reshape(ng, kg).T  # [kj, g] -> filter g*KG + kj
            self._grouped = (_args.read_only(np.ascontiguousarray(wp)), order)
        return self._grouped

    def grouped_tile_taps(self, family: str) -> np.ndarray:
        """Return the weights of the tiled grouped kernel of family (engine._grouped_kernel):
        (B, FH*FW, CG, KGp, L), filter g*KG + kj's tap t for channel ci at [g // L, t, ci, kj,
        g % L], zero for the filters and groups padding KG to the tile's and G to B*L."""
        if family not in self._grouped_tiles:
            k, fh, fw, cg = self.w.shape
            ng = self.groups
            kg = k // ng
            fits = _grouped_kernel.tile(family, kg)
            assert fits is not None, "a tiled grouped kernel chosen for more filters than it holds"
            kgp, _, lanes = fits
            gp = -(-ng // lanes) * lanes
            wp = np.zeros((fh, fw, cg, kgp, gp), np.float32)
            wp[:, :, :, :kg, :ng] = self.w.reshape(ng, kg, fh, fw, cg).transpose(2, 3, 4, 1, 0)
            wp = wp.reshape(fh * fw, cg, kgp, gp // lanes, lanes).transpose(3, 0, 1, 2, 4)
            self._grouped_tiles[family] = _args.read_only(np.ascontiguousarray(wp))
        return self._grouped_tiles[family]

    def pixels_per_row(self, fw: int, family: str = "avx512") -> int:
        """Return 2 if a stride-1 row of FW-wide windows should compute two pixels, else 1."""
        k = self.w.shape[0]
        if fw < WIDE_MIN_FW or _gemm.plan_blocks(2 * k, family) != [2 * k]:
            return 1  # only where two pixels fill one block exactly
        # Useful lanes now (K of its padded blocks) against useful terms of the wider window.
        return 2 if fw / (fw + 1) > k / sum(_gemm.plan_blocks(k, family)) else 1

    def wide_blocks(
        self, g: int, sw: int, family: str = "avx512"
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (blocks, table, bias index) of the filters for g pixels per GEMM row.

        Row p of the (FH*FWu*C, g*K) operand, FWu = FW + (g-1)*SW, is a union-window element;
        column q*K + j holds filter j placed at pixel q's columns of it, zeros elsewhere.
        """
        key = (g, sw, family)
        if key not in self._wide:
            k, fh, fw, c = self.w.shape
            fwu = fw + (g - 1) * sw
            wide = np.zeros((fh, fwu, c, g * k), np.float32)
            for q in range(g):
                wide[:, q * sw : q * sw + fw, :, q * k : (q + 1) * k] = self.w.transpose(1, 2, 3, 0)
            blocks, table = _gemm.pack_weights(wide.reshape(fh * fwu * c, g * k), family)
            self._wide[key] = (blocks, table, np.tile(np.arange(k), g))
        return self._wide[key]

    def winograd_blocks(self, family: str = "avx512") -> tuple[np.ndarray, np.ndarray]:
        """Return the transformed filters (blocks, table) of engine._winograd for a family."""
        if family not in self._winograd:
            self._winograd[family] = _winograd.pack_filters(self.w, family)
        return self._winograd[family]


def _groups(groups, k: int) -> int:
    """Return groups as an int >= 1 dividing K, or raise ShapeError."""
    if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ShapeError(f"groups must be an int >= 1, got {groups!r}", field="groups")
    if k % groups:
        raise ShapeError(
            f"groups={groups} must divide the filter count K={k} (w is (K, FH, FW, C/groups));"
            f" {k} % {groups} = {k % groups}",
            field="groups",
        )
    return int(groups)


def conv2d(
    x, w, b=None, stride=1, pad=0, dilation=1, relu=False, groups=1, out=None, accumulate=False
) -> np.ndarray:
    """Convolve x (N, H, W, C) with w (K, FH, FW, C/groups) plus b (K,); return (N, Hout, Wout, K).

    Matches conv2d_reference. With relu=True the ReLU is applied in the same pass. w may be a
    ConvWeights, whose packed forms (and groups, and b when b is None) are then used. groups
    splits channels and filters into that many independent convs (PyTorch's groups); with
    C/groups == 1 (depthwise) a direct kernel runs, otherwise the GEMM paths run per group.
    out: write the result there and return it, (N, Hout, Wout, K) float32 whose channels are
    contiguous (a channel slice of a wider NHWC buffer, such as a concat's, is fine). With
    accumulate=True the result is added to what out holds before the ReLU (a residual add
    fused into the store where the kernel path allows, else one extra pass).
    """
    x = _args.input_array(x)
    if isinstance(w, ConvWeights):
        cw = w
        if groups not in (1, cw.groups):
            raise ShapeError(
                f"groups={groups!r} given but the ConvWeights were made with groups={cw.groups}",
                field="groups",
            )
    else:
        cw = ConvWeights(w, groups=groups)
    w = cw.w
    k, fh, fw, cg = w.shape
    ng = cw.groups
    if ng == 1:
        _args.channels(x, cg)
    elif x.shape[3] != cg * ng:
        raise ShapeError(
            f"x has {x.shape[3]} channels but w expects C/groups * groups = {cg} * {ng} = "
            f"{cg * ng}: groups must divide C and w's last axis be C/groups",
            field="groups",
        )
    if b is not None:
        bias = _args.param(b, (k,), "b")
    elif cw.b is not None:
        bias = cw.b
    else:
        bias = _args.read_only(np.zeros(k, np.float32))
    win = Window.make([fh, fw], stride, pad, dilation)
    n, h, w_in, c = x.shape
    hout, wout = win.out_hw(h, w_in)
    if out is None:
        if accumulate:
            raise InputError("accumulate=True needs out= holding what to add to", field="out")
        out = np.empty((n, hout, wout, k), np.float32)
    else:
        _check_out(out, (n, hout, wout, k))
    if out.size == 0:
        return out
    if ng == 1:
        _dense_conv(x, cw, bias, out, win, bool(relu), bool(accumulate))
    elif accumulate or not out.flags.c_contiguous:
        _via_temp(x, cw, bias, out, win, bool(relu), bool(accumulate))
    elif cg == 1:
        _threads.enter(out.size * fh * fw)
        _conv.conv_depthwise(
            x,
            cw.depthwise_taps(),
            bias,
            out,
            win.sh,
            win.sw,
            win.dh,
            win.dw,
            win.top,
            win.left,
            bool(relu),
        )
    else:
        _grouped_conv(x, cw, bias, out, win, bool(relu))
    return out


def _check_out(out, shape: tuple) -> None:
    """Raise InputError unless out can take a conv result of shape in place (see conv2d)."""
    ok = (
        isinstance(out, np.ndarray)
        and out.dtype == np.float32
        and out.shape == shape
        and out.flags.writeable
    )
    if ok and out.size:
        st = out.strides  # channels contiguous, and pixels, rows and images evenly spaced
        ok = st[3] == 4 and st[1] == st[2] * shape[2] and st[0] == st[1] * shape[1]
        ok = ok and st[2] >= 4 * shape[3]
    if not ok:
        raise InputError(
            f"out must be a writeable float32 array of shape {shape} with contiguous channels",
            field="out",
        )


def _rows(out: np.ndarray) -> np.ndarray:
    """Return out (N, Hout, Wout, K) viewed as (N*Hout*Wout, K) rows, never a copy."""
    view = out.view()
    view.shape = (-1, out.shape[3])
    return view


def _via_temp(x, cw: ConvWeights, bias, out, win: Window, relu: bool, acc: bool) -> None:
    """Run the conv into a new array, then store (or add) it into out: for paths whose kernels
    write only a whole contiguous output (one extra pass over it)."""
    tmp = np.empty(out.shape, np.float32)
    if cw.groups == 1:
        _dense_conv(x, cw, bias, tmp, win, relu and not acc)
    else:
        tmp = conv2d(x, cw, bias, (win.sh, win.sw), win.pad, (win.dh, win.dw), relu and not acc)
    if not acc:
        out[...] = tmp
        return
    out += tmp
    if relu:
        np.maximum(out, np.float32(0), out=out)


def _grouped_conv(x, cw: ConvWeights, bias, out, win: Window, relu: bool) -> None:
    """Run a grouped conv into out: few filters per group through the direct kernel, else
    each group's conv through the GEMM paths into its channel slice of out.

    Direct: the input is copied once with its channels regrouped (see engine._grouped_kernel).
    Per group: each group's channels are copied out once (the kernels read contiguous NHWC), so
    the whole input is copied once in all; each group's result is copied into out's slice.
    """
    cg = cw.w.shape[3]
    kg = cw.w.shape[0] // cw.groups
    if kernels.grouped(x.shape[3], cw.w.shape[0], cw.groups):
        shape = _shape(cw.w.shape, win, out.shape[2], cw.groups)
        name = kernels.choose(shape, _threads.max_threads())
        if name != kernels.GROUPED_DIRECT:
            _grouped_tiled(x, cw, bias, out, win, relu, kernels.split(name)[1])
            return
        n, h, w = x.shape[:3]
        xp = x.reshape(n, h, w, cw.groups, cg).transpose(0, 1, 2, 4, 3)
        xp = _args.read_only(np.ascontiguousarray(xp))
        wp, order = cw.grouped_taps()
        _threads.enter(out.size * win.fh * win.fw * cg)
        _grouped_kernel.grouped_direct(
            xp,
            wp,
            _args.read_only(np.ascontiguousarray(bias[order])),
            out,
            win.sh,
            win.sw,
            win.dh,
            win.dw,
            win.top,
            win.left,
            relu,
        )
        return
    part_out = np.empty(out.shape[:3] + (kg,), np.float32)
    for g, part in enumerate(cw.group_parts()):
        xg = _args.read_only(np.ascontiguousarray(x[..., g * cg : (g + 1) * cg]))
        _dense_conv(xg, part, bias[g * kg : (g + 1) * kg], part_out, win, relu)
        out[..., g * kg : (g + 1) * kg] = part_out


def _grouped_tiled(x, cw: ConvWeights, bias, out, win: Window, relu: bool, family: str) -> None:
    """Run a grouped conv through the tiled kernel of family: the input is copied once,
    regrouped and padded so that every window lies inside it (engine._grouped_kernel)."""
    wp = cw.grouped_tile_taps(family)
    blocks, taps, cg, kgp, lanes = wp.shape
    ng = cw.groups
    kg = cw.w.shape[0] // ng
    n, hout, wout = out.shape[:3]
    hp = (hout - 1) * win.sh + (win.fh - 1) * win.dh + 1
    wpd = (wout - 1) * win.sw + (win.fw - 1) * win.dw + 1
    xpad = np.empty((n, blocks, hp, wpd, cg, lanes), np.float32)
    _threads.enter(xpad.size)
    _grouped_kernel.regroup(x, xpad, win.top, win.left, ng)
    bp = np.zeros((kgp, blocks * lanes), np.float32)
    bp[:kg, :ng] = bias.reshape(ng, kg).T
    bp = np.ascontiguousarray(bp.reshape(kgp, blocks, lanes).transpose(1, 0, 2))
    col = cg * lanes
    rows, cols = np.arange(win.fh) * (win.dh * wpd * col), np.arange(win.fw) * (win.dw * col)
    toff = np.add.outer(rows, cols).ravel().astype(np.int64)  # tap (fy, fx): its offset
    _threads.enter(out.size * taps * cg)
    _grouped_kernel.grouped_tiled[(family, kgp)](xpad, wp, bp, toff, out, win.sh, win.sw, ng, relu)


def _dense_conv(x, cw: ConvWeights, bias, out, win: Window, relu: bool, acc=False) -> None:
    """Run an ungrouped conv into out (N, Hout, Wout, K) by the kernel chosen for its shape.

    out may be a channel slice of a wider buffer and acc add to it (see conv2d): the micro-kernel
    families store that way themselves; BLAS's, and the implicit GEMM's with acc (it recomputes
    a row's last few outputs), go through _via_temp.
    """
    k, fh, fw, c = cw.w.shape
    n, hout, wout = out.shape[:3]
    name = kernels.choose(_shape(cw.w.shape, win, wout), _threads.max_threads())
    path, family = kernels.split(name)
    if (acc or not out.flags.c_contiguous) and (family == "blas" or (acc and path == "implicit")):
        _via_temp(x, cw, bias, out, win, relu, acc)
        return
    nthreads = _threads.enter(n * hout * wout * k * fh * fw * c)
    _RUN[path](x, cw, bias, out, win, nthreads, relu, family, acc)


def _shape(w_shape: tuple[int, ...], win: Window, wout: int, groups: int = 1) -> kernels.ConvShape:
    k, fh, fw, cg = w_shape
    padded = win.pad != (0, 0, 0, 0)
    return kernels.ConvShape(cg * groups, k, fh, fw, win.sh, win.sw, padded, wout, groups)


def conv_kernel(x_shape, w, stride=1, pad=0, dilation=1, groups=1, layer=None) -> str:
    """Return the name of the kernel conv2d runs for x of x_shape (N, H, W, C) and weights w
    (an array, its shape, or a ConvWeights) with these arguments (engine.kernels)."""
    if isinstance(w, ConvWeights):
        groups, w = w.groups, w.w
    w_shape = tuple(getattr(w, "shape", w))
    if w_shape[3] == 1 and groups > 1:
        return kernels.DIRECT
    win = Window.make([w_shape[1], w_shape[2]], stride, pad, dilation)
    wout = win.out_hw(x_shape[1], x_shape[2])[1]
    if kernels.grouped(x_shape[3], w_shape[0], groups):
        shape = _shape(w_shape, win, wout, groups)
        return kernels.choose(shape, _threads.max_threads(), layer)
    part = (w_shape[0] // groups, *w_shape[1:])
    return kernels.choose(_shape(part, win, wout), _threads.max_threads(), layer)


def _pointwise(
    x, cw: ConvWeights, bias, out, win: Window, nthreads: int, relu, family, acc=False
) -> None:
    """Run a 1x1 stride-1 unpadded conv as one GEMM on the pixels: out2d (M, K)."""
    n, hout, wout, k = out.shape
    c = x.shape[3]
    m = n * hout * wout
    tile = _tile_rows(hout * wout, c)
    x2d, out2d = x.reshape(m, c), _rows(out)
    if family == "blas":
        _conv.conv_pointwise(x2d, cw.wmat(), bias, out2d, hout * wout, nthreads, tile, relu)
        return
    cols = _columns(nthreads, tile, c)
    blocks, table = cw.gemm_blocks(family)
    splits = _column_splits(table, n, hout * wout, tile, nthreads)
    _conv.conv_pointwise_mk(
        x2d, blocks, table, bias, out2d, cols, hout * wout, tile, relu, _counter(), acc, splits
    )


def _im2col(
    x, cw: ConvWeights, bias, out, win: Window, nthreads: int, relu, family, acc=False
) -> None:
    """Run a conv as im2col tiles packed per thread, each multiplied (any window)."""
    k, fh, fw, c = cw.w.shape
    n, hout, wout = out.shape[:3]
    out2d = _rows(out)
    geometry = (hout, wout, fh, fw, win.sh, win.sw, win.dh, win.dw, win.top, win.left)
    width = fh * fw * c
    tile = _tile_rows(hout * wout, width)
    cols = _columns(nthreads, tile, width)
    if family == "blas":
        _conv.conv_im2col(x, cw.wmat(), bias, out2d, cols, tile, *geometry, relu)
        return
    blocks, table = cw.gemm_blocks(family)
    splits = _column_splits(table, n, hout * wout, tile, nthreads)
    _conv.conv_im2col_mk(
        x, blocks, table, bias, out2d, cols, tile, *geometry, relu, _counter(), acc, splits
    )


def _implicit_conv(
    x, cw: ConvWeights, bias, out, win: Window, nthreads: int, relu, family="avx512", acc=False
) -> None:
    """Run a conv as implicit GEMM (engine._conv.conv_implicit_mk) into out (N, Hout, Wout, K);
    out may be a channel slice of a wider buffer, never accumulated into (see _dense_conv)."""
    assert not acc, "the implicit GEMM recomputes rows: accumulate through _via_temp"
    n, h, w, c = x.shape
    hout, wout, k = out.shape[1:]
    out2d = _rows(out)
    xp = x
    if win.pad != (0, 0, 0, 0):
        xp = np.zeros((n, h + win.top + win.bottom, w + win.left + win.right, c), np.float32)
        xp[:, win.top : win.top + h, win.left : win.left + w] = x
        xp = _args.read_only(xp)
    g = cw.pixels_per_row(win.fw, family) if c <= WIDE_MAX_C and (win.sw, win.dw) == (1, 1) else 1
    # A two-pixel row also multiplies its neighbours' extra columns by zero: exact for finite
    # inputs (the same FMA chain plus zeros), but 0 * inf would be NaN where the plain path
    # gives a number, so non-finite inputs keep the plain path (a cheap pass: C is small).
    # (two pixels per row need out2d's rows contiguous: a concat's slice takes one per row)
    wide = g > 1 and wout % g == 0 and wout // g >= IMPLICIT_MIN_WIDTH
    if wide and out2d.flags.c_contiguous and np.isfinite(x).all():
        blocks, table, cols = cw.wide_blocks(g, win.sw, family)
        offs = _window_offsets(win.fh, win.fw + (g - 1) * win.sw, c, win.dh, 1, xp.shape[2])
        _conv.conv_implicit_mk(
            xp,
            offs,
            blocks,
            table,
            _args.read_only(bias[cols]),
            out2d.reshape(-1, g * k),
            nthreads,
            hout,
            wout // g,
            win.sh,
            g * win.sw,
            relu,
            _counter(),
        )
        return
    offs = _window_offsets(win.fh, win.fw, c, win.dh, win.dw, xp.shape[2])
    blocks, table = cw.gemm_blocks(family)
    _conv.conv_implicit_mk(
        xp, offs, blocks, table, bias, out2d, nthreads, hout, wout, win.sh, win.sw, relu, _counter()
    )


@functools.lru_cache(maxsize=256)
def _window_offsets(fh: int, fw: int, c: int, dh: int, dw: int, row: int) -> np.ndarray:
    """Return (FH*FW*C,) int64 offsets (fy*DH*row + fx*DW)*C + c of a window's elements from its
    corner in an NHWC image `row` pixels wide (read-only: it is shared between calls)."""
    fy = np.arange(fh, dtype=np.int64)[:, None, None] * (dh * row)
    fx = np.arange(fw, dtype=np.int64)[None, :, None] * dw
    return _args.read_only(((fy + fx) * c + np.arange(c, dtype=np.int64)).reshape(-1))


def _winograd_conv(
    x,
    cw: ConvWeights,
    bias,
    out,
    win: Window,
    nthreads: int,
    relu: bool,
    family="avx512",
    acc=False,
) -> None:
    """Run a 3x3 stride-1 conv through engine._winograd into out (N, Hout, Wout, K)."""
    k, c = cw.w.shape[0], cw.w.shape[3]
    blocks, table = cw.winograd_blocks(family)
    ty0, tyn = _winograd.tile_origins(out.shape[1], win.dh)
    tx0, txn = _winograd.tile_origins(out.shape[2], win.dw)
    t = _winograd.TILES
    tiles = x.shape[0] * len(ty0) * len(tx0)
    group = _winograd.group_size(tiles, nthreads)
    splits = _one_part(table)
    if 1 < nthreads and tiles < nthreads * t:
        # Too few tiles for a full group per thread (one small image): one group of them all
        # (or a few), its columns shared by the threads, so each streams only its part of the
        # 16 transformed filter planes and the GEMMs get as many rows as there are tiles.
        group = min(t, tiles)
        splits = _even_parts(table, nthreads)
    v = _scratch("wino_v", (nthreads, 16, t * c + _winograd.SKEW))
    m = _scratch("wino_m", (nthreads, 16, t * k + _winograd.SKEW))
    patch = _scratch("wino_patch", (nthreads, 2, 16, max(c, k)))
    _winograd.conv3x3(
        x,
        blocks,
        table,
        bias,
        out,
        ty0,
        tyn,
        tx0,
        txn,
        win.dh,
        win.dw,
        win.top,
        win.left,
        v,
        m,
        patch,
        group,
        relu,
        _counter(),
        acc,
        splits,
    )


_RUN = {  # kernel path -> its runner (engine.kernels.PATHS)
    "pointwise": _pointwise,
    "winograd": _winograd_conv,
    "implicit": _implicit_conv,
    "im2col": _im2col,
}


def local2d(x, w, b=None, stride=1, pad=0, dilation=1, relu=False) -> np.ndarray:
    """Locally-connected layer: w (Hout, Wout, K, FH, FW, C) unshared, b (Hout, Wout, K).

    Matches local2d_reference; returns (N, Hout, Wout, K).
    """
    x = _args.input_array(x)
    w = _args.weights(w, 6, "(Hout, Wout, K, FH, FW, C)")
    hout, wout, k, fh, fw, c = w.shape
    _args.channels(x, c)
    bias = (
        _args.read_only(np.zeros((hout, wout, k), np.float32))
        if b is None
        else _args.param(b, (hout, wout, k), "b")
    )
    win = Window.make([fh, fw], stride, pad, dilation)
    got = win.out_hw(x.shape[1], x.shape[2])
    if got != (hout, wout):
        raise ShapeError(
            f"w is for a {hout}x{wout} output but x ({x.shape[1]}x{x.shape[2]}) gives "
            f"{got[0]}x{got[1]} with this window",
            field="w",
        )
    n = x.shape[0]
    out = np.empty((n, hout, wout, k), np.float32)
    if n == 0:
        return out
    width = fh * fw * c
    nthreads = _threads.enter(n * hout * wout * k * width)
    cols = _columns(nthreads, 1, width)
    _conv.local_gemm(
        x,
        w.reshape(hout, wout, k, width),
        bias,
        out,
        cols,
        fh,
        fw,
        win.sh,
        win.sw,
        win.dh,
        win.dw,
        win.top,
        win.left,
        bool(relu),
    )
    return out


def max_pool2d(x, size, stride=None, pad=0, dilation=1) -> np.ndarray:
    """Max over each window of x (N, H, W, C), pads as -inf; matches max_pool2d_reference."""
    x = _args.input_array(x)
    win = Window.make(size, size if stride is None else stride, pad, dilation)
    hout, wout = win.out_hw(x.shape[1], x.shape[2])
    out = np.empty((x.shape[0], hout, wout, x.shape[3]), np.float32)
    if out.size:
        _threads.enter(out.size * win.fh * win.fw)
        _pool.max_pool(x, out, win.fh, win.fw, win.sh, win.sw, win.dh, win.dw, win.top, win.left)
    return out


def avg_pool2d(x, size, stride=None, pad=0, count_pad=False) -> np.ndarray:
    """Mean over each window of x (N, H, W, C); pads leave the divisor unless count_pad."""
    x = _args.input_array(x)
    win = Window.make(size, size if stride is None else stride, pad)
    hout, wout = win.out_hw(x.shape[1], x.shape[2])
    out = np.empty((x.shape[0], hout, wout, x.shape[3]), np.float32)
    if out.size:
        _threads.enter(out.size * win.fh * win.fw)
        _pool.avg_pool(x, out, win.fh, win.fw, win.sh, win.sw, win.top, win.left, bool(count_pad))
    return out


def relu(x) -> np.ndarray:
    """max(x, 0) elementwise into a new array (any shape); matches relu_reference."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise InputError(f"x must be a float32 array, got dtype {arr.dtype}", field="x")
    arr = _args.read_only(np.ascontiguousarray(arr, dtype=np.float32))
    out = np.empty(arr.shape, np.float32)
    if arr.size:
        _threads.enter(arr.size)
        _pool.relu_flat(arr.reshape(-1), out.reshape(-1))
    return out


def preprocess(images, scale: float, mean, std) -> np.ndarray:
    """Return uint8 images (N, H, W, C) as float32 ((x * scale) - mean) / std per channel.

    Bit-identical to x = images.astype(float32); x *= scale; x -= mean; x /= std (float32 scale,
    mean and std of C values), in one parallel pass instead of four.
    """
    n, h, w, c = images.shape
    images = _args.read_only(np.ascontiguousarray(images, np.uint8))  # one signature (warmup)
    row = lambda v: np.tile(np.broadcast_to(np.asarray(v, np.float32), (c,)), w)  # noqa: E731
    out = np.empty((n, h, w, c), np.float32)
    if out.size:
        _threads.enter(out.size * 4)
        _pool.preprocess(
            images.reshape(n, h, w * c),
            np.float32(scale),
            row(mean),
            row(std),
            out.reshape(n, h, w * c),
        )
    return out


def warmup(tune: bool = True) -> None:
    """Compile, or load from Numba's on-disk cache, every kernel signature the engine uses; then,
    with tune, measure which conv kernel is fastest here unless already measured (engine.tuning).
    """
    with kernels.compile_lock():  # one process compiles into the cache at a time
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, 5, 5, 2)).astype(np.float32)
        w3 = np.ones((2, 3, 3, 2), np.float32)
        wide = rng.standard_normal((1, 3, 14, 2)).astype(np.float32)
        # Every path whatever the choices say (the micro-kernel families share their compiled code:
        # a block's width picks its kernel at run time), each twice: into a new array, and into a
        # channel slice of a wider one (a concat's output), which Numba types differently.
        for sliced in (False, True):
            slot = (lambda *shape: np.empty((*shape, 4), np.float32)[..., :2]) if sliced else None
            for family in ("avx512", "blas"):
                with kernels.forced([f"pointwise-{family}", f"im2col-{family}"]):
                    conv2d(x, w3, stride=2, pad=1, relu=True, out=slot and slot(1, 3, 3))
                    conv2d(x, np.ones((2, 1, 1, 2), np.float32), out=slot and slot(1, 5, 5))
            with kernels.forced(["winograd-avx512"]):
                conv2d(x, w3, pad=1, relu=True, out=slot and slot(1, 5, 5))
            with kernels.forced(["implicit-avx512"]):
                conv2d(wide, w3, relu=True, out=slot and slot(1, 1, 12))
        conv2d(x, np.ones((4, 3, 3, 1), np.float32), pad=1, groups=2)  # depthwise, multiplier 2
        conv2d(np.ones((1, 3, 3, 4), np.float32), np.ones((2, 1, 1, 2), np.float32), groups=2)
        conv2d(np.ones((1, 3, 3, 32), np.float32), np.ones((32, 1, 1, 2), np.float32), groups=16)
        for family, kgp in _grouped_kernel.TILES:  # each tile shape is a kernel of its own
            with kernels.forced([f"grouped-{family}"]):
                conv2d(np.ones((1, 1, 8, 32), np.float32), np.ones((16 * kgp, 1, 1, 2)), groups=16)
        local2d(x, np.ones((3, 3, 2, 3, 3, 2), np.float32))
        max_pool2d(x, 3, 2)
        avg_pool2d(x, 3, 2)
        relu(x)
        preprocess(np.zeros((1, 2, 2, 3), np.uint8), 1.0, 0.0, 1.0)
        from . import lean_ops  # the kernels that shrink a job's results (worker.contract.lean)

        lean_ops.warmup()
    if tune:
        from . import tuning

        tuning.ensure()


__all__ = [
    "ConvWeights",
    "avg_pool2d",
    "conv2d",
    "local2d",
    "max_pool2d",
    "relu",
    "set_threads",
    "get_threads",
    "conv_kernel",
    "warmup",
]
