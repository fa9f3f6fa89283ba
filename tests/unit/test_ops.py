"""The fast path against the plain-loop reference: awkward shapes, tiling, threads, bad input."""

from __future__ import annotations

import os

import numba
import numpy as np
import pytest

from engine import (
    InputError,
    ModelError,
    ShapeError,
    _conv,
    _gemm,
    _grouped_kernel,
    _pool,
    _winograd,
    kernels,
    ops,
)
from engine import reference as ref

RTOL, ATOL = 1e-4, 1e-5


def assert_matches(fast, reference, rtol=RTOL, atol=ATOL):
    """Check shape and dtype first, then values, so a wrong geometry is reported as such."""
    assert fast.shape == reference.shape, f"shape {fast.shape} != reference {reference.shape}"
    assert fast.dtype == np.float32
    np.testing.assert_allclose(fast, reference, rtol=rtol, atol=atol)


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, monkeypatch):
    """Run on 1 or 2 threads, even the tiny test layers (normally below the small-work bar)."""
    monkeypatch.setattr(ops._threads, "_small_work", lambda: 0)
    before = ops.get_threads()
    ops.set_threads(request.param)
    yield request.param
    ops.set_threads(before)


NEVER = 10**9
CONV_PATHS = {  # name: the kernels forced, first that applies (engine.kernels)
    "im2col": ["pointwise-avx512", "im2col-avx512"],
    "implicit": ["pointwise-avx512", "implicit-avx512", "im2col-avx512"],  # 8+ outputs wide
    "winograd": ["winograd-avx512", "pointwise-avx512", "im2col-avx512"],  # any 3x3 stride 1
    "blas": ["pointwise-blas", "im2col-blas"],
    "im2col-avx2": ["pointwise-avx2", "im2col-avx2"],
    "implicit-avx2": ["implicit-avx2", "im2col-avx2"],
    "winograd-avx2": ["winograd-avx2", "im2col-avx2"],
}


def force_path(name: str) -> kernels.forced:
    """Force the kernels of CONV_PATHS[name] on this thread; return what restore_path undoes."""
    forcing = kernels.forced(CONV_PATHS[name])
    forcing.__enter__()
    return forcing


def restore_path(before: kernels.forced) -> None:
    before.__exit__(None, None, None)


@pytest.fixture(params=list(CONV_PATHS))
def gemm_path(request):
    """Run a conv test through every kernel: im2col and implicit GEMM on each micro-kernel
    family, Winograd, and im2col + BLAS sgemm, each forced regardless of the CPU (a family is
    only slow, not wrong, on a CPU without its ISA)."""
    with kernels.forced(CONV_PATHS[request.param]):
        yield request.param


