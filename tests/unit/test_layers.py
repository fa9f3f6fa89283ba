"""Graph layers: the fast path against the plain-loop reference, PyTorch, and random sweeps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ops import assert_matches, rand

from engine import InputError, ShapeError, layers
from engine import layers_reference as ref

SWEEP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# (N, H, W, C): 1x1 images, one channel, odd sizes
SHAPES = [(1, 1, 1, 1), (2, 3, 5, 1), (1, 4, 4, 7), (3, 2, 3, 16)]


def bn_arrays(c: int, seed: int):
    rng = np.random.default_rng(seed)
    scale, shift, mean = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    return scale, shift, mean, rng.uniform(0.1, 3.0, c).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
def test_add(shape, relu):
    xs = [rand(*shape, seed=s) for s in range(3)]
    assert_matches(layers.add(xs, relu=relu), ref.add_reference(xs, relu=relu))
    assert_matches(layers.add(xs[:2]), ref.add_reference(xs[:2]))


@pytest.mark.parametrize("shape", SHAPES)
def test_concat(shape):
    xs = [rand(*shape[:3], c, seed=c) for c in (1, shape[3], 3)]
    got = layers.concat(xs)
    assert_matches(got, ref.concat_reference(xs))
    assert got.shape[3] == 4 + shape[3]


@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm(shape):
    x, arrays = rand(*shape, seed=1), bn_arrays(shape[3], 2)
    assert_matches(
        layers.batchnorm(x, *arrays, eps=1e-3), ref.batchnorm_reference(x, *arrays, 1e-3)
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 40])
def test_lrn(shape, size):
    x = rand(*shape, seed=3)
    got = layers.lrn(x, size, alpha=0.3, beta=0.75, bias=2.0)
    assert_matches(got, ref.lrn_reference(x, size, 0.3, 0.75, 2.0))


@pytest.mark.parametrize("shape", SHAPES)
def test_global_pools_softmax_and_elementwise(shape):
    x = rand(*shape, seed=4) * 4
    assert_matches(layers.global_avg_pool(x), ref.global_avg_pool_reference(x))
    assert_matches(layers.global_max_pool(x), ref.global_max_pool_reference(x))
    assert_matches(layers.softmax(x), ref.softmax_reference(x))
    assert_matches(layers.sigmoid(x), ref.sigmoid_reference(x))
    assert_matches(layers.tanh(x), ref.tanh_reference(x))
    for lo, hi in [(0.0, 6.0), (None, 0.5), (-1.0, None), (None, None)]:
        assert_matches(layers.clip(x, lo, hi), ref.clip_reference(x, lo, hi))


def test_softmax_and_sigmoid_stay_finite_at_extremes():
    x = np.array([1e30, -1e30, 0.0, 88.0, -104.0], np.float32).reshape(1, 1, 1, 5)
    assert np.isfinite(layers.softmax(x)).all()
    assert layers.softmax(x)[0, 0, 0, 0] == 1.0
    s = layers.sigmoid(x)
    assert np.isfinite(s).all() and s[0, 0, 0, 0] == 1.0 and s[0, 0, 0, 1] == 0.0
    assert_matches(s, ref.sigmoid_reference(x), atol=1e-7)


def test_bad_input_is_typed():
    x = rand(1, 2, 2, 3)
    with pytest.raises(ShapeError):
        layers.add([x, rand(1, 2, 2, 4)])
    with pytest.raises(ShapeError):
        layers.concat([x, rand(1, 3, 2, 4)])
    with pytest.raises(InputError):
        layers.add([x])
    with pytest.raises(ShapeError):
        layers.batchnorm(x, *bn_arrays(4, 0))
    with pytest.raises(ShapeError):
        layers.lrn(x, 0)
    with pytest.raises(InputError):
        layers.softmax(np.zeros((2, 3), np.float32))


@SWEEP
@given(
    n=st.integers(1, 2),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    c=st.integers(1, 9),
    size=st.integers(1, 7),
    alpha=st.floats(0, 2),
    beta=st.floats(0.1, 1.5),
    bias=st.floats(0.5, 3),
    seed=st.integers(0, 1000),
)
def test_lrn_and_batchnorm_sweep(n, h, w, c, size, alpha, beta, bias, seed):
    x = rand(n, h, w, c, seed=seed)
    assert_matches(
        layers.lrn(x, size, alpha, beta, bias), ref.lrn_reference(x, size, alpha, beta, bias)
    )
    arrays = bn_arrays(c, seed)
    assert_matches(layers.batchnorm(x, *arrays), ref.batchnorm_reference(x, *arrays))
    assert_matches(layers.softmax(x), ref.softmax_reference(x))


@SWEEP
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 4)),
    channels=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    relu=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_add_and_concat_sweep(shape, channels, relu, seed):
    xs = [rand(*shape, c, seed=seed + i) for i, c in enumerate(channels)]
    assert_matches(layers.concat(xs), ref.concat_reference(xs))
    same = [rand(*shape, channels[0], seed=seed + i) for i in range(len(channels))]
    assert_matches(layers.add(same, relu=relu), ref.add_reference(same, relu=relu))


def test_lrn_even_size_window_follows_onnx():
    # size 2: channel c sums channels c and c + 1 (ONNX), not c - 1 and c (PyTorch)
    x = np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 1, 1, 3)
    got = layers.lrn(x, 2, alpha=2.0, beta=1.0, bias=1.0)
    want = [1 / (1 + 1 * (1 + 4)), 2 / (1 + 1 * (4 + 9)), 3 / (1 + 1 * 9)]
    np.testing.assert_allclose(got.ravel(), want, rtol=1e-6)


def test_elementwise_layers_can_write_over_their_input():
    x = rand(2, 3, 3, 4, seed=12)
    y = rand(2, 3, 3, 4, seed=13)
    arrays = bn_arrays(4, 14)
    cases = [
        (lambda a: layers.add([a, y], relu=True, out=a), ref.add_reference([x, y], relu=True)),
        (lambda a: layers.batchnorm(a, *arrays, out=a), ref.batchnorm_reference(x, *arrays)),
        (lambda a: layers.sigmoid(a, out=a), ref.sigmoid_reference(x)),
        (lambda a: layers.tanh(a, out=a), ref.tanh_reference(x)),
        (lambda a: layers.clip(a, -0.5, 0.5, out=a), ref.clip_reference(x, -0.5, 0.5)),
    ]
    for run, want in cases:
        a = x.copy()
        got = run(a)
        assert got is a
        assert_matches(got, want)
    with pytest.raises(InputError, match="writeable C-contiguous float32"):
        layers.tanh(x, out=np.empty((2, 3, 3, 4), np.float64))
    with pytest.raises(InputError):
        layers.add([x, y], out=np.empty((2, 3, 3, 5), np.float32))
