"""Model: load paths, checks on weights and images, and run() against the plain-loop reference."""

from __future__ import annotations

import io

import numpy as np
import pytest

from engine import InputError, Model, ModelError, ShapeError, WeightsError
from engine.reference import (
    avg_pool2d_reference,
    conv2d_reference,
    local2d_reference,
    max_pool2d_reference,
    relu_reference,
)
from engine.weights import to_safetensors

SPEC = {
    "name": "net",
    "input": {"height": 9, "width": 9, "channels": 3},
    "preprocess": {"scale": 0.01, "mean": [0.1, 0.2, 0.3], "std": [0.5, 1.0, 2.0]},
    "layers": [
        {"name": "conv1", "type": "conv", "filters": 4, "size": [3, 2], "pad": [1, 0, 1, 1]},
        {"name": "relu1", "type": "relu"},
        {"name": "pool1", "type": "maxpool", "size": 3, "stride": 2, "pad": 1},
        {"name": "conv2", "type": "conv", "filters": 5, "size": 3, "pad": 2, "dilation": 2},
        {"name": "relu2", "type": "relu"},
        {"name": "avg", "type": "avgpool", "size": 2, "stride": 1, "pad": [0, 0, 1, 1]},
        {"name": "fc", "type": "local", "filters": 2, "size": 3, "stride": 2, "bias": None},
    ],
}


def make_arrays(seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    f32 = np.float32
    return {
        "conv1.w": rng.standard_normal((4, 3, 2, 3)).astype(f32),
        "conv1.b": rng.standard_normal(4).astype(f32),
        "conv2.w": rng.standard_normal((5, 3, 3, 4)).astype(f32),
        "conv2.b": rng.standard_normal(5).astype(f32),
        "fc.w": rng.standard_normal((2, 2, 2, 3, 3, 5)).astype(f32),
    }


def reference_run(a, x) -> dict[str, np.ndarray]:
    """SPEC run by hand through the plain-loop layers."""
    out = {"conv1": conv2d_reference(x, a["conv1.w"], a["conv1.b"], 1, (1, 0, 1, 1))}
    out["relu1"] = relu_reference(out["conv1"])
    out["pool1"] = max_pool2d_reference(out["relu1"], 3, 2, 1)
    out["conv2"] = conv2d_reference(out["pool1"], a["conv2.w"], a["conv2.b"], 1, 2, 2)
    out["relu2"] = relu_reference(out["conv2"])
    out["avg"] = avg_pool2d_reference(out["relu2"], 2, 1, (0, 0, 1, 1))
    out["fc"] = local2d_reference(out["avg"], a["fc.w"], None, 2)
    return out


@pytest.fixture(scope="module")
def model():
    return Model.from_arrays(SPEC, make_arrays())


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).standard_normal((2, 9, 9, 3)).astype(np.float32)


def assert_close(got, want):
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_metadata(model):
    assert model.name == "net"
    assert model.layer_names == ["conv1", "relu1", "pool1", "conv2", "relu2", "avg", "fc"]
    assert model.input_shape == (9, 9, 3)
    assert model.output_shapes(9, 9)["fc"] == (2, 2, 2)
    assert model.output_shapes(9, 9)["pool1"] == (5, 5, 4)
    assert model.output_bytes(3, 9, 9, ["fc", "pool1"]) == 3 * 4 * (2 * 2 * 2 + 5 * 5 * 4)


def test_run_all_matches_the_reference(model, images):
    want = reference_run(make_arrays(), images)
    got = model.run(images, "all")
    assert list(got) == model.layer_names
    for name in want:
        assert_close(got[name], want[name])


def test_fused_relu_gives_the_same_maps(model, images):
    want = reference_run(make_arrays(), images)
    got = model.run(images, ["relu2", "relu1"])
    assert list(got) == ["relu2", "relu1"]
    assert_close(got["relu1"], want["relu1"])
    assert_close(got["relu2"], want["relu2"])
    both = model.run(images, ["conv1", "relu1"])
    assert (both["conv1"] < 0).any() and not (both["relu1"] < 0).any()
    assert_close(both["conv1"], want["conv1"])


def test_default_output_is_the_last_layer(model, images):
    (name,) = model.run(images)
    assert name == "fc"


