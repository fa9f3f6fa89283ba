"""Backward of the graph layers and Model.gradients on a graph model, against finite
differences and PyTorch autograd."""

from __future__ import annotations

import numpy as np
import pytest
from test_ops import assert_matches, rand

from engine import Model, layers
from engine import backward_graph as bg

F64 = np.float64


def numeric(f, x: np.ndarray, dout: np.ndarray, eps=1e-3, picks=8, seed=0):
    """Yield (index, central-difference d sum(dout * f(x)) / dx[index]) at a few indices."""
    rng = np.random.default_rng(seed)
    for _ in range(picks):
        i = tuple(int(rng.integers(0, s)) for s in x.shape)
        up, down = x.astype(F64), x.astype(F64)
        up[i] += eps
        down[i] -= eps
        diff = (f(up) - f(down)).astype(F64)
        yield i, float((diff * dout).sum() / (2 * eps))


def _lrn64(x, size, alpha, beta, bias):
    c = x.shape[-1]
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = np.stack([(x[..., max(0, j - lo) : j + hi + 1] ** 2).sum(-1) for j in range(c)], -1)
    return x / (bias + alpha / size * sq) ** beta


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_lrn_backward_matches_finite_differences_and_forward(size):
    x = rand(2, 3, 4, 7, seed=size)
    args = (size, 0.3, 0.75, 1.5)  # big alpha: the cross terms matter
    assert_matches(layers.lrn(x, *args), _lrn64(x.astype(F64), *args).astype(np.float32))
    dout = rand(*x.shape, seed=9)
    got = bg.lrn_backward(x, dout, *args)
    for i, want in numeric(lambda v: _lrn64(v, *args), x, dout):
        assert got[i] == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_elementwise_and_channel_backwards_match_finite_differences():
    x = rand(2, 3, 4, 5, seed=1)
    dout = rand(*x.shape, seed=2)

    def softmax64(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    cases = [
        (bg.softmax_backward(layers.softmax(x), dout), softmax64),
        (bg.sigmoid_backward(layers.sigmoid(x), dout), lambda v: 1 / (1 + np.exp(-v))),
        (bg.tanh_backward(layers.tanh(x), dout), np.tanh),
        (bg.clip_backward(x, dout, -0.5, 0.7), lambda v: np.clip(v, -0.5, 0.7)),
    ]
    s, t, m, v = rand(5, seed=3), rand(5, seed=4), rand(5, seed=5), np.abs(rand(5, seed=6))
    a = s.astype(F64) / np.sqrt(v + 1e-5)
    cases.append((bg.batchnorm_backward(dout, s, t, m, v), lambda u: (u - m) * a + t))
    for got, f in cases:
        for i, want in numeric(f, x, dout, eps=1e-4):
            assert got[i] == pytest.approx(want, rel=1e-3, abs=1e-5)


def test_global_pool_and_concat_backward():
    x = rand(2, 3, 4, 5, seed=7)
    x[0, 1, 2, 3] = x[0, 2, 1, 3] = 9.0  # a tie: the first in row-major order gets it
    dout = rand(2, 1, 1, 5, seed=8)
    dx = bg.global_max_pool_backward(x, dout)
    assert dx[0, 1, 2, 3] == dout[0, 0, 0, 3] and dx[0, 2, 1, 3] == 0
    assert_matches(dx.sum(axis=(1, 2)), dout[:, 0, 0], 0, 0)
    avg = bg.global_avg_pool_backward(dout, (3, 4))
    assert_matches(avg, np.broadcast_to(dout / 12, x.shape).astype(np.float32))
    parts = bg.concat_backward(x, [2, 3])
    assert_matches(np.concatenate(parts, -1), x, 0, 0) and parts[1].shape[-1] == 3


GRAPH = {
    "name": "graph",
    "input": {"height": 8, "width": 8, "channels": 3},
    "layers": [
        {"name": "c1", "type": "conv", "filters": 8, "size": 3, "pad": 1},
        {"name": "bn1", "type": "batchnorm"},
        {"name": "r1", "type": "relu"},
        {"name": "c2", "type": "conv", "filters": 8, "size": 3, "pad": 1, "groups": 2},
        {"name": "a1", "type": "add", "inputs": ["c2", "r1"], "relu": True},
        {"name": "l1", "type": "lrn", "size": 3, "alpha": 0.1},
        {"name": "dw", "type": "conv", "filters": 8, "size": 3, "pad": 1, "groups": 8},
        {"name": "c3", "type": "conv", "filters": 4, "size": 1, "input": "r1"},
        {"name": "t1", "type": "tanh"},
        {"name": "cat", "type": "concat", "inputs": ["dw", "t1"]},
        {"name": "s1", "type": "sigmoid"},
        {"name": "cl", "type": "clip", "min": 0.1, "max": 0.9},
        {"name": "mp", "type": "maxpool", "size": 2, "stride": 2},
        {"name": "gap", "type": "globalavgpool"},
        {"name": "gmp", "type": "globalmaxpool", "input": "mp"},
        {"name": "a2", "type": "add", "inputs": ["gap", "gmp"]},
        {"name": "fc", "type": "conv", "filters": 5, "size": 1},
        {"name": "sm", "type": "softmax"},
    ],
}


def graph_arrays(seed=0):
    """Weights small where a saturating tanh/sigmoid would make near-ties (float32 vs float64
    picking different maxima); clip's mask is checked on its own above."""
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "c1.w": r(8, 3, 3, 3),
        "c1.b": r(8),
        "bn1.scale": r(8),
        "bn1.shift": r(8),
        "bn1.mean": r(8),
        "bn1.var": np.abs(r(8)) + 0.5,
        "c2.w": r(8, 3, 3, 4) * 0.3,
        "c2.b": r(8),
        "dw.w": r(8, 3, 3, 1) * 0.1,
        "dw.b": r(8) * 0.1,
        "c3.w": r(4, 1, 1, 8) * 0.1,
        "c3.b": r(4),
        "fc.w": r(5, 1, 1, 12),
        "fc.b": r(5),
    }


