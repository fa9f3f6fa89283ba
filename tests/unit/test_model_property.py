"""Hypothesis: random small networks run through Model equal the plain-loop layers chained by hand,
and every shape Model predicts is the shape it returns."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine import Model, ShapeError
from engine.reference import (
    avg_pool2d_reference,
    conv2d_reference,
    local2d_reference,
    max_pool2d_reference,
    relu_reference,
)
from engine.spec import parse_spec

small = st.integers(1, 3)


@st.composite
def layers(draw):
    kind = draw(st.sampled_from(["conv", "relu", "maxpool", "avgpool", "local"]))
    layer = {"type": kind}
    if kind == "relu":
        return layer
    layer["size"] = [draw(small), draw(small)]
    layer["stride"] = [draw(small), draw(small)]
    layer["pad"] = [draw(st.integers(0, 1)) for _ in range(4)]
    if kind in ("conv", "local"):
        layer["filters"] = draw(small)
        layer["bias"] = draw(st.sampled_from([None, "default"]))
    if kind in ("conv", "local", "maxpool"):
        layer["dilation"] = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    if kind == "avgpool":
        layer["count_pad"] = draw(st.booleans())
    return layer


def reference(spec, arrays, x):
    out = {}
    for layer in spec["layers"]:
        kind, name = layer["type"], layer["name"]
        if kind == "relu":
            x = relu_reference(x)
        elif kind in ("conv", "local"):
            fn = conv2d_reference if kind == "conv" else local2d_reference
            bias = arrays.get(layer["bias"]) if layer["bias"] else None
            x = fn(
                x, arrays[layer["weights"]], bias, layer["stride"], layer["pad"], layer["dilation"]
            )
        elif kind == "maxpool":
            x = max_pool2d_reference(
                x, layer["size"], layer["stride"], layer["pad"], layer["dilation"]
            )
        else:
            x = avg_pool2d_reference(
                x, layer["size"], layer["stride"], layer["pad"], layer["count_pad"]
            )
        out[name] = x
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(layers(), min_size=1, max_size=4),
    h=st.integers(3, 9),
    w=st.integers(3, 9),
    c=small,
    seed=st.integers(0, 2**16),
    uint8=st.booleans(),
)
def test_model_matches_chained_reference(raw, h, w, c, seed, uint8):
    for i, layer in enumerate(raw):
        layer["name"] = f"l{i}"
        if layer.get("bias") == "default":
            del layer["bias"]
    spec_dict = {"input": {"height": h, "width": w, "channels": c}, "fit": "floor", "layers": raw}
    try:
        spec = parse_spec(spec_dict)
    except ShapeError:
        assume(False)
    norm = spec.to_dict()
    shapes = spec.shapes(h, w)
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer, cin, shape in zip(norm["layers"], spec.channels_in(), shapes, strict=True):
        if layer["type"] not in ("conv", "local"):
            continue
        k, (fh, fw) = layer["filters"], layer["size"]
        lead = () if layer["type"] == "conv" else shape[:2]
        arrays[layer["weights"]] = rng.standard_normal((*lead, k, fh, fw, cin)).astype(np.float32)
        if layer["bias"]:
            arrays[layer["bias"]] = rng.standard_normal((*lead, k)).astype(np.float32)
    model = Model.from_arrays(spec_dict, arrays)
    if uint8:
        images = rng.integers(0, 256, (2, h, w, c), dtype=np.uint8)
        x = images.astype(np.float32)
    else:
        images = x = rng.standard_normal((2, h, w, c)).astype(np.float32)
    want = reference(norm, arrays, x)
    wanted = rng.choice(model.layer_names, size=rng.integers(1, len(raw) + 1), replace=False)
    got = model.run(images, list(wanted))
    predicted = model.output_shapes(h, w)
    rows = {row["name"]: row for row in model.summary()}
    for name, array in got.items():
        assert array.shape == (2, *predicted[name])
        assert rows[name]["activation_bytes"] == array[0].nbytes
        np.testing.assert_allclose(array, want[name], rtol=1e-4, atol=1e-3)
