"""Lean results (worker.contract.lean): options checked, then applied against the float32 maps."""

from __future__ import annotations

import io

import fakeredis
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from worker.contract import lean
from worker.contract.pictures import grid
from worker.contract.store import Store, bytes_tensor, from_bytes_tensor

SHAPE = (6, 7, 8)  # H, W, K of the map the options are checked against


def maps(n: int = 3, h: int = 6, w: int = 7, k: int = 8, seed: int = 0) -> np.ndarray:
    """Post-ReLU-like float32 maps: about half zeros, the rest spread over a few decades."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, k)).astype(np.float32) * np.float32(3.0)
    return np.maximum(x, 0) * np.float32(10.0) ** rng.integers(-2, 3, k).astype(np.float32)


# -- checking -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "field", "words"),
    [
        ({"channels": [0, 8]}, "channels", "channel 8 is unknown"),
        ({"channels": [-1]}, "channels", "channel -1 is unknown"),
        ({"channels": [1, 1]}, "channels", "twice"),
        ({"channels": []}, "channels", "non-empty"),
        ({"channels": [1.0]}, "channels", "not a channel index"),
        ({"channels": "3:9"}, "channels", "not within"),
        ({"channels": "5:5"}, "channels", "not within"),
        ({"channels": "a:b"}, "channels", "start:stop"),
        ({"channels": "4"}, "channels", "start:stop"),
        ({"crop": [0, 0, 7, 1]}, "crop", "outside the 6x7 map"),
        ({"crop": [5, 6, 2, 1]}, "crop", "outside"),
        ({"crop": [0, 0, 0, 1]}, "crop", "outside"),
        ({"crop": [0, 0, 1]}, "crop", "[top, left, height, width]"),
        ({"crop": [-1, 0, 1, 1]}, "crop", "non-negative"),
        ({"dtype": "int8"}, "dtype", "float32, float16, uint8"),
        ({"dtype": "FP16"}, "dtype", "not one of"),
        ({"stats": "yes"}, "stats", "true or false"),
        ({"png": 1}, "png", "true or false"),
        ({"stats": True, "png": True}, "png", "exclude"),
        ({"stats": True, "dtype": "uint8"}, "dtype", "maps only"),
        ({"png": True, "dtype": "float16"}, "dtype", "maps only"),
        ({"scale": 2}, "scale", "unknown option"),
    ],
)
def test_bad_options_name_the_output_and_field(raw, field, words):
    with pytest.raises(lean.LeanError) as err:
        lean.check("conv1", raw, SHAPE)
    assert err.value.output == "conv1" and err.value.field == field
    assert words in str(err.value) and "'conv1'" in str(err.value)


def test_check_normalises_and_drops_defaults():
    assert lean.check("c", {"dtype": "float32", "stats": False, "png": False}, SHAPE) == {}
    assert lean.check("c", {"channels": ":3", "crop": [1, 2, 3, 4]}, SHAPE) == {
        "channels": "0:3",
        "crop": [1, 2, 3, 4],
    }
    assert lean.check("c", {"channels": "5:"}, SHAPE) == {"channels": "5:8"}
    assert lean.check("c", {"channels": [7, 0], "dtype": "uint8"}, SHAPE) == {
        "channels": [7, 0],
        "dtype": "uint8",
    }


def test_check_all_applies_star_with_own_options_overriding():
    shapes = {"a": SHAPE, "b": (2, 2, 3)}
    got = lean.check_all(
        {"*": {"dtype": "float16"}, "b": {"dtype": "uint8"}}, ["a", "b", "explain:map"], shapes
    )
    assert got == {"a": {"dtype": "float16"}, "b": {"dtype": "uint8"}}  # "*" skips explain
    assert lean.check_all({"a": {"dtype": "float32"}}, ["a"], shapes) == {}
    # an output's own options replace "*", so they need not agree with it
    got = lean.check_all({"*": {"dtype": "uint8"}, "b": {"stats": True}}, ["a", "b"], shapes)
    assert got == {"a": {"dtype": "uint8"}, "b": {"stats": True}}
    with pytest.raises(lean.LeanError, match="not a requested output"):
        lean.check_all({"b": {"stats": True}}, ["a"], shapes)
    with pytest.raises(lean.LeanError, match="layer outputs only"):
        lean.check_all({"explain:map": {"stats": True}}, ["a", "explain:map"], shapes)
    with pytest.raises(lean.LeanError, match="channel 3 is unknown") as err:
        lean.check_all({"*": {"channels": [3]}}, ["a", "b"], shapes)
    assert err.value.output == "b"
    # uint8's scale array would overwrite a requested output of that name
    with pytest.raises(lean.LeanError, match="a requested output too"):
        lean.check_all({"a": {"dtype": "uint8"}}, ["a", "a:scale"], {**shapes, "a:scale": SHAPE})


# -- applying, against the float32 result ---------------------------------------------------------
def test_channels_and_crop_are_exact_slices():
    x = maps()
    opts = lean.check("c", {"channels": [5, 1, 2], "crop": [1, 2, 3, 4]}, SHAPE)
    got = lean.lean_results({"c": x, "d": x}, {"c": opts})
    np.testing.assert_array_equal(got["c"], x[:, 1:4, 2:6, :][..., [5, 1, 2]])
    assert got["d"] is x  # an output without options is stored as it is
    ranged = lean.lean_results({"c": x}, {"c": lean.check("c", {"channels": "2:5"}, SHAPE)})
    np.testing.assert_array_equal(ranged["c"], x[..., 2:5])
    assert ranged["c"].dtype == np.float32 and ranged["c"].flags.c_contiguous


def test_float16_is_within_its_precision():
    x = maps()
    got = lean.lean_results({"c": x}, {"c": {"dtype": "float16"}})["c"]
    assert got.dtype == np.float16 and got.shape == x.shape
    # float16 keeps 11 significant bits: relative error <= 2**-11 (values here stay normal)
    np.testing.assert_allclose(got.astype(np.float32), x, rtol=2.0**-11, atol=2.0**-24)


@pytest.mark.parametrize("seed", range(3))
def test_uint8_dequantises_within_half_a_step(seed):
    x = maps(seed=seed)
    x[1, ..., 3] = 2.5  # a constant map: scale 0, every q 0, offset the value
    got = lean.lean_results({"c": x}, {"c": {"dtype": "uint8", "channels": "1:6"}})
    assert list(got) == ["c", "c:scale", "c:offset"]
    q, scale, offset = got["c"], got["c:scale"], got["c:offset"]
    assert q.dtype == np.uint8 and q.shape == (3, 6, 7, 5)
    assert scale.dtype == offset.dtype == np.float32 and scale.shape == (3, 5)
    want = x[..., 1:6].astype(np.float64)
    back = scale[:, None, None, :].astype(np.float64) * q + offset[:, None, None, :]
    step = scale[:, None, None, :].astype(np.float64)
    assert np.all(np.abs(back - want) <= step / 2 * (1 + 1e-9))
    assert scale[1, 2] == 0 and offset[1, 2] == 2.5 and np.all(q[1, ..., 2] == 0)
    assert q.max() == 255 and q.min() == 0  # the range is used whole


def test_uint8_of_non_finite_values_stays_finite():
    x = maps(n=1)
    x[0, 0, 0, 0], x[0, 0, 1, 0] = np.inf, np.nan
    q, scale, offset = lean.quantize(x)
    assert np.isfinite(scale).all() and np.isfinite(offset).all() and q.dtype == np.uint8


def test_stats_match_numpy_on_the_float32_maps():
    x = maps(n=2)
    got = lean.lean_results({"c": x}, {"c": {"stats": True, "channels": "0:8"}})["c"]
    assert got.shape == (2, 8, 5) and got.dtype == np.float32
    assert lean.STATS == ("min", "max", "mean", "std", "zeros")
    np.testing.assert_array_equal(got[..., 0], x.min(axis=(1, 2)))
    np.testing.assert_array_equal(got[..., 1], x.max(axis=(1, 2)))
    np.testing.assert_allclose(got[..., 2], x.astype(np.float64).mean(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(got[..., 3], x.astype(np.float64).std(axis=(1, 2)), rtol=1e-6)
    zeros = (x == 0).sum(axis=(1, 2)) / (6 * 7)
    np.testing.assert_allclose(got[..., 4], zeros, rtol=1e-7)
    assert 0.2 < got[..., 4].mean() < 0.8  # the maps do have zeros to count


def test_png_is_one_grid_per_image():
    x = maps(n=2)
    opts = {"png": True, "channels": [0, 3], "crop": [0, 0, 4, 5]}
    got = lean.lean_results({"c": x}, {"c": opts})["c"]
    assert got.dtype == object and got.shape == (2,)
    for i in range(2):
        picture = np.asarray(Image.open(io.BytesIO(got[i])))
        np.testing.assert_array_equal(picture, grid(x[i, :4, :5][..., [0, 3]]))


@given(
    n=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    k=st.integers(1, 12),
    kind=st.sampled_from(["float32", "float16", "uint8", "stats", "png"]),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_stored_bytes_is_what_is_stored(n, h, w, k, kind, seed):
    # png is bounded above (incompressible noise is its worst case); the rest exact
    x = np.random.default_rng(seed).random((n, h, w, k), dtype=np.float32)
    opts = {"dtype": kind} if kind in lean.DTYPES else {kind: True}
    opts = lean.check("c", opts, (h, w, k))
    stored = lean.lean_results({"c": x}, {"c": opts})
    actual = sum(len(bytes_tensor(a)) if a.dtype == object else a.nbytes for a in stored.values())
    predicted = lean.stored_bytes(n, (h, w, k), opts)
    if kind == "png":
        assert actual <= predicted
    else:
        assert actual == predicted


# -- the store keeps byte strings as V2 BYTES ------------------------------------------------------
def test_bytes_tensor_round_trip_keeps_trailing_zero_bytes():
    items = np.empty(3, dtype=object)
    items[:] = [b"\x89PNG\x00\x00", b"", b"abc"]
    raw = bytes_tensor(items)
    assert raw[:4] == (6).to_bytes(4, "little") and len(raw) == 3 * 4 + 6 + 3
    back = from_bytes_tensor(raw, (3,))
    assert back.dtype == object and list(back) == list(items)


@pytest.mark.parametrize("blob_dir", [False, True])
def test_store_keeps_lean_results(tmp_path, blob_dir):
    store = Store(fakeredis.FakeRedis(), blob_dir=str(tmp_path) if blob_dir else None)
    x = maps(n=2)
    opts = {"q": {"dtype": "uint8"}, "h": {"dtype": "float16"}, "p": {"png": True}}
    stored = lean.lean_results({"q": x, "h": x, "p": x}, opts)
    store.put_result("j", stored)
    assert store.result_names("j") == ["q", "q:scale", "q:offset", "h", "p"]
    for name, array in stored.items():
        shape, dtype = store.result_layout("j", name)
        assert (shape, dtype) == (array.shape, array.dtype)
        back = store.result_array("j", name)
        assert back.dtype == array.dtype and list(back.ravel()) == list(array.ravel())
        size = store.result_nbytes("j", name)
        assert size == sum(len(p) for p in store.result_slices("j", name))
    assert store.result_nbytes("j", "p") == len(bytes_tensor(stored["p"]))