def test_on_layer_sees_each_layer_and_stops_at_the_last_wanted(model, images):
    calls = []
    model.run(images, ["pool1"], on_layer=lambda i, n, name: calls.append((i, n, name)))
    assert calls == [(0, 3, "conv1"), (1, 3, "relu1"), (2, 3, "pool1")]

    class Stop(Exception):
        pass

    def abort(i, n, name):
        if name == "conv2":
            raise Stop

    with pytest.raises(Stop):
        model.run(images, "all", on_layer=abort)


def test_uint8_images_are_preprocessed(model):
    pixels = np.random.default_rng(2).integers(0, 256, (1, 9, 9, 3), dtype=np.uint8)
    mean, std = np.array([0.1, 0.2, 0.3]), np.array([0.5, 1.0, 2.0])
    by_hand = ((pixels * 0.01 - mean) / std).astype(np.float32)
    assert_close(model.run(pixels, "conv1")["conv1"], model.run(by_hand, "conv1")["conv1"])


def test_prepare_is_bit_identical_to_the_numpy_formula(model):
    # every pixel value in every channel, from a strided (not contiguous) view
    index = np.arange(4 * 81)[:, None] + np.array([0, 85, 170])  # (pixel, channel)
    base = np.zeros((4, 9, 18, 3), np.uint8)
    base[:, :, ::2] = (index % 256).astype(np.uint8).reshape(4, 9, 9, 3)
    pixels = base[:, :, ::2]
    assert all(len(np.unique(pixels[..., ch])) == 256 for ch in range(3))
    by_numpy = pixels.astype(np.float32)
    by_numpy *= np.float32(0.01)
    by_numpy -= np.array([0.1, 0.2, 0.3], np.float32)
    by_numpy /= np.array([0.5, 1.0, 2.0], np.float32)
    got = model.prepare(pixels)
    assert got.dtype == np.float32 and got.shape == (4, 9, 9, 3)
    assert np.array_equal(got, by_numpy)
    assert got.flags.c_contiguous


def test_prepare_scalar_preprocess_broadcasts_over_channels():
    spec = {
        "input": {"channels": 2},
        "preprocess": {"scale": 0.5, "mean": 3.0, "std": 0.25},
        "layers": [{"name": "r", "type": "relu"}],
    }
    m = Model.from_arrays(spec, {})
    pixels = np.array([[[[0, 255], [7, 8]]]], np.uint8)
    expected = (pixels.astype(np.float32) * np.float32(0.5) - np.float32(3.0)) / np.float32(0.25)
    assert np.array_equal(m.prepare(pixels), expected)


def grey_model(channels=1, size=None):
    spec = {"layers": [{"name": "c", "type": "conv", "filters": 1, "size": 3}]}
    spec["input"] = {"channels": channels} | (size or {})
    w = np.ones((1, 3, 3, channels), np.float32)
    return Model.from_arrays(spec, {"c.w": w, "c.b": np.zeros(1, np.float32)})


def test_grey_images_and_sizes_checked_at_run_time():
    m = grey_model()
    assert m.input_shape == (None, None, 1)
    out = m.run(np.ones((2, 5, 7), np.uint8))["c"]
    assert out.shape == (2, 3, 5, 1) and np.all(out == 9)
    with pytest.raises(InputError, match=r"do not fit: c: height \(4 - 3 \+ 2\*0\)") as err:
        Model.from_arrays(
            {
                "fit": "strict",
                "input": {"channels": 1},
                "layers": [{"name": "c", "type": "conv", "filters": 1, "size": 3, "stride": 2}],
            },
            {"c.w": np.ones((1, 3, 3, 1), np.float32), "c.b": np.zeros(1, np.float32)},
        ).run(np.ones((1, 4, 5), np.uint8))
    assert err.value.layer == "c"
    with pytest.raises(InputError, match="larger than the padded input"):
        m.run(np.ones((1, 2, 9), np.float32))


def test_grey_into_a_colour_model_is_refused(model):
    with pytest.raises(InputError, match="1 channels; the model takes 3"):
        model.run(np.zeros((1, 9, 9), np.uint8))


@pytest.mark.parametrize(
    ("images", "fragment"),
    [
        (np.zeros((1, 9, 9, 3), np.float64), "float64"),
        (np.zeros((1, 9, 9, 3), np.int32), "int32"),
        (np.zeros((9, 9), np.uint8), "(N, H, W, C)"),
        (np.zeros((0, 9, 9, 3), np.uint8), "non-empty"),
        (np.zeros((1, 8, 8, 3), np.uint8), "8x8; the model takes 9x9"),
        (np.full((1, 9, 9, 3), np.nan, np.float32), "NaN"),
        ([[1, 2]], "numpy array"),
    ],
)
def test_bad_images(model, images, fragment):
    with pytest.raises(InputError) as err:
        model.run(images)
    assert fragment in err.value.message


