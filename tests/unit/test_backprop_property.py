"""Model.gradients over random graphs (test_graph_property.graphs) against PyTorch autograd."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_graph_property import graphs

from engine import Model

torch = pytest.importorskip("torch")
F = torch.nn.functional


def torch_run(spec: dict, a: dict, tx) -> dict:
    """The graph in PyTorch float64, NCHW; every layer's output."""
    t = {k: torch.from_numpy(v.astype(np.float64)) for k, v in a.items()}
    v = {"image": tx}
    for layer in spec["layers"]:
        name, kind = layer["name"], layer["type"]
        ins = [v[s] for s in layer.get("inputs", [layer.get("input")])]
        x = ins[0]
        if kind == "conv":
            w = t[f"{name}.w"].permute(0, 3, 1, 2)
            v[name] = F.conv2d(x, w, t[f"{name}.b"], 1, layer["pad"], 1, layer["groups"])
        elif kind == "batchnorm":
            s, sh, m, var = (
                t[f"{name}.{k}"][None, :, None, None] for k in ("scale", "shift", "mean", "var")
            )
            v[name] = (x - m) / torch.sqrt(var + 1e-5) * s + sh
        elif kind == "relu":
            v[name] = F.relu(x)
        elif kind == "add":
            total = sum(ins[1:], ins[0])
            v[name] = F.relu(total) if layer["relu"] else total
        elif kind == "concat":
            v[name] = torch.cat(ins, 1)
        elif kind == "sigmoid":
            v[name] = torch.sigmoid(x)
        elif kind == "clip":
            v[name] = torch.clamp(x, layer["min"], layer["max"])
        elif kind == "lrn":
            size, c = layer["size"], x.shape[1]
            lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
            sq = F.pad(x * x, (0, 0, 0, 0, lo, hi))  # the spec's window: [c - lo, c + hi]
            total = sum(sq[:, j : j + c] for j in range(size))
            v[name] = x / (1.0 + layer["alpha"] / size * total) ** 0.75
        else:
            v[name] = F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=-np.inf), 3, 1)
    return v


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=graphs(), n=st.integers(1, 2), top=st.booleans())
def test_random_graph_gradients_match_autograd(graph, n, top):
    spec, arrays, wanted = graph
    target, also = wanted[0], wanted[1:]
    model = Model.from_arrays(spec, arrays)
    x = np.random.default_rng(n).standard_normal((n, 5, 4, spec["input"]["channels"]))
    x = x.astype(np.float32)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64)).requires_grad_(True)
    outs = torch_run(spec, arrays, tx)
    for name in also:
        outs[name].retain_grad()
    y = outs[target]
    if top:
        picks = y.sum(dim=(2, 3)).argmax(dim=1)
        y[torch.arange(n), picks].sum().backward()
    else:
        y[:, 0].sum().backward()
    got = model.gradients(x, {"layer": target, "channel": "top" if top else 0}, ["input", *also])
    for name, tg in [("input", tx.grad), *((m, outs[m].grad) for m in also)]:
        want = np.zeros(got[name].shape) if tg is None else tg.permute(0, 2, 3, 1).numpy()
        scale = max(float(np.abs(want).max()), 1e-3)
        np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-4 * scale, err_msg=name)
