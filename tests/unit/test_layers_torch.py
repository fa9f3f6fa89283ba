"""Cross-check the graph layers against PyTorch (test-only; NHWC <-> NCHW by permutes)."""

from __future__ import annotations

import numpy as np
import pytest
from test_ops import assert_matches, rand
from test_ops_torch import to_nchw, to_nhwc

from engine import layers

torch = pytest.importorskip("torch")
F = torch.nn.functional


# Odd sizes only: for even ones PyTorch centres its window one channel lower than ONNX
# ([c - size/2, c + size/2 - 1]); convq follows ONNX (tests/unit/test_layers.py, reference).
@pytest.mark.parametrize("size", [1, 3, 5, 7])
@pytest.mark.parametrize("c", [1, 3, 16])
def test_lrn_matches_torch(size, c):
    x = rand(2, 5, 4, c, seed=7) * 3
    want = F.local_response_norm(to_nchw(x), size, alpha=1e-2, beta=0.75, k=2.0)
    assert_matches(layers.lrn(x, size, 1e-2, 0.75, 2.0), to_nhwc(want), rtol=1e-5, atol=1e-6)


def test_batchnorm_matches_torch():
    x = rand(3, 6, 5, 8, seed=8)
    rng = np.random.default_rng(9)
    scale, shift, mean = (rng.standard_normal(8).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.2, 2, 8).astype(np.float32)
    t = [torch.from_numpy(a) for a in (mean, var, scale, shift)]
    want = F.batch_norm(to_nchw(x), *t, training=False, eps=1e-3)
    assert_matches(layers.batchnorm(x, scale, shift, mean, var, 1e-3), to_nhwc(want))


def test_pools_softmax_and_elementwise_match_torch():
    x = rand(2, 7, 3, 10, seed=10) * 5
    t = to_nchw(x)
    assert_matches(layers.global_avg_pool(x), to_nhwc(F.adaptive_avg_pool2d(t, 1)))
    assert_matches(layers.global_max_pool(x), to_nhwc(F.adaptive_max_pool2d(t, 1)))
    assert_matches(layers.softmax(x), to_nhwc(F.softmax(t, dim=1)), atol=1e-6)
    assert_matches(layers.sigmoid(x), to_nhwc(torch.sigmoid(t)), atol=1e-6)
    assert_matches(layers.tanh(x), to_nhwc(torch.tanh(t)), atol=1e-6)
    assert_matches(layers.clip(x, 0.0, 6.0), to_nhwc(F.relu6(t)))
    y = rand(2, 7, 3, 10, seed=11)
    assert_matches(layers.add([x, y], relu=True), to_nhwc(F.relu(t + to_nchw(y))))
    assert_matches(layers.concat([x, y]), to_nhwc(torch.cat([t, to_nchw(y)], dim=1)))
