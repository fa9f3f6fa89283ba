"""Model.gradients: against the backward references chained by hand, and its argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from test_model import SPEC, make_arrays, reference_run
from test_ops import assert_matches, rand

from engine import InputError, Model, ModelError
from engine import backward_reference as ref


@pytest.fixture(scope="module")
def model():
    return Model.from_arrays(SPEC, make_arrays())


def reference_gradients(a, x, channel):
    """d sum(fc[..., channel]) by the plain-loop backward of each SPEC layer, last to first."""
    out = reference_run(a, x)
    g = np.zeros(out["fc"].shape, np.float32)
    g[..., channel] = 1.0
    grads = {"fc": g}
    g = ref.local2d_backward_reference(out["avg"], a["fc.w"], g, 2)[0]
    grads["avg"] = g
    g = ref.avg_pool2d_backward_reference(out["relu2"], g, 2, 1, (0, 0, 1, 1))
    grads["relu2"] = g
    g = grads["conv2"] = ref.relu_backward_reference(out["relu2"], g)
    g = ref.conv2d_backward_reference(out["pool1"], a["conv2.w"], g, 1, 2, 2)[0]
    grads["pool1"] = g
    g = ref.max_pool2d_backward_reference(out["relu1"], g, 3, 2, 1)
    grads["relu1"] = g
    g = grads["conv1"] = ref.relu_backward_reference(out["relu1"], g)
    grads["input"] = ref.conv2d_backward_reference(x, a["conv1.w"], g, 1, (1, 0, 1, 1))[0]
    return grads


def test_gradients_match_the_chained_references(model):
    x = rand(2, 9, 9, 3, seed=3)
    want = reference_gradients(make_arrays(), x, 1)
    wrt = ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "avg", "fc"]
    got = model.gradients(x, {"layer": "fc", "channel": 1}, wrt)
    assert list(got) == wrt
    for name in wrt:
        assert_matches(got[name], want[name], atol=1e-4)


def test_gradients_of_layers_only_stop_at_the_lowest(model):
    x = rand(2, 9, 9, 3, seed=4)
    want = reference_gradients(make_arrays(), x, 0)
    for wrt in (["conv2"], ["pool1", "avg"], ["fc"], ["conv1"]):
        got = model.gradients(x, {"layer": "fc", "channel": 0}, wrt)
        assert list(got) == wrt
        for name in wrt:
            assert_matches(got[name], want[name], atol=1e-4)


def test_top_picks_each_images_largest_channel(model):
    x = rand(4, 9, 9, 3, seed=5)
    scores = model.run(x)["fc"].sum(axis=(1, 2))
    got = model.gradients(x, {"layer": "fc", "channel": "top"})["input"]
    for i, k in enumerate(scores.argmax(axis=1)):
        one = model.gradients(x[i : i + 1], {"layer": "fc", "channel": int(k)})["input"]
        assert_matches(got[i : i + 1], one, atol=1e-5)


def test_numpy_integer_channels_are_taken(model):
    x = rand(1, 9, 9, 3, seed=6)
    got = model.gradients(x, {"layer": "fc", "channel": np.int64(1)})["input"]
    assert_matches(got, model.gradients(x, {"layer": "fc", "channel": 1})["input"], 0, 0)


def test_uint8_images_give_the_gradient_of_the_preprocessed_input(model):
    img = np.random.default_rng(0).integers(0, 255, (1, 9, 9, 3), dtype=np.uint8)
    target = {"layer": "conv2", "channel": 2}
    got = model.gradients(img, target)["input"]
    assert_matches(got, model.gradients(model.prepare(img), target)["input"], 0, 0)


@pytest.mark.parametrize(
    "target,wrt,error,fragment",
    [
        ({"layer": "nope", "channel": 0}, ["input"], ModelError, "unknown"),
        ({"layer": "fc", "channel": 2}, ["input"], ModelError, "out of range"),
        ({"layer": "fc", "channel": 1.5}, ["input"], ModelError, "integer"),
        ({"layer": "fc", "channel": 0, "x": 1}, ["input"], ModelError, "unknown keys"),
        ("fc", ["input"], ModelError, "target"),
        ({"layer": "fc", "channel": 0}, ["bogus"], ModelError, "neither"),
        ({"layer": "fc", "channel": 0}, [], ModelError, "non-empty"),
    ],
)
def test_bad_arguments(model, target, wrt, error, fragment):
    with pytest.raises(error, match=fragment):
        model.gradients(rand(1, 9, 9, 3), target, wrt)


def test_bad_images(model):
    with pytest.raises(InputError):
        model.gradients(rand(1, 8, 9, 3), {"layer": "fc", "channel": 0})


def test_a_layer_that_may_run_in_place_leaves_the_saved_relu_output_alone():
    """sigmoid may overwrite the ReLU output it reads in a run; the ReLU's backward needs it."""
    spec = {
        "name": "inplace",
        "input": {"height": 6, "width": 6, "channels": 2},
        "layers": [
            {"name": "c1", "type": "conv", "filters": 3, "size": 3, "pad": 1},
            {"name": "r1", "type": "relu"},
            {"name": "s1", "type": "sigmoid"},
        ],
    }
    a = {"c1.w": rand(3, 3, 3, 2, seed=1), "c1.b": rand(3, seed=2)}
    model = Model.from_arrays(spec, a)
    x = rand(2, 6, 6, 2, seed=3)
    c = model.run(x, outputs=["c1"])["c1"].astype(np.float64)
    r = np.maximum(c, 0)
    s = 1 / (1 + np.exp(-r))
    g = np.zeros(c.shape)
    g[..., 1] = s[..., 1] * (1 - s[..., 1]) * (c[..., 1] > 0)
    assert (c[..., 1] <= 0).any()  # some gradients must be cut by the ReLU
    want = ref.conv2d_backward_reference(x, a["c1.w"], g.astype(np.float32), 1, 1)[0]
    got = model.gradients(x, {"layer": "s1", "channel": 1}, ["input", "c1"])
    assert_matches(got["c1"], g.astype(np.float32), atol=1e-6)
    assert_matches(got["input"], want, atol=1e-5)
