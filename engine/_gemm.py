"""Register-blocked GEMM micro-kernels in Numba (AVX-512 and AVX2 shapes), conv epilogue fused.

Computes out[r, j] = sum_p a[r, p] * w[p, j] (+ bias[j], then ReLU) for one tile: a is (rows,
Kc) row-major (im2col rows, or NHWC pixels for 1x1); the weights w (Kc, K) are packed into
contiguous (Kc, NR) column blocks of one family (FAMILIES: NR 64, 48, 32; or 32, 16),
zero-padded past K. Each block of mr x NR outputs is held in registers (24 zmm, or 12 ymm: an
`alloca`d array that LLVM promotes once the loops over r and j are unrolled) while p runs over
Kc in chunks of KC, so a streams from L1 and the weight block from L2. Index arithmetic is
unsigned: NumPy-style negative-index wraparound would otherwise turn every weight load into a
gather. Measured on one Zen 5 core: 250 GFLOP/s for 6x64 and 8x48 blocks vs 115 for OpenBLAS's
Haswell kernels (the OPENBLAS_CORETYPE this environment sets); 12x32 blocks reach 145 at best,
but a 3x32 block written channel loop outermost (CHANNEL_OUTER) covers K = 32 with no padding:
32x3 K32 F5 at N=8 on one core of a loaded host, 85 GFLOP/s against 69 padded to 48.

Every element is one FMA chain over p in order, so a row's result does not depend on which tile
or block it lands in: results are bit-identical whatever the batch or thread count.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

# Block shapes, channels NR -> rows mr, by family. "avx512": 24 zmm accumulators (NR=32 blocks do
# not vectorise, 9 GFLOP/s, so K is covered by blocks of 64 and 48 channels, zero-padded).
# "avx2": 3x32 and 4x16 blocks, 12 and 8 ymm accumulators, written channel loop outermost
# (CHANNEL_OUTER): in the avx512 blocks' form LLVM leaves 16-, 24- and 32-wide blocks scalar
# (AVX2 build, one core: 6x16 3 GFLOP/s, 3x32 2; channel-outer 3x32 90-106, 4x16 103, 6x16 43,
# 4x24 46: the best two are kept). Every family compiles and runs correctly on any CPU (LLVM
# spills what does not fit); which one is fastest where is measured (engine.kernels).
FAMILIES = {"avx512": ((64, 6), (48, 8), (32, 3)), "avx2": ((32, 3), (16, 4))}
CHANNEL_OUTER = {32, 16}
SHAPES = {nr: mr for shapes in FAMILIES.values() for nr, mr in shapes}
MR = 24  # rows per tile step: a multiple of every block's row count
TALLEST = max(SHAPES.values())  # rows of the tallest block: row_gemm needs at least this many
KC = 1024  # depth of one pass over p: one (KC, NR) weight block (<= 256 KiB) stays in L2


@intrinsic
def _stack_block(typingctx, size):
    """Return a pointer to `size` float32 on the stack (literal size: LLVM can use registers)."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    count = size.literal_value

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float32), size=count)

    return types.CPointer(types.float32)(size), codegen


def plan_blocks(k: int, family: str = "avx512") -> list[int]:
    """Return block widths of family (widest first) covering k channels with the least zero
    padding, then the fewest blocks, then the fewest of the narrowest."""
    widths = [nr for nr, _ in FAMILIES[family]]
    best: tuple | None = None
    for counts in _counts(k, widths):
        pad = sum(n * nr for n, nr in zip(counts, widths, strict=True)) - k
        cand = (pad, sum(counts), counts[::-1])
        best = cand if best is None or cand < best else best
    assert best is not None
    return [nr for nr, n in zip(widths, best[2][::-1], strict=True) for _ in range(n)]