def torch_graph(a, tx, torch):
    f = torch.nn.functional
    w = {k: torch.from_numpy(v.astype(F64)) for k, v in a.items()}

    def conv(t, name, pad=0, groups=1):
        return f.conv2d(t, w[name + ".w"].permute(0, 3, 1, 2), w[name + ".b"], 1, pad, 1, groups)

    o = {}
    o["c1"] = conv(tx, "c1", 1)
    bn = [w["bn1." + k][None, :, None, None] for k in ("scale", "shift", "mean", "var")]
    o["bn1"] = (o["c1"] - bn[2]) / torch.sqrt(bn[3] + 1e-5) * bn[0] + bn[1]
    o["r1"] = f.relu(o["bn1"])
    o["c2"] = conv(o["r1"], "c2", 1, 2)
    o["a1"] = f.relu(o["c2"] + o["r1"])
    o["l1"] = f.local_response_norm(o["a1"], 3, alpha=0.1, beta=0.75, k=1.0)
    o["dw"] = conv(o["l1"], "dw", 1, 8)
    o["c3"] = conv(o["r1"], "c3")
    o["t1"] = torch.tanh(o["c3"])
    o["cat"] = torch.cat([o["dw"], o["t1"]], 1)
    o["s1"] = torch.sigmoid(o["cat"])
    o["cl"] = torch.clamp(o["s1"], 0.1, 0.9)
    o["mp"] = f.max_pool2d(o["cl"], 2, 2)
    o["gap"] = o["mp"].mean(dim=(2, 3), keepdim=True)
    o["gmp"] = f.adaptive_max_pool2d(o["mp"], 1)
    o["a2"] = o["gap"] + o["gmp"]
    o["fc"] = conv(o["a2"], "fc")
    o["sm"] = torch.softmax(o["fc"], 1)
    return o


@pytest.mark.parametrize("layer,channel", [("sm", 2), ("fc", "top"), ("cat", 9), ("a1", 0)])
def test_graph_model_gradients_match_autograd(layer, channel):
    torch = pytest.importorskip("torch")
    a = graph_arrays()
    model = Model.from_arrays(GRAPH, a)
    x = rand(2, 8, 8, 3, seed=4)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(F64)).requires_grad_(True)
    outs = torch_graph(a, tx, torch)
    wrt = ["r1", "a1", "cat", "mp"]
    for name in wrt:
        outs[name].retain_grad()
    t = outs[layer]
    if channel == "top":
        picks = t.sum(dim=(2, 3)).argmax(dim=1)
        t[torch.arange(2), picks].sum().backward()
    else:
        t[:, channel].sum().backward()
    got = model.gradients(x, {"layer": layer, "channel": channel}, ["input", *wrt])

    def close(g, tg):
        want = np.zeros(g.shape) if tg is None else tg.detach().permute(0, 2, 3, 1).numpy()
        scale = max(float(np.abs(want).max()), 1e-3)
        np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-4 * scale)

    close(got["input"], tx.grad)
    for name in wrt:
        close(got[name], outs[name].grad)