# (N, H, W, C, K, (FH, FW), stride, pad, dilation)
CONV_CASES = {
    "1x1": (2, 5, 4, 3, 4, (1, 1), 1, 0, 1),
    "1x1-stride2": (1, 5, 5, 3, 2, (1, 1), 2, 0, 1),
    "1x1-padded": (1, 3, 4, 2, 3, (1, 1), 1, 1, 1),
    "3x3-same": (2, 6, 6, 3, 4, (3, 3), 1, 1, 1),
    "stride2-odd": (1, 9, 7, 2, 3, (3, 3), 2, 0, 1),
    "C1": (3, 6, 5, 1, 2, (2, 2), 1, 0, 1),
    "K1": (2, 5, 5, 3, 1, (3, 3), 1, 1, 1),
    "dilation2": (1, 9, 9, 2, 3, (3, 3), 1, 2, 2),
    "dilation-nonsquare": (1, 8, 10, 2, 2, (2, 3), 1, 0, (2, 3)),
    "asymmetric-pads": (2, 5, 6, 2, 3, (3, 2), 1, (0, 2, 1, 0), 1),
    "nonsquare-stride": (1, 9, 8, 2, 3, (3, 3), (2, 3), 1, 1),
    "nonsquare-size": (1, 7, 6, 3, 2, (5, 2), 1, (2, 0), 1),
    "window-equals-input": (2, 4, 5, 3, 6, (4, 5), 1, 0, 1),
    "stride-beyond-window": (1, 11, 11, 2, 2, (2, 2), 4, 0, 1),
    "alexnet-like": (1, 19, 19, 3, 4, (11, 11), 4, 0, 1),
    "K130-column-blocks": (1, 4, 5, 3, 130, (1, 1), 1, 0, 1),
    "K70-3x3": (2, 4, 4, 2, 70, (3, 3), 1, 1, 1),
    "Kc1080-depth-chunks": (1, 4, 4, 120, 3, (3, 3), 1, 1, 1),
    "wide-strided": (2, 7, 26, 3, 5, (3, 3), (1, 2), 1, 1),
    "wide-dilated-K50": (1, 6, 19, 2, 50, (2, 3), 1, (0, 1, 1, 2), (1, 2)),
    "wide-9-Kc1080": (1, 3, 9, 120, 70, (3, 3), 1, 1, 1),
}


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv2d_matches_reference(case, relu, threads, gemm_path):
    n, h, w, c, k, (fh, fw), stride, pad, dilation = case
    x, wt, b = rand(n, h, w, c, seed=1), rand(k, fh, fw, c, seed=2), rand(k, seed=3)
    got = ops.conv2d(x, wt, b, stride=stride, pad=pad, dilation=dilation, relu=relu)
    want = ref.conv2d_reference(x, wt, b, stride=stride, pad=pad, dilation=dilation, relu=relu)
    # float32 sums of FH*FW*C products drift like sqrt(terms); an indexing bug is off by O(1)
    assert_matches(got, want, atol=ATOL * max(1.0, np.sqrt(fh * fw * c / 16)))
    if relu:
        assert (got >= 0).all() and (got == 0).any()


@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv2d_into_a_channel_slice_and_onto_a_residual(case, threads, gemm_path):
    # out= a slice of a wider NHWC buffer (a concat's output): only that slice is written;
    # accumulate=True adds the conv to what out holds before the ReLU (a fused residual add)
    n, h, w, c, k, (fh, fw), stride, pad, dilation = case
    x, wt, b = rand(n, h, w, c, seed=11), rand(k, fh, fw, c, seed=12), rand(k, seed=13)
    geo = {"stride": stride, "pad": pad, "dilation": dilation}
    want = ref.conv2d_reference(x, wt, b, **geo)
    atol = ATOL * max(1.0, np.sqrt(fh * fw * c / 16))
    wider = np.full((*want.shape[:3], k + 5), 7.0, np.float32)
    got = ops.conv2d(x, wt, b, relu=True, out=wider[..., 2 : 2 + k], **geo)
    assert np.shares_memory(got, wider) and (wider[..., :2] == 7).all()
    assert (wider[..., 2 + k :] == 7).all()
    assert_matches(wider[..., 2 : 2 + k], np.maximum(want, 0), atol=atol)
    residual = rand(*want.shape, seed=14)
    for target in (residual.copy(), wider[..., 2 : 2 + k]):
        target[...] = residual
        ops.conv2d(x, wt, b, relu=True, out=target, accumulate=True, **geo)
        assert_matches(target, np.maximum(want + residual, 0), atol=atol)


def test_conv2d_out_is_checked():
    x, wt = rand(1, 5, 5, 2), rand(3, 3, 3, 2)
    with pytest.raises(InputError, match="accumulate=True needs out"):
        ops.conv2d(x, wt, accumulate=True)
    for bad in (
        np.empty((1, 3, 3, 4), np.float32),  # wrong shape
        np.empty((1, 3, 3, 3), np.float64),  # wrong dtype
        np.empty((1, 3, 3, 6), np.float32)[..., ::2],  # channels not contiguous
        np.empty((1, 6, 3, 3), np.float32)[:, ::2],  # rows not evenly spaced with pixels
    ):
        with pytest.raises(InputError, match="out must be") as err:
            ops.conv2d(x, wt, out=bad)
        assert err.value.field == "out"