def _counts(k: int, widths: list[int]):
    """Yield counts of each width (the last the fewest that reach k) for every useful mix."""
    if len(widths) == 1:
        yield (max(0, -(-k // widths[0])),)
        return
    for n in range(max(0, -(-k // widths[0])) + 1):
        for rest in _counts(k - n * widths[0], widths[1:]):
            yield (n, *rest)


def pack_weights(wmat: np.ndarray, family: str = "avx512") -> tuple[np.ndarray, np.ndarray]:
    """Pack wmat (Kc, K) into flat blocks of family's widths; return (blocks, table).

    blocks holds each (Kc, NR) block contiguously, channels past K zero; table rows are
    (offset into blocks, NR, first channel j0).
    """
    kc, k = wmat.shape
    widths = plan_blocks(k, family)
    blocks = np.zeros(kc * sum(widths), np.float32)
    table = np.empty((len(widths), 3), np.int64)
    offset = j0 = 0
    for i, nr in enumerate(widths):
        part = wmat[:, j0 : j0 + nr]
        view = blocks[offset : offset + kc * nr].reshape(kc, nr)
        view[:, : part.shape[1]] = part
        table[i] = offset, nr, j0
        offset += kc * nr
        j0 += nr
    return blocks, table


@intrinsic
def _data(typingctx, arr):
    """Return arr's data pointer. Blocks take pointers, not arrays: each array argument of a
    call costs an atomic reference-count increment and decrement, ~900 cycles per block when
    both threads share the arrays (measured), as much as 75 steps of the block's loop."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        return context.make_array(signature.args[0])(context, builder, args[0]).data

    return types.CPointer(arr.dtype)(arr), codegen


@intrinsic
def claim(typingctx, counter):
    """Atomically add 1 to counter[0] (an int64 array) and return its old value.

    Kernels hand out tiles this way rather than t, t+T, ...: on a shared machine one thread is
    often descheduled, and the others then take its tiles instead of waiting for it.
    """
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", data, one, "monotonic")

    return types.int64(counter), codegen


def _make_block(mr: int, nr: int, implicit: bool):
    """Build the kernel for one mr x nr block (constants baked in so the loops fully unroll);
    nr in CHANNEL_OUTER loads the mr left values first, then runs the channel loop outermost.

    Row r of the block's left operand at depth p is a[a0 + r*rs + p], or with implicit=True
    a[a0 + r*rs + offs[p]]: an im2col row read straight from the NHWC input. The weight block
    is b[b0 + p*nr + j]; the output block is out[o0 + r*ldo + j], bias[j0 + j].
    """
    size = mr * nr
    channel_outer = nr in CHANNEL_OUTER

    def block(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu):
        """Accumulate over p0..p1; store rows < m, columns < k (on the last pass + bias, ReLU)."""
        acc = _stack_block(size)
        if first:
            for i in range(size):
                acc[i] = 0.0
        else:
            for r in range(mr):
                for j in range(nr):
                    ok = r < m and j < k
                    acc[r * nr + j] = out[o0 + r * ldo + j] if ok else np.float32(0.0)
        left = _stack_block(mr)
        for p in range(p0, p1):
            at = a0 + (offs[p] if implicit else p)
            row = b0 + p * nr
            if channel_outer:
                for r in range(mr):
                    left[r] = a[at + r * rs]
                for j in range(nr):
                    w = b[row + j]
                    for r in range(mr):
                        acc[r * nr + j] += left[r] * w
            else:
                for r in range(mr):
                    v = a[at + r * rs]
                    for j in range(nr):
                        acc[r * nr + j] += v * b[row + j]
        rows, cols = min(m, mr), min(k, nr)
        if rows == mr and cols == nr:
            rows, cols = mr, nr  # constant trip counts: the stores vectorise
        for r in range(rows):
            for j in range(cols):
                v = acc[r * nr + j]
                if last:
                    v += bias[j0 + j]
                    if relu and v < 0.0:
                        v = np.float32(0.0)
                out[o0 + r * ldo + j] = v

    name = f"block_{mr}x{nr}" + ("_implicit" if implicit else "")
    return njit(fastmath={"contract"}, cache=True)(own_name(block, name))


def own_name(fn, name: str):
    """Give fn, a kernel a factory builds, a name of its own before it is compiled.

    Numba names a compiled function's symbol after its qualified name, its argument types and
    a counter of the process that compiled it. The kernels one factory builds share the first
    two, so a kernel compiled now can get the very symbol another one has in code loaded from
    the cache (compiled by another process, whose counter ran differently): the linker then
    calls one for the other, and a conv read past its arrays (seen: a segfault in a test
    process that loaded the im2col kernel from the cache and compiled an implicit one).
    """
    fn.__name__ = fn.__qualname__ = name
    return fn


_block64 = _make_block(SHAPES[64], 64, False)
_block48 = _make_block(SHAPES[48], 48, False)
_block32 = _make_block(SHAPES[32], 32, False)
_block16 = _make_block(SHAPES[16], 16, False)
_implicit64 = _make_block(SHAPES[64], 64, True)
_implicit48 = _make_block(SHAPES[48], 48, True)
_implicit32 = _make_block(SHAPES[32], 32, True)
_implicit16 = _make_block(SHAPES[16], 16, True)


@njit(cache=True, inline="always")
def _rows(nr):
    """Return the row count mr of the block nr channels wide (SHAPES, as a branch)."""
    if nr == 64:
        return 6
    if nr == 48:
        return 8
    if nr == 32:
        return 3
    return 4


@njit(cache=True, inline="always")
def _block(nr, a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu):
    """Run the explicit block nr channels wide (one of SHAPES)."""
    if nr == 64:
        _block64(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu)
    elif nr == 48:
        _block48(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu)
    elif nr == 32:
        _block32(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu)
    else:
        _block16(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu)


@njit(cache=True, inline="always")
def _implicit(nr, a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu):
    """Run the implicit block nr channels wide (one of SHAPES)."""
    if nr == 64:
        _implicit64(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu)
    elif nr == 48:
        _implicit48(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu)
    elif nr == 32:
        _implicit32(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu)
    else:
        _implicit16(a, a0, rs, offs, b, b0, p0, p1, out, o0, ldo, m, k, bias, j0, first, last, relu)


@njit(cache=True)
def tile_gemm(a, ar0, m, blocks, table, bias, out, or0, relu, acc, b0, b1):
    """out[or0:or0+m] (m, K) = a[ar0:ar0+m] @ weights + bias; a needs ceil(m/MR)*MR rows there.

    The weights are packed by pack_weights in any family: each block's width picks its kernel.
    Only the columns of blocks b0 <= b < b1 (rows of table) are computed; each column's result
    is the same whichever blocks are computed with it.
    out's rows may be further apart than K (a channel slice of a wider NHWC buffer, such as a
    concat's output); with acc the products are added to what out holds (a residual) first.
    """
    kc = a.shape[1]
    k = out.shape[1]
    ldo = out.strides[0] // 4
    ap, bp, op, biasp, none = _data(a), _data(blocks), _data(out), _data(bias), _data(table)
    for b in range(b0, b1):
        offset, nr, j0 = table[b, 0], table[b, 1], table[b, 2]
        mr = _rows(nr)
        for p0 in range(0, kc, KC):
            p1 = min(kc, p0 + KC)
            first, last = p0 == 0 and not acc, p1 == kc
            for r in range(0, m, mr):
                a0, o0 = (ar0 + r) * kc, (or0 + r) * ldo + j0
                _block(
                    nr, ap, a0, kc, none, bp, offset, p0, p1, op, o0, ldo, m - r, k - j0,
                    biasp, j0, first, last, relu,
                )  # fmt: skip


@njit(cache=True)
def row_gemm(xf, base, rs, offs, count, blocks, table, bias, out, or0, relu):
    """out[or0:or0+count] (count, K) = the implicit rows base, base+rs, ... @ weights + bias.

    count >= TALLEST: a last partial block is moved back to end at row count, recomputing a few
    rows (bit-identically, each block finishing all of p before the next) instead of reading
    past the input.
    """
    kc = offs.shape[0]
    k = out.shape[1]
    ldo = out.strides[0] // 4  # rows further apart than K: a channel slice (see tile_gemm)
    xp, offp, bp, op, biasp = _data(xf), _data(offs), _data(blocks), _data(out), _data(bias)
    for b in range(table.shape[0]):
        offset, nr, j0 = table[b, 0], table[b, 1], table[b, 2]
        mr = _rows(nr)
        for r in range(0, count, mr):
            r = min(r, count - mr)
            for p0 in range(0, kc, KC):
                p1 = min(kc, p0 + KC)
                first, last = p0 == 0, p1 == kc
                a0, o0 = base + r * rs, (or0 + r) * ldo + j0
                _implicit(
                    nr, xp, a0, rs, offp, bp, offset, p0, p1, op, o0, ldo, mr, k - j0,
                    biasp, j0, first, last, relu,
                )  # fmt: skip
