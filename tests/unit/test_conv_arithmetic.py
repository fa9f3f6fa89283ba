"""The conv-layer arithmetic convq was specified with (AlexNet conv1 and others), as tests."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Model, ShapeError
from engine.geometry import Window, out_size
from engine.spec import parse_spec
from engine.summary import im2col_shape, summarize


@pytest.mark.parametrize(
    ("w", "f", "s", "p", "expected"),
    [(7, 3, 1, 0, 5), (7, 3, 2, 0, 3), (5, 3, 1, 1, 5), (5, 3, 2, 1, 3), (227, 11, 4, 0, 55)],
)
def test_output_size_formula(w, f, s, p, expected):
    assert out_size(w, f, s, p, p, 1, "strict") == expected


def test_w5_f3_p1_stride3_is_invalid():
    with pytest.raises(ShapeError, match=r"= 2\.33333 is not an integer"):
        out_size(5, 3, 3, 1, 1, 1, "strict")


def test_w10_f3_s2_p0_is_invalid_showing_4_5():
    with pytest.raises(ShapeError, match=r"\(10 - 3 \+ 2\*0\)/2 \+ 1 = 4\.5"):
        out_size(10, 3, 2, 0, 0, 1, "strict")


def _alexnet(size: int) -> dict:
    return {
        "name": "alexnet-conv1",
        "input": {"height": size, "width": size, "channels": 3},
        "layers": [{"name": "conv1", "type": "conv", "filters": 96, "size": 11, "stride": 4}],
    }


def test_alexnet_conv1_gives_55x55x96():
    spec = parse_spec(_alexnet(227))
    assert spec.shapes(227, 227) == [(55, 55, 96)]


def test_alexnet_on_224_is_invalid_and_suggests_227():
    with pytest.raises(ShapeError) as err:
        parse_spec(_alexnet(224))
    message = err.value.message
    assert "54.25" in message and "227" in message
    assert err.value.layer == "conv1"


def test_alexnet_im2col_is_363_by_3025():
    assert im2col_shape(227, 227, 3, Window.make(11, 4)) == (363, 3025)
    (row,) = summarize(parse_spec(_alexnet(227)))
    assert row["im2col"] == (363, 3025)


def test_alexnet_conv1_parameters_shared_and_local():
    (conv,) = summarize(parse_spec(_alexnet(227)))
    assert conv["params"] == 34_944
    local = _alexnet(227)
    local["layers"][0]["type"] = "local"
    (row,) = summarize(parse_spec(local), 227, 227)
    assert row["params"] == 105_705_600
    assert row["output_shape"] == (55, 55, 96)


def test_the_11x11x4_f5_s2_example_through_model_run():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((11, 11, 4)).astype(np.float32)
    w = rng.standard_normal((2, 5, 5, 4)).astype(np.float32)
    b = rng.standard_normal(2).astype(np.float32)
    spec = {
        "input": {"height": 11, "width": 11, "channels": 4},
        "layers": [{"name": "conv", "type": "conv", "filters": 2, "size": 5, "stride": 2}],
    }
    # The textbook indexes X[x, y, d]; ours is X[y, x, d], so its "along x" is our second axis.
    v = Model.from_arrays(spec, {"conv.w": w, "conv.b": b}).run(x[None])["conv"][0]
    assert v.shape == (4, 4, 2)
    w0, w1, b0, b1 = w[0], w[1], b[0], b[1]
    expect = {
        (0, 0, 0): np.sum(x[:5, :5, :] * w0) + b0,
        (1, 0, 0): np.sum(x[2:7, :5, :] * w0) + b0,
        (2, 0, 0): np.sum(x[4:9, :5, :] * w0) + b0,
        (3, 0, 0): np.sum(x[6:11, :5, :] * w0) + b0,
        (0, 0, 1): np.sum(x[:5, :5, :] * w1) + b1,
        (3, 0, 1): np.sum(x[6:11, :5, :] * w1) + b1,
        (0, 1, 1): np.sum(x[:5, 2:7, :] * w1) + b1,
        (2, 3, 1): np.sum(x[4:9, 6:11, :] * w1) + b1,
    }
    for index, value in expect.items():
        assert v[index] == pytest.approx(value, rel=1e-5, abs=1e-5), index