def test_conv2d_without_bias_matches_reference(gemm_path):
    x, wt = rand(2, 6, 5, 3, seed=4), rand(4, 3, 3, 3, seed=5)
    assert_matches(ops.conv2d(x, wt, pad=1), ref.conv2d_reference(x, wt, pad=1))


@pytest.mark.parametrize("pointwise", [True, False], ids=["1x1", "3x3"])
def test_conv2d_many_small_tiles(monkeypatch, pointwise, threads, gemm_path):
    # 1-byte tiles force MIN_TILE_ROWS (16) rows per tile: each 5x5 image is 2 tiles of 13 + 12
    # rows, 14 tiles over the batch, more than the threads, each thread reusing its slot.
    monkeypatch.setattr(ops, "TILE_BYTES", 1)
    f = 1 if pointwise else 3
    x, wt, b = rand(7, 5, 5, 3, seed=6), rand(4, f, f, 3, seed=7), rand(4, seed=8)
    pad = 0 if pointwise else 1
    assert_matches(
        ops.conv2d(x, wt, b, pad=pad, relu=True), ref.conv2d_reference(x, wt, b, pad=pad, relu=True)
    )


@pytest.mark.parametrize("f,pad", [(1, 0), (3, 1), (5, 2)])
def test_conv2d_one_image_equals_same_image_in_a_batch(monkeypatch, f, pad, gemm_path):
    monkeypatch.setattr(ops, "TILE_BYTES", 4096)
    x, wt, b = rand(9, 12, 12, 8, seed=9), rand(16, f, f, 8, seed=10), rand(16, seed=11)
    batch = ops.conv2d(x, wt, b, pad=pad)
    for i in (0, 4, 8):
        np.testing.assert_array_equal(ops.conv2d(x[i : i + 1], wt, b, pad=pad)[0], batch[i])


