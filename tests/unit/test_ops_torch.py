"""Cross-check the fast layers against PyTorch (test-only; NHWC <-> NCHW by permutes)."""

from __future__ import annotations

import numpy as np
import pytest
from test_ops import assert_matches, rand

from engine import ops

pytestmark = pytest.mark.reference
torch = pytest.importorskip("torch")
F = torch.nn.functional


def to_nchw(x: np.ndarray):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(t) -> np.ndarray:
    return t.permute(0, 2, 3, 1).contiguous().numpy()


def torch_pad(x: np.ndarray, pad, value=0.0):
    """Apply (top, left, bottom, right) pads on NCHW the way F.pad orders them."""
    top, left, bottom, right = pad
    return F.pad(to_nchw(x), (left, right, top, bottom), value=value)


# (N, H, W, C, K, (FH, FW), stride, (top, left, bottom, right), dilation)
CONV = {
    "alexnet-conv1-227": (1, 227, 227, 3, 8, (11, 11), 4, (0, 0, 0, 0), 1),
    "3x3-same": (2, 14, 14, 16, 96, (3, 3), 1, (1, 1, 1, 1), 1),
    "1x1": (2, 7, 9, 40, 130, (1, 1), 1, (0, 0, 0, 0), 1),
    "strided-nonsquare": (1, 15, 12, 5, 7, (3, 5), (2, 3), (1, 2, 1, 2), 1),
    "asymmetric-pads": (2, 10, 11, 4, 33, (3, 3), 1, (0, 2, 1, 0), 1),
    "dilated": (1, 20, 20, 8, 48, (3, 3), 1, (2, 2, 2, 2), (2, 3)),
    "fc-as-conv": (3, 6, 6, 32, 10, (6, 6), 1, (0, 0, 0, 0), 1),
}


@pytest.mark.parametrize("case", CONV.values(), ids=CONV.keys())
def test_conv2d_matches_torch(case):
    n, h, w, c, k, size, stride, pad, dilation = case
    x, wt, b = rand(n, h, w, c, seed=31), rand(k, *size, c, seed=32), rand(k, seed=33)
    want = F.conv2d(
        torch_pad(x, pad),
        torch.from_numpy(wt).permute(0, 3, 1, 2),
        torch.from_numpy(b),
        stride=stride,
        dilation=dilation,
    )
    got = ops.conv2d(x, wt, b, stride=stride, pad=pad, dilation=dilation, relu=True)
    assert_matches(got, to_nhwc(F.relu(want)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "size,stride,pad,dilation",
    [
        (3, 2, (0, 0, 0, 0), 1),
        (2, 2, (1, 1, 1, 1), 1),
        ((3, 2), (1, 2), (1, 0, 1, 0), 1),
        (3, 1, (2, 2, 2, 2), 2),
    ],
)
def test_max_pool2d_matches_torch(size, stride, pad, dilation):
    x = rand(2, 13, 12, 6, seed=34)
    # F.max_pool2d only pads symmetrically, so asymmetric cases pad with -inf first
    want = F.max_pool2d(torch_pad(x, pad, -np.inf), size, stride, dilation=dilation)
    assert_matches(ops.max_pool2d(x, size, stride, pad, dilation), to_nhwc(want), 0, 0)


@pytest.mark.parametrize("count_pad", [False, True])
@pytest.mark.parametrize("size,stride,pad", [(3, 2, 1), ((2, 3), (2, 1), (1, 1)), (2, 2, 0)])
def test_avg_pool2d_matches_torch(size, stride, pad, count_pad):
    x = rand(2, 11, 10, 5, seed=35)
    want = F.avg_pool2d(to_nchw(x), size, stride, pad, count_include_pad=count_pad)
    assert_matches(ops.avg_pool2d(x, size, stride, pad, count_pad), to_nhwc(want))


def test_relu_matches_torch():
    x = rand(3, 4, 5, 6, seed=36)
    assert_matches(ops.relu(x), F.relu(torch.from_numpy(x)).numpy(), 0, 0)
