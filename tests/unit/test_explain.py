"""engine.explain: saliency, Grad-CAM and gradient maps against their definitions, overlays."""

from __future__ import annotations

import numpy as np
import pytest
from test_model import SPEC, make_arrays
from test_ops import assert_matches, rand

from engine import Model, ModelError
from engine.explain import check_request, explain, upsample


@pytest.fixture(scope="module")
def model():
    return Model.from_arrays(SPEC, make_arrays())


def test_saliency_is_the_largest_absolute_input_gradient(model):
    x = rand(2, 9, 9, 3, seed=1)
    got = explain(model, x, {"method": "saliency", "layer": "fc", "channel": 1})
    g = model.gradients(x, {"layer": "fc", "channel": 1})["input"]
    assert_matches(got.maps, np.abs(g).max(axis=3), 0, 0)
    assert got.overlays.shape == (2, 9, 9, 3) and got.overlays.dtype == np.uint8
    assert list(got.channels) == [1, 1]


def test_gradient_is_the_raw_input_gradient_and_top_picks_per_image(model):
    x = rand(3, 9, 9, 3, seed=2)
    got = explain(model, x, {"method": "gradient", "layer": "fc", "channel": "top"})
    top = model.run(x)["fc"].sum(axis=(1, 2)).argmax(axis=1)
    assert list(got.channels) == list(top)
    want = model.gradients(x, {"layer": "fc", "channel": "top"})["input"]
    assert_matches(got.maps, want, 0, 0)


def test_gradcam_is_relu_of_gradient_weighted_channels_upsampled(model):
    x = rand(2, 9, 9, 3, seed=3)
    got = explain(model, x, {"method": "gradcam", "layer": "fc", "channel": 0})
    assert got.at == "conv2"  # the last conv before the target
    act = model.run(x, outputs=["conv2"])["conv2"]
    g = model.gradients(x, {"layer": "fc", "channel": 0}, ["conv2"])["conv2"]
    cam = np.maximum((act * g.mean(axis=(1, 2))[:, None, None, :]).sum(axis=3), 0)
    assert got.maps.shape == (2, 9, 9)
    assert_matches(got.maps, upsample(cam, 9, 9), 1e-4, 1e-5)
    assert (got.maps >= 0).all()


def test_upsample_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    maps = rand(2, 3, 5, seed=4)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(maps)[:, None], size=(7, 12), mode="bilinear", align_corners=False
    )[:, 0].numpy()
    assert_matches(upsample(maps, 7, 12), want, 1e-5, 1e-6)


def test_constant_map_gives_a_finite_overlay(model):
    img = np.full((1, 9, 9, 3), 7, np.uint8)
    got = explain(model, img, {"method": "gradcam", "layer": "conv1", "channel": 0})
    assert got.overlays.shape == (1, 9, 9, 3)


@pytest.mark.parametrize(
    "request_,fragment",
    [
        ({"method": "lime", "layer": "fc"}, "method"),
        ({"method": "saliency", "layer": "nope"}, "unknown"),
        ({"method": "saliency", "layer": "fc", "channel": 5}, "out of range"),
        ({"method": "saliency", "layer": "fc", "channel": "best"}, "integer"),
        ({"method": "gradcam", "layer": "fc", "at": "relu1"}, "conv layer"),
        ({"method": "gradcam", "layer": "conv1", "at": "conv2"}, "conv layer"),
        ({"method": "saliency", "layer": "fc", "at": "conv1"}, "gradcam"),
        ({"method": "saliency", "extra": 1}, "unknown keys"),
        ("saliency", "explain must be"),
    ],
)
def test_bad_requests(model, request_, fragment):
    with pytest.raises(ModelError, match=fragment):
        check_request(model, request_)