@pytest.mark.parametrize("kernel", ["im2col-avx512", "im2col-avx2", "pointwise-avx512"])
@pytest.mark.parametrize("k", [96, 130])  # 3 blocks of 32 (parts of 2 and 1), a narrow last one
def test_threads_sharing_one_images_columns_give_the_rows_only_result(monkeypatch, kernel, k):
    # 7x7 outputs are row tiles of 48 rows and 1: the two threads split the filters instead
    monkeypatch.setattr(ops._threads, "_small_work", lambda: 0)
    before = ops.get_threads()
    f = 1 if kernel.startswith("pointwise") else 3
    x, wt, b = rand(1, 7, 7, 64, seed=40), rand(k, f, f, 64, seed=41), rand(k, seed=42)
    pad = f // 2
    cw = ops.ConvWeights(wt, b)
    try:
        ops.set_threads(2)
        with kernels.forced([kernel]):
            _, table = cw.gemm_blocks(kernel.split("-")[1])
            tile = ops._tile_rows(49, f * f * 64)
            splits = ops._column_splits(table, 1, 49, tile, 2)
            assert len(splits) == 3 and splits[0] == 0 and splits[-1] == len(table)
            shared = ops.conv2d(x, cw, pad=pad, relu=True)
            monkeypatch.setattr(ops, "COLUMN_SPLIT_TILES", 0)  # rows only
            assert len(ops._column_splits(table, 1, 49, tile, 2)) == 2
            rows_only = ops.conv2d(x, cw, pad=pad, relu=True)
    finally:
        ops.set_threads(before)
    np.testing.assert_array_equal(shared, rows_only)
    want = ref.conv2d_reference(x, wt, b, pad=pad, relu=True)  # sums of up to 576 products
    np.testing.assert_allclose(shared, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("kernel", ["winograd-avx512", "winograd-avx2"])
def test_winograd_threads_sharing_a_small_images_columns_match_one_thread(monkeypatch, kernel):
    # one 7x7 image is 16 tiles, fewer than a group per thread: both threads take the one group,
    # each its part of the filters, writing into a channel slice and adding to it (a residual)
    monkeypatch.setattr(ops._threads, "_small_work", lambda: 0)
    x, wt, b = rand(1, 7, 7, 32, seed=43), rand(96, 3, 3, 32, seed=44), rand(96, seed=45)
    residual = rand(1, 7, 7, 96, seed=46)
    parts = []
    even_parts = ops._even_parts
    monkeypatch.setattr(ops, "_even_parts", lambda *a: parts.append(even_parts(*a)) or parts[-1])
    before = ops.get_threads()
    results = []
    try:
        with kernels.forced([kernel]):
            for threads in (1, 2):
                ops.set_threads(threads)
                wide = np.zeros((1, 7, 7, 100), np.float32)
                wide[..., 2:98] = residual
                ops.conv2d(x, wt, b, pad=1, relu=True, out=wide[..., 2:98], accumulate=True)
                results.append(wide)
    finally:
        ops.set_threads(before)
    assert len(parts) == 1 and len(parts[0]) == 3  # only on 2 threads: two parts of the blocks
    np.testing.assert_array_equal(results[0], results[1])
    assert not results[1][..., :2].any() and not results[1][..., 98:].any()
    want = np.maximum(ref.conv2d_reference(x, wt, b, pad=1) + residual, 0)
    np.testing.assert_allclose(results[1][..., 2:98], want, rtol=1e-4, atol=1e-4)


def test_even_row_tiles_keep_whole_columns():
    _, table = ops.ConvWeights(rand(128, 3, 3, 64)).gemm_blocks("avx2")
    assert list(ops._column_splits(table, 1, 196, 72, 2)) == [0, 2, 4]  # 72 + 52 rows vs 72
    assert list(ops._column_splits(table, 1, 784, 120, 2)) == [0, len(table)]  # 4 vs 3 tiles: 1.09
    assert list(ops._column_splits(table, 4, 784, 120, 2)) == [0, len(table)]  # 28 tiles
    assert list(ops._column_splits(table, 1, 96, 48, 2)) == [0, len(table)]  # 48 + 48 rows
    assert list(ops._column_splits(table, 1, 49, 48, 1)) == [0, len(table)]  # one thread


def test_conv2d_column_workspace_does_not_grow_with_batch(monkeypatch):
    monkeypatch.setattr(ops._workspace, "buf", None, raising=False)
    wt = rand(8, 5, 5, 4, seed=12)
    monkeypatch.setattr(ops._threads, "_small_work", lambda: 0)  # so both calls use every thread
    with kernels.forced(["im2col-avx512"]):  # the im2col path, which has columns
        ops.conv2d(rand(2, 40, 40, 4), wt, pad=2)
        small = ops._workspace.buf.size
        ops.conv2d(rand(64, 40, 40, 4), wt, pad=2)
    assert ops._workspace.buf.size == small
    assert small * 4 <= ops.get_threads() * ops.TILE_BYTES + 4 * 5 * 5 * 4


def test_conv2d_one_thread_and_two_threads_agree(gemm_path, monkeypatch):
    monkeypatch.setattr(ops._threads, "_small_work", lambda: 0)
    x, wt, b = rand(3, 14, 13, 5, seed=13), rand(7, 3, 3, 5, seed=14), rand(7, seed=15)
    before = ops.get_threads()
    try:
        ops.set_threads(1)
        one = ops.conv2d(x, wt, b, stride=2, pad=1)
        ops.set_threads(2)
        two = ops.conv2d(x, wt, b, stride=2, pad=1)
    finally:
        ops.set_threads(before)
    np.testing.assert_array_equal(one, two)


# (N, H, W, C, K, (FH, FW), stride, pad, dilation): the weights fix Hout, Wout
LOCAL_CASES = {
    "3x3": (2, 6, 6, 3, 4, (3, 3), 1, 0, 1),
    "stride2-pad": (1, 7, 6, 2, 3, (3, 2), 2, (1, 0), 1),
    "1x1-C1": (3, 4, 5, 1, 2, (1, 1), 1, 0, 1),
    "dilated": (1, 8, 8, 2, 1, (2, 2), 1, 1, 2),
}


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("case", LOCAL_CASES.values(), ids=LOCAL_CASES.keys())
def test_local2d_matches_reference(case, relu, threads):
    n, h, w, c, k, (fh, fw), stride, pad, dilation = case
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    hout = (h + 2 * ph - dilation * (fh - 1) - 1) // stride + 1
    wout = (w + 2 * pw - dilation * (fw - 1) - 1) // stride + 1
    x = rand(n, h, w, c, seed=16)
    wt, b = rand(hout, wout, k, fh, fw, c, seed=17), rand(hout, wout, k, seed=18)
    got = ops.local2d(x, wt, b, stride=stride, pad=pad, dilation=dilation, relu=relu)
    want = ref.local2d_reference(x, wt, b, stride=stride, pad=pad, dilation=dilation, relu=relu)
    assert_matches(got, want)


@pytest.mark.parametrize("c,k", [(2, 3), (37, 19), (64, 64)])
def test_local2d_gives_an_image_the_same_floats_in_any_batch(c, k):
    # Batched jobs share engine runs: an image's result must not depend on its companions
    # (one GEMM over a block of images summed rows in an order that depended on the block).
    x, wt = rand(9, 5, 5, c, seed=19), rand(3, 3, k, 3, 3, c, seed=20)
    whole = ops.local2d(x, wt, stride=1)
    assert_matches(whole, ref.local2d_reference(x, wt, stride=1))
    for a, b in ((0, 1), (3, 5), (4, 9)):
        assert np.array_equal(ops.local2d(x[a:b], wt, stride=1), whole[a:b])


# (N, H, W, C, size, stride, pad, dilation)
POOL_CASES = {
    "3/2": (2, 7, 7, 3, 3, 2, 0, 1),
    "2/2-odd": (1, 5, 7, 2, 2, 2, 0, 1),
    "3/1-pad1": (2, 5, 5, 1, 3, 1, 1, 1),
    "nonsquare": (1, 8, 9, 2, (2, 3), (1, 2), (1, 0, 0, 1), 1),
    "dilated": (1, 9, 9, 2, 3, 1, 2, (2, 1)),
    "default-stride": (3, 6, 6, 4, 3, None, 0, 1),
    "global": (2, 4, 5, 3, (4, 5), 1, 0, 1),
}


@pytest.mark.parametrize("case", POOL_CASES.values(), ids=POOL_CASES.keys())
def test_max_pool2d_matches_reference(case, threads):
    n, h, w, c, size, stride, pad, dilation = case
    x = rand(n, h, w, c, seed=21) - 3.0  # mostly negative: a pad read as 0 would win
    assert_matches(
        ops.max_pool2d(x, size, stride, pad, dilation),
        ref.max_pool2d_reference(x, size, stride, pad, dilation),
    )


# avg_pool2d takes no dilation, like PyTorch's AvgPool2d
AVG_CASES = {name: case for name, case in POOL_CASES.items() if case[-1] == 1}


@pytest.mark.parametrize("count_pad", [False, True], ids=["exclude-pad", "count-pad"])
@pytest.mark.parametrize("case", AVG_CASES.values(), ids=AVG_CASES.keys())
def test_avg_pool2d_matches_reference(case, count_pad, threads):
    n, h, w, c, size, stride, pad, _ = case
    x = rand(n, h, w, c, seed=22) + 2.0
    assert_matches(
        ops.avg_pool2d(x, size, stride, pad, count_pad),
        ref.avg_pool2d_reference(x, size, stride, pad, count_pad),
    )


def test_max_pool2d_keeps_nan_like_the_reference():
    x = rand(1, 4, 4, 2, seed=23)
    x[0, 1, 1, 0] = np.nan
    got = ops.max_pool2d(x, 2, 2)
    assert np.isnan(got[0, 0, 0, 0]) and not np.isnan(got[0, 0, 0, 1])
    assert_matches(got, ref.max_pool2d_reference(x, 2, 2))


@pytest.mark.parametrize("shape", [(2, 5, 5, 3), (7,), (3, 1000)])
def test_relu_matches_reference(shape):
    x = rand(*shape, seed=24)
    got = ops.relu(x)
    assert_matches(got, ref.relu_reference(x), rtol=0, atol=0)
    assert (x < 0).any(), "input must have negatives to test anything"


def test_relu_does_not_modify_its_input():
    x = rand(2, 3, 3, 2, seed=25)
    before = x.copy()
    ops.relu(x)
    np.testing.assert_array_equal(x, before)


def test_integer_and_float64_inputs_are_cast():
    x = np.arange(2 * 5 * 5 * 2).reshape(2, 5, 5, 2) % 7
    wt = rand(3, 3, 3, 2, seed=26)
    want = ref.conv2d_reference(x.astype(np.float32), wt)
    assert_matches(ops.conv2d(x, wt.astype(np.float64)), want)


def test_non_contiguous_input_matches_reference():
    x = rand(2, 8, 8, 6, seed=27)[:, ::2, 1:, ::2]
    wt = rand(2, 2, 2, 3, seed=28)
    assert_matches(ops.conv2d(x, wt), ref.conv2d_reference(np.ascontiguousarray(x), wt))


def test_empty_batch_gives_empty_output():
    assert ops.conv2d(np.zeros((0, 5, 5, 2), np.float32), rand(3, 3, 3, 2)).shape == (0, 3, 3, 3)
    assert ops.max_pool2d(np.zeros((0, 5, 5, 2), np.float32), 2).shape == (0, 2, 2, 2)


F32 = np.float32
BAD_CALLS = {
    "x-3d": (lambda: ops.conv2d(rand(5, 5, 3), rand(2, 3, 3, 3)), InputError, "x"),
    "x-strings": (
        lambda: ops.conv2d(np.full((1, 3, 3, 1), "a"), rand(1, 1, 1, 1)),
        InputError,
        "x",
    ),
    "x-complex": (lambda: ops.max_pool2d(np.ones((1, 3, 3, 1), complex), 2), InputError, "x"),
    "x-no-channels": (lambda: ops.max_pool2d(np.ones((1, 2, 2, 0), F32), 1), InputError, "x"),
    "w-3d": (lambda: ops.conv2d(rand(1, 5, 5, 3), rand(3, 3, 3)), ShapeError, "w"),
    "channel-mismatch": (lambda: ops.conv2d(rand(1, 5, 5, 3), rand(2, 3, 3, 4)), ShapeError, "w"),
    "bias-shape": (
        lambda: ops.conv2d(rand(1, 5, 5, 3), rand(2, 3, 3, 3), rand(3)),
        ShapeError,
        "b",
    ),
    "window-too-big": (lambda: ops.conv2d(rand(1, 4, 4, 1), rand(1, 5, 5, 1)), ShapeError, "size"),
    "dilated-too-big": (
        lambda: ops.conv2d(rand(1, 6, 6, 1), rand(1, 3, 3, 1), dilation=3),
        ShapeError,
        "size",
    ),
    "pool-too-big": (lambda: ops.max_pool2d(rand(1, 2, 2, 1), 3), ShapeError, "size"),
    "stride-0": (
        lambda: ops.conv2d(rand(1, 5, 5, 1), rand(1, 3, 3, 1), stride=0),
        ModelError,
        "stride",
    ),
    "negative-pad": (lambda: ops.avg_pool2d(rand(1, 5, 5, 1), 2, pad=-1), ModelError, "pad"),
    "pad-3-values": (lambda: ops.max_pool2d(rand(1, 5, 5, 1), 2, pad=[1, 1, 1]), ModelError, "pad"),
    "local-wrong-output": (
        lambda: ops.local2d(rand(1, 6, 6, 2), rand(3, 3, 1, 3, 3, 2)),
        ShapeError,
        "w",
    ),
    "local-bias-shape": (
        lambda: ops.local2d(rand(1, 5, 5, 2), rand(3, 3, 1, 3, 3, 2), rand(1)),
        ShapeError,
        "b",
    ),
}


@pytest.mark.parametrize("call,error,field", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_input_raises_a_typed_error_naming_the_field(call, error, field):
    with pytest.raises(error) as info:
        call()
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_small_work_runs_on_one_thread():
    assert ops._threads.enter(1000) == 1
    assert ops._threads.enter(1e9) == ops.get_threads()


def test_the_small_work_bar_is_lower_where_workers_spin(monkeypatch):
    import numba

    mid = 4e6  # above the OpenMP bar, below the one for layers whose workers sleep at once
    assert ops._threads.SMALL_WORK_OMP < mid < ops._threads.SMALL_WORK
    monkeypatch.setattr(numba, "threading_layer", lambda: "omp")
    assert ops._threads.enter(mid) == ops.get_threads()
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "workqueue")
    assert ops._threads.enter(mid) == 1
    assert os.environ["GOMP_SPINCOUNT"]  # set before OpenMP starts, unless the user set it


def test_set_threads_clamps_and_rejects_non_ints():
    before = ops.get_threads()
    try:
        assert ops.set_threads(10_000) == ops._threads.max_threads()
        assert ops.set_threads(0) == 1 and ops.get_threads() == 1
        with pytest.raises(TypeError):
            ops.set_threads(1.5)
    finally:
        ops.set_threads(before)


def read_only(arr):
    arr = arr.copy()
    arr.flags.writeable = False
    return arr


def test_read_only_and_writeable_inputs_share_one_compiled_kernel():
    x, wt, b = rand(2, 6, 6, 3, seed=37), rand(4, 3, 3, 3, seed=38), rand(4, seed=39)
    ops.warmup(tune=False)
    want = ops.conv2d(x, wt, b, pad=1)
    got = ops.conv2d(read_only(x), read_only(wt), read_only(b), pad=1)
    np.testing.assert_array_equal(got, want)
    ops.max_pool2d(read_only(x), 2)
    ops.relu(read_only(x))
    ops.local2d(read_only(x), read_only(rand(4, 4, 2, 3, 3, 3)))
    wider = np.zeros((2, 6, 6, 7), np.float32)
    ops.conv2d(x, wt, b, pad=1, out=wider[..., 2:6])  # a concat's slice
    np.testing.assert_array_equal(wider[..., 2:6], want)
    ops.conv2d(x, wt, b, pad=1, out=wider[..., 2:6], accumulate=True)  # a residual
    np.testing.assert_allclose(wider[..., 2:6], 2 * want, rtol=1e-5, atol=1e-5)
    test_warmup_compiles_every_kernel()


def test_warmup_compiles_every_kernel():
    ops.warmup(tune=False)
    # the micro-kernel paths twice: a new output array, and a channel slice of a wider one (a
    # concat's); BLAS's once (a slice goes through a temporary array)
    sliced = [
        _conv.conv_im2col_mk,
        _conv.conv_pointwise_mk,
        _conv.conv_implicit_mk,
        _winograd.conv3x3,
    ]
    assert all(len(k.signatures) == 2 for k in sliced), [k.signatures for k in sliced]
    compiled = [
        _grouped_kernel.grouped_direct,
        _conv.conv_im2col,
        _conv.conv_pointwise,
        _conv.conv_depthwise,
        _conv.local_gemm,
        _pool.max_pool,
        _pool.avg_pool,
        _pool.relu_flat,
    ]
    assert all(len(k.signatures) == 1 for k in compiled), [k.signatures for k in compiled]


@pytest.mark.parametrize(
    "k,widths",
    [
        (1, [32]),
        (32, [32]),
        (70, [48, 32]),
        (64, [64]),
        (96, [48, 48]),
        (112, [64, 48]),
        (128, [64, 64]),
        (200, [64, 48, 48, 48]),
    ],
)
def test_weight_blocks_cover_k_with_least_padding(k, widths):
    assert _gemm.plan_blocks(k) == widths


@pytest.mark.parametrize(
    "k,widths",
    [(1, [16]), (16, [16]), (24, [32]), (32, [32]), (40, [32, 16]), (70, [32, 32, 16])],
)
def test_avx2_weight_blocks_cover_k_with_least_padding(k, widths):
    assert _gemm.plan_blocks(k, "avx2") == widths


def test_packed_weight_blocks_hold_every_weight_once():
    wmat = rand(7, 112, seed=29)
    blocks, table = _gemm.pack_weights(wmat)
    rebuilt = np.concatenate(
        [blocks[off : off + 7 * nr].reshape(7, nr) for off, nr, _ in table], axis=1
    )
    np.testing.assert_array_equal(rebuilt[:, :112], wmat)
    assert not rebuilt[:, 112:].any() and list(table[:, 2]) == [0, 64]


def test_kernel_cache_directory_follows_every_kernel_module(tmp_path, monkeypatch):
    from engine import _cache

    for name in _cache.KERNEL_MODULES:
        (tmp_path / name).write_text(f"# {name}\n")
    monkeypatch.setattr(_cache, "HERE", str(tmp_path))
    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    first = _cache.cache_dir()
    assert first.startswith(str(tmp_path / "__pycache__" / _cache.PREFIX))
    (tmp_path / "_gemm.py").write_text("# the micro-kernel changed\n")
    _cache._hash.cache_clear()  # a process reads its sources once; a new version is a new process
    second = _cache.cache_dir()
    assert second != first  # kernels in _conv.py that call _gemm.py get a fresh cache
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert _cache.cache_dir().startswith(str(tmp_path / "elsewhere" / _cache.PREFIX))


def test_old_kernel_cache_directories_are_pruned(tmp_path, monkeypatch):
    from engine import _cache

    keep, old, recent = (tmp_path / (_cache.PREFIX + name) for name in ("keep", "old", "recent"))
    for path in (keep, old, recent):
        path.mkdir()
    os.utime(old, (0, 0))
    assert _cache.prune(str(keep)) == [str(old)]
    assert keep.exists() and recent.exists() and not old.exists()


def test_kernels_cache_in_their_version_directory():
    from engine import _cache

    assert _conv.conv_im2col_mk._cache._cache_path.startswith(_cache.cache_dir())
    assert numba.config.CACHE_DIR != _cache.cache_dir()  # only the engine's kernels moved


@pytest.mark.parametrize("k,f,width", [(24, 5, 32), (24, 5, 20), (16, 7, 30), (24, 5, 33)])
def test_two_pixels_per_row_is_bit_identical_to_one(monkeypatch, k, f, width):
    # Thin inputs with 24 or 16 filters of 5x5 and up run two output pixels per GEMM row; each
    # output is the same FMA chain plus exact zeros, so the maps are bit-identical.
    rng = np.random.default_rng(k + f + width)
    x = rng.standard_normal((3, 12, width, 3)).astype(np.float32)
    w = rng.standard_normal((k, f, f, 3)).astype(np.float32)
    b = rng.standard_normal(k).astype(np.float32)
    cw = ops.ConvWeights(w)
    assert cw.pixels_per_row(f) == 2
    with kernels.forced(["implicit-avx512"]):
        wide = ops.conv2d(x, cw, b, 1, f // 2)
    assert bool(cw._wide) == (width % 2 == 0)  # an odd width keeps one pixel per row
    monkeypatch.setattr(ops, "WIDE_MAX_C", 0)
    with kernels.forced(["implicit-avx512"]):
        np.testing.assert_array_equal(wide, ops.conv2d(x, w, b, 1, f // 2))
    assert_matches(wide, ref.conv2d_reference(x, w, b, 1, f // 2))


def test_non_finite_inputs_keep_one_pixel_per_row(monkeypatch):
    # A two-pixel row multiplies a neighbour's column by zero: 0 * inf would turn a finite
    # output into NaN, so an input with inf runs the plain path and matches the reference.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 16, 3)).astype(np.float32)
    x[0, 4, 9, 1] = np.inf
    w = np.abs(rng.standard_normal((24, 5, 5, 3))).astype(np.float32)
    cw = ops.ConvWeights(w)
    with kernels.forced(["implicit-avx512"]):
        got = ops.conv2d(x, cw, None, 1, 2)
    assert not cw._wide
    expect = ref.conv2d_reference(x, w, None, 1, 2)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expect))
    assert not np.isnan(got).any()
    assert_matches(got[np.isfinite(expect)], expect[np.isfinite(expect)])
