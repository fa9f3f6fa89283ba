"""The demo model's filters detect what their labels say; its pictures are what they claim."""

from __future__ import annotations

import io

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from engine import Model
from service.demo import demo_images, demo_model, filter_labels
from service.demo.images import colour_blobs, grating, stripes_quadrants

SPEC, ARRAYS = demo_model()
LABELS = filter_labels()


def conv1(rgb: np.ndarray) -> np.ndarray:
    """Run preprocess + conv1 + ReLU in numpy alone: (227, 227, 3) uint8 -> (55, 55, 96)."""
    p = SPEC["preprocess"]
    x = (rgb.astype(np.float64) * p["scale"] - np.array(p["mean"])) / np.array(p["std"])
    windows = sliding_window_view(x, (11, 11), axis=(0, 1))[::4, ::4]  # (55, 55, 3, 11, 11)
    out = np.einsum("yxcij,kijc->yxk", windows, ARRAYS["conv1.w"]) + ARRAYS["conv1.b"]
    return np.maximum(out, 0.0)


def grey(img: np.ndarray) -> np.ndarray:
    return np.repeat((img * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def indices(*words: str) -> list[int]:
    return [i for i, label in enumerate(LABELS) if all(w in label for w in words)]


def test_shapes_follow_the_seed_alexnet_conv1():
    assert ARRAYS["conv1.w"].shape == (96, 11, 11, 3) and ARRAYS["conv1.w"].dtype == np.float32
    assert ARRAYS["conv1.b"].shape == (96,)
    conv = SPEC["layers"][0]
    assert (conv["filters"], conv["size"], conv["stride"], conv["pad"]) == (96, 11, 4, 0)
    assert SPEC["input"] == {"height": 227, "width": 227, "channels": 3}
    assert [layer["type"] for layer in SPEC["layers"]] == ["conv", "relu", "maxpool"]
    assert conv1(stripes_quadrants()).shape == (55, 55, 96)  # (227 - 11) / 4 + 1


def test_built_deterministically_with_unit_norm_filters():
    spec2, arrays2 = demo_model()
    assert spec2 == SPEC
    np.testing.assert_array_equal(arrays2["conv1.w"], ARRAYS["conv1.w"])
    norms = np.linalg.norm(ARRAYS["conv1.w"].reshape(96, -1), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert len(LABELS) == 96 and len(set(LABELS)) == 96


def test_edge_filters_ignore_flat_regions():
    edges = indices("edge")
    flat = np.full((227, 227, 3), 77, np.uint8)
    p = SPEC["preprocess"]
    x = (flat.astype(np.float64) * p["scale"] - np.array(p["mean"])) / np.array(p["std"])
    patch = x[:11, :11]
    responses = np.einsum("ijc,kijc->k", patch, ARRAYS["conv1.w"][edges])
    assert len(edges) == 72
    np.testing.assert_allclose(responses, 0.0, atol=1e-4)


@pytest.mark.parametrize(
    ("stripes", "wins", "loses"), [(90, " 90deg", " 0deg"), (0, " 0deg", " 90deg")]
)
def test_stripes_excite_filters_of_their_orientation(stripes, wins, loses):
    out = conv1(grey(grating(stripes, 8))).mean(axis=(0, 1))
    win = out[indices("luminance edge", wins)].sum()
    lose = out[indices("luminance edge", loses)].sum()
    assert win > 10 * lose
    assert wins in LABELS[int(out.argmax())]


def test_each_stripes_quadrant_excites_its_own_orientation():
    out = conv1(stripes_quadrants())
    quadrants = {0: out[:25, :25], 45: out[:25, 30:], 90: out[30:, :25], 135: out[30:, 30:]}
    for angle, q in quadrants.items():
        score = {
            ori: q[..., indices("luminance edge", f" {ori}deg")].mean()
            for ori in (0, 30, 60, 90, 120, 150)
        }
        best = max(score, key=score.get)
        assert abs((best - angle + 90) % 180 - 90) <= 15, (angle, score)


def test_colour_blob_filters_prefer_their_hue():
    red = np.full((227, 227, 3), 128, np.uint8)
    red[100:130, 100:130] = (220, 30, 30)
    green = red.copy()
    green[100:130, 100:130] = (30, 200, 30)
    r_idx, g_idx = indices("colour blob hue 0deg")[0], indices("colour blob hue 120deg")[0]
    out_red, out_green = conv1(red).max(axis=(0, 1)), conv1(green).max(axis=(0, 1))
    assert out_red[r_idx] > 3 * out_red[g_idx]
    assert out_green[g_idx] > 3 * out_green[r_idx]


def test_colour_blobs_picture_lights_the_matching_hue_filter_where_the_blob_is():
    out = conv1(colour_blobs())
    for hue, (cx, cy) in {0: (30, 40), 120: (30, 114), 240: (30, 188)}.items():
        k = indices(f"colour blob hue {hue}deg")[0]
        y, x = np.unravel_index(out[..., k].argmax(), out.shape[:2])
        assert abs(x * 4 + 5 - cx) <= 20 and abs(y * 4 + 5 - cy) <= 20, (hue, x, y)


def test_sample_pictures_are_distinct_227_pngs():
    pictures = demo_images()
    assert [name for name, _ in pictures] == [
        "scene.png",
        "stripes.png",
        "colour-blobs.png",
        "rings.png",
    ]
    decoded = [np.asarray(Image.open(io.BytesIO(data))) for _, data in pictures]
    assert all(d.shape == (227, 227, 3) and d.dtype == np.uint8 for d in decoded)
    assert all(d.std() > 20 for d in decoded)  # not blank
    assert demo_images() == pictures  # byte-for-byte reproducible


def test_the_engine_accepts_the_demo_with_the_seeds_numbers():
    model = Model.from_arrays(SPEC, ARRAYS)
    assert model.output_shapes(227, 227) == {
        "conv1": (55, 55, 96),
        "relu1": (55, 55, 96),
        "pool1": (27, 27, 96),
    }
    conv = model.summary()[0]
    assert conv["params"] == 34_944  # 96 * 11 * 11 * 3 weights + 96 biases
