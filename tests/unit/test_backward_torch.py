"""Backward passes and Model.gradients against PyTorch autograd (test-only; NCHW by permutes)."""

from __future__ import annotations

import numpy as np
import pytest
from test_backward import CONV, _conv_case
from test_model import SPEC, make_arrays
from test_ops import rand

from engine import Model, ops
from engine import backward as bw

torch = pytest.importorskip("torch")
F = torch.nn.functional
RTOL = 1e-4


def nchw(x: np.ndarray, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)).astype(np.float64))
    return t.requires_grad_(grad)


def nhwc(t) -> np.ndarray:
    return t.detach().permute(0, 2, 3, 1).numpy()


def pad4(t, pad, value=0.0):
    top, left, bottom, right = pad
    return F.pad(t, (left, right, top, bottom), value=value)


def close(got, want):
    """Within 1e-4 relative of autograd's float64 answer (atol for values near 0)."""
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("name", list(CONV))
def test_conv2d_backward_matches_autograd(name):
    x, wt, dout, stride, pad, dilation = _conv_case(name, seed=11)
    pads = ops.Window.make(wt.shape[1:3], stride, pad, dilation).pad
    tx, tw = nchw(x, True), nchw(wt, True)
    tb = torch.zeros(wt.shape[0], dtype=torch.float64, requires_grad=True)
    out = F.conv2d(pad4(tx, pads), tw, tb, stride, 0, dilation)
    out.backward(nchw(dout))
    dx, dw, db = bw.conv2d_backward(x, wt, dout, stride, pad, dilation)
    close(dx, nhwc(tx.grad))
    close(dw, nhwc(tw.grad))
    close(db, tb.grad.numpy())


@pytest.mark.parametrize(
    "size,stride,pad,dilation", [(3, 2, (1, 1, 1, 1), 1), (3, 1, (2, 2, 2, 2), 2), (2, 2, 0, 1)]
)
def test_max_pool_backward_matches_autograd_ties_included(size, stride, pad, dilation):
    x = np.round(rand(2, 9, 8, 3, seed=3))  # small integers: many ties
    pads = ops.Window.make(size, stride, pad, dilation).pad
    tx = nchw(x, True)
    out = F.max_pool2d(pad4(tx, pads, -np.inf), size, stride, dilation=dilation)
    dout = rand(*nhwc(out).shape, seed=4)
    out.backward(nchw(dout))
    close(bw.max_pool2d_backward(x, dout, size, stride, pad, dilation), nhwc(tx.grad))


@pytest.mark.parametrize("count_pad", [False, True])
def test_avg_pool_backward_matches_autograd(count_pad):
    x = rand(2, 9, 8, 3, seed=5)
    tx = nchw(x, True)
    out = F.avg_pool2d(tx, 3, 2, 1, count_include_pad=count_pad)
    dout = rand(*nhwc(out).shape, seed=6)
    out.backward(nchw(dout))
    close(bw.avg_pool2d_backward(x, dout, 3, 2, 1, count_pad), nhwc(tx.grad))


def torch_net(a, tx):
    """test_model.SPEC in PyTorch; returns every layer's output (NCHW float64)."""
    w = {k: torch.from_numpy(v.astype(np.float64)) for k, v in a.items()}
    out = {}
    out["conv1"] = F.conv2d(pad4(tx, (1, 0, 1, 1)), w["conv1.w"].permute(0, 3, 1, 2), w["conv1.b"])
    out["relu1"] = F.relu(out["conv1"])
    out["pool1"] = F.max_pool2d(out["relu1"], 3, 2, 1)
    out["conv2"] = F.conv2d(
        out["pool1"], w["conv2.w"].permute(0, 3, 1, 2), w["conv2.b"], padding=2, dilation=2
    )
    out["relu2"] = F.relu(out["conv2"])
    padded = pad4(out["relu2"], (0, 0, 1, 1))
    ones = pad4(torch.ones_like(out["relu2"][:1, :1]), (0, 0, 1, 1))
    out["avg"] = F.avg_pool2d(padded, 2, 1) / F.avg_pool2d(ones, 2, 1)
    cols = F.unfold(out["avg"], 3, stride=2)  # (N, C*9, L), C-major like (C, FH, FW)
    fc = w["fc.w"].permute(0, 1, 2, 5, 3, 4).reshape(4, 2, -1)  # (L, K, C*9)
    out["fc"] = torch.einsum("njl,lkj->nkl", cols, fc).reshape(-1, 2, 2, 2)
    return out


@pytest.mark.parametrize("layer,channel", [("fc", 1), ("fc", "top"), ("relu2", 3), ("pool1", 0)])
def test_model_gradients_match_autograd(layer, channel):
    a = make_arrays()
    model = Model.from_arrays(SPEC, a)
    x = rand(3, 9, 9, 3, seed=8)
    tx = nchw(x, True)
    outs = torch_net(a, tx)
    wrt = [name for name in ["conv1", "pool1", "conv2", "avg"] if name in outs]
    for name in wrt:
        outs[name].retain_grad()
    target = outs[layer]
    if channel == "top":
        picks = target.sum(dim=(2, 3)).argmax(dim=1)
        objective = target[torch.arange(3), picks].sum()
    else:
        objective = target[:, channel].sum()
    objective.backward()
    got = model.gradients(x, {"layer": layer, "channel": channel}, ["input", *wrt])
    close(got["input"], nhwc(tx.grad))
    names = model.layer_names
    for name in wrt:
        if names.index(name) > names.index(layer):
            assert not got[name].any()
        else:
            close(got[name], nhwc(outs[name].grad))


@pytest.mark.parametrize("name", ["g2", "depthwise", "depthwise-x2-strided", "g3-stride3"])
def test_grouped_conv2d_backward_matches_autograd(name):
    from test_backward import GROUPED

    n, h, w, c, k, size, stride, pad, dilation, groups = GROUPED[name]
    x, wt = rand(n, h, w, c, seed=4), rand(k, *size, c // groups, seed=5)
    pads = ops.Window.make(size, stride, pad, dilation).pad
    tx, tw = nchw(x, True), nchw(wt, True)
    out = F.conv2d(pad4(tx, pads), tw, None, stride, 0, dilation, groups)
    dout = rand(*nhwc(out).shape, seed=6)
    out.backward(nchw(dout))
    dx, dw, _ = bw.conv2d_backward(x, wt, dout, stride, pad, dilation, groups)
    close(dx, nhwc(tx.grad))
    close(dw, nhwc(tw.grad))