def test_resolve_outputs(model):
    assert model.resolve_outputs(None) == ["fc"]
    assert model.resolve_outputs("all") == model.layer_names
    assert model.resolve_outputs("pool1") == ["pool1"]
    assert model.resolve_outputs(["avg", "conv1", "avg"]) == ["avg", "conv1"]
    for bad in (["nope"], [], 3, [None]):
        with pytest.raises(ModelError) as err:
            model.resolve_outputs(bad)
        assert err.value.field == "outputs"


def _without(key):
    a = make_arrays()
    del a[key]
    return a


def _with(key, value):
    return make_arrays() | {key: value}


@pytest.mark.parametrize(
    ("arrays", "layer", "field", "fragment"),
    [
        (_without("conv2.w"), "conv2", "weights", "'conv2.w' is missing"),
        (_with("extra", np.zeros(1, np.float32)), None, "weights", "no layer uses: extra"),
        (
            _with("conv1.w", np.zeros((4, 3, 3, 3), np.float32)),
            "conv1",
            "weights",
            "should be (4, 3, 2, 3) (OHWI), got (4, 3, 3, 3)",
        ),
        (
            _with("conv2.w", np.zeros((5, 3, 3, 3), np.float32)),
            "conv2",
            "weights",
            "should be (5, 3, 3, 4)",
        ),
        (_with("conv1.b", np.zeros(5, np.float32)), "conv1", "bias", "should be (4), got (5)"),
        (
            _with("fc.w", np.zeros((3, 2, 2, 3, 3, 5), np.float32)),
            "fc",
            "weights",
            "should be (2, 2, 2, 3, 3, 5)",
        ),
        (_with("conv1.w", np.zeros((4, 3, 2, 3), np.int32)), "conv1", "weights", "must be float"),
        (
            _with("conv1.b", np.array([0, np.inf, 0, 0], np.float32)),
            "conv1",
            "bias",
            "1 values that are NaN, inf",
        ),
        (_with("conv1.b", [0.0, 1.0, 2.0, 3.0]), "conv1", "bias", "must be an array"),
    ],
)
def test_bad_weights_name_layer_and_field(arrays, layer, field, fragment):
    with pytest.raises(WeightsError) as err:
        Model.from_arrays(SPEC, arrays)
    assert (err.value.layer, err.value.field) == (layer, field)
    assert fragment in err.value.message


def test_float64_beyond_float32_range_is_refused():
    with pytest.raises(WeightsError, match="beyond float32's range") as err:
        Model.from_arrays(SPEC, _with("conv1.b", np.array([0, 1e300, 0, 0])))
    assert (err.value.layer, err.value.field) == ("conv1", "bias")


def test_float64_and_float16_weights_are_held_as_float32(images):
    a = {k: v.astype(np.float64) for k, v in make_arrays().items()}
    a["conv1.b"] = a["conv1.b"].astype(np.float16)
    m = Model.from_arrays(SPEC, a)
    assert all(v.dtype == np.float32 for v in m.arrays().values())


def test_oihw_layout_is_converted_once(model, images):
    a = make_arrays()
    oihw = dict(a)
    oihw["conv1.w"] = a["conv1.w"].transpose(0, 3, 1, 2)
    oihw["conv2.w"] = a["conv2.w"].transpose(0, 3, 1, 2)
    oihw["fc.w"] = a["fc.w"].transpose(0, 1, 2, 5, 3, 4)
    m = Model.from_arrays(SPEC | {"layout": "OIHW"}, oihw)
    assert m.spec["layout"] == "OHWI"
    assert_close(m.run(images)["fc"], model.run(images)["fc"])
    with pytest.raises(WeightsError, match=r"should be \(4, 3, 3, 2\) \(OIHW\)"):
        Model.from_arrays(SPEC | {"layout": "OIHW"}, a)


def test_spec_and_safetensors_round_trip(images):
    m = Model.from_arrays(
        SPEC | {"layout": "OIHW"},
        {
            k: (
                v.transpose(0, 3, 1, 2)
                if k in ("conv1.w", "conv2.w")
                else v.transpose(0, 1, 2, 5, 3, 4)
                if k == "fc.w"
                else v
            )
            for k, v in make_arrays().items()
        },
    )
    again = Model.from_bytes(m.spec, m.to_safetensors(), "weights.safetensors")
    assert again.spec == m.spec
    np.testing.assert_array_equal(again.run(images)["fc"], m.run(images)["fc"])


