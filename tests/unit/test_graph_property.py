"""Random graphs: every requested layer of a fused, freeing run equals a plain reference walk."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Model
from engine import layers_reference as lref
from engine.reference import conv2d_reference, max_pool2d_reference, relu_reference

KINDS = ("conv", "conv", "batchnorm", "relu", "add", "concat", "sigmoid", "clip", "lrn", "maxpool")


@st.composite
def graphs(draw):
    """Return (spec, arrays, requested outputs): each layer reads random earlier values."""
    c0 = draw(st.integers(1, 4))
    depth = {"image": c0}
    layers, arrays = [], {}
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    for i in range(draw(st.integers(1, 9))):
        name, kind = f"l{i}", draw(st.sampled_from(KINDS))
        names = list(depth)
        src = draw(st.sampled_from(names))
        c = depth[src]
        layer = {"name": name, "type": kind, "input": src}
        if kind == "conv":
            groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
            k = groups * draw(st.integers(1, 3))
            size = draw(st.sampled_from([1, 3]))
            layer |= {"filters": k, "size": size, "pad": size // 2, "groups": groups}
            arrays[f"{name}.w"] = rng.standard_normal((k, size, size, c // groups), np.float32)
            arrays[f"{name}.b"] = rng.standard_normal(k).astype(np.float32)
            c = k
        elif kind == "batchnorm":
            for key in ("scale", "shift", "mean"):
                arrays[f"{name}.{key}"] = rng.standard_normal(c).astype(np.float32)
            arrays[f"{name}.var"] = rng.uniform(0.2, 2, c).astype(np.float32)
        elif kind in ("add", "concat"):
            pool = [n for n in names if depth[n] == c] if kind == "add" else names
            extra = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=2))
            del layer["input"]
            layer["inputs"] = [src, *extra]
            if kind == "add":
                layer["relu"] = draw(st.booleans())
            else:
                c = sum(depth[n] for n in layer["inputs"])
        elif kind == "clip":
            layer |= {"min": -0.5, "max": 1.0}
        elif kind == "lrn":
            layer |= {"size": draw(st.integers(1, 4)), "alpha": 0.1}
        elif kind == "maxpool":
            layer |= {"size": 3, "stride": 1, "pad": 1}
        depth[name] = c
        layers.append(layer)
    names = [layer["name"] for layer in layers]
    wanted = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    spec = {"input": {"height": 5, "width": 4, "channels": c0}, "layers": layers}
    return spec, arrays, wanted


def reference_run(spec: dict, a: dict, x: np.ndarray) -> dict[str, np.ndarray]:
    """Walk the spec in its listed order (graphs() only reads earlier layers) with reference ops."""
    v = {"image": x}
    for layer in spec["layers"]:
        name, kind = layer["name"], layer["type"]
        ins = [v[s] for s in layer.get("inputs", [layer.get("input")])]
        if kind == "conv":
            g, w, b = layer["groups"], a[f"{name}.w"], a[f"{name}.b"]
            cg, kg = ins[0].shape[3] // g, w.shape[0] // g
            v[name] = np.concatenate(
                [
                    conv2d_reference(
                        ins[0][..., j * cg : (j + 1) * cg],
                        w[j * kg : (j + 1) * kg],
                        b[j * kg : (j + 1) * kg],
                        pad=layer["pad"],
                    )
                    for j in range(g)
                ],
                axis=3,
            )
        elif kind == "batchnorm":
            arrays = (a[f"{name}.{k}"] for k in ("scale", "shift", "mean", "var"))
            v[name] = lref.batchnorm_reference(ins[0], *arrays)
        elif kind == "relu":
            v[name] = relu_reference(ins[0])
        elif kind == "add":
            v[name] = lref.add_reference(ins, relu=layer["relu"])
        elif kind == "concat":
            v[name] = lref.concat_reference(ins)
        elif kind == "sigmoid":
            v[name] = lref.sigmoid_reference(ins[0])
        elif kind == "clip":
            v[name] = lref.clip_reference(ins[0], layer["min"], layer["max"])
        elif kind == "lrn":
            v[name] = lref.lrn_reference(ins[0], layer["size"], layer["alpha"])
        else:
            v[name] = max_pool2d_reference(ins[0], 3, 1, 1)
    return v


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graph=graphs(), n=st.integers(1, 2), fuse=st.booleans())
def test_random_graph_runs_match_the_reference(graph, n, fuse):
    spec, arrays, wanted = graph
    model = Model.from_arrays(spec, arrays)
    model.fuse = fuse
    x = np.random.default_rng(n).standard_normal((n, 5, 4, spec["input"]["channels"]))
    x = x.astype(np.float32)
    before = x.copy()
    got = model.run(x, outputs=wanted)
    np.testing.assert_array_equal(x, before)  # results written in place never land on the input
    want = reference_run(spec, arrays, x)
    assert list(got) == wanted
    for name in wanted:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-4, err_msg=name)
    assert model.memory(n, 5, 4, wanted) <= model.memory(n, 5, 4, "all")