def test_load_from_files(tmp_path, model, images):
    import json

    (tmp_path / "spec.json").write_text(json.dumps(SPEC))
    np.savez(tmp_path / "w.npz", **make_arrays())
    (tmp_path / "w.safetensors").write_bytes(to_safetensors(make_arrays()))
    for weights in ("w.npz", "w.safetensors"):
        m = Model.load(tmp_path / "spec.json", tmp_path / weights)
        np.testing.assert_array_equal(m.run(images)["fc"], model.run(images)["fc"])
    with pytest.raises(ModelError, match="cannot read spec"):
        Model.load(tmp_path / "missing.json", tmp_path / "w.npz")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ModelError, match="not valid JSON"):
        Model.load(tmp_path / "bad.json", tmp_path / "w.npz")


def test_from_bytes_takes_json_text_and_npz_bytes(model, images):
    import json

    buf = io.BytesIO()
    np.savez_compressed(buf, **make_arrays())
    m = Model.from_bytes(json.dumps(SPEC).encode(), buf.getvalue(), filename="w.npz")
    np.testing.assert_array_equal(m.run(images)["fc"], model.run(images)["fc"])
    with pytest.raises(ModelError, match="JSON text or an object"):
        Model.from_bytes(42, buf.getvalue())


def test_local_layer_without_input_size_checks_at_run_time():
    spec = {
        "input": {"channels": 1},
        "layers": [{"name": "l", "type": "local", "filters": 1, "size": 2, "stride": 2}],
    }
    m = Model.from_arrays(
        spec,
        {"l.w": np.ones((3, 3, 1, 2, 2, 1), np.float32), "l.b": np.zeros((3, 3, 1), np.float32)},
    )
    assert m.run(np.ones((1, 6, 6), np.float32))["l"].shape == (1, 3, 3, 1)
    assert m.summary(6, 6)[0]["params"] == 9 * 4 + 9
    with pytest.raises(ShapeError, match="local weights are for a 3x3 output"):
        m.output_shapes(8, 8)
    with pytest.raises(WeightsError, match=r"bias shape should be \(3, 3, 1\)"):
        Model.from_arrays(
            spec,
            {
                "l.w": np.ones((3, 3, 1, 2, 2, 1), np.float32),
                "l.b": np.zeros((2, 3, 1), np.float32),
            },
        )


def test_packed_filters_made_by_one_run_serve_the_next_bit_identically():
    # One conv per engine path: Winograd (3x3, C >= 32), 1x1, implicit GEMM (wide, unpadded)
    # and tiled im2col (stride 2); the second run reuses the filters the first one packed.
    rng = np.random.default_rng(7)
    layers = [
        ("wino", 3, 1, 1, 32),
        ("point", 1, 0, 1, 24),
        ("implicit", 3, 0, 1, 16),
        ("strided", 3, 1, 2, 8),
    ]
    spec = {
        "name": "paths",
        "input": {"height": 21, "width": 21, "channels": 32},
        "layers": [
            {"name": n, "type": "conv", "filters": k, "size": f, "pad": p, "stride": s}
            for n, f, p, s, k in layers
        ],
    }
    arrays, c = {}, 32
    for n, f, _, _, k in layers:
        arrays[f"{n}.w"] = rng.standard_normal((k, f, f, c)).astype(np.float32) * 0.2
        arrays[f"{n}.b"] = rng.standard_normal(k).astype(np.float32)
        c = k
    model = Model.from_arrays(spec, arrays)
    assert model.packed_bytes == 0
    for seed in (1, 2):
        x = np.random.default_rng(seed).standard_normal((2, 21, 21, 32)).astype(np.float32)
        got = model.run(x, outputs="all")
        fresh = Model.from_arrays(spec, arrays).run(x, outputs="all")  # packs anew
        for name in got:
            np.testing.assert_array_equal(got[name], fresh[name])
        assert model.packed_bytes > 0
        expect = x
        for n, _f, p, s, _ in layers:
            expect = conv2d_reference(expect, arrays[f"{n}.w"], arrays[f"{n}.b"], s, p)
            np.testing.assert_allclose(got[n], expect, rtol=1e-4, atol=1e-3)
