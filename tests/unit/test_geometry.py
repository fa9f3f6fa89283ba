"""Window geometry: the hyperparameter forms, output sizes and the strict-fit messages."""

from __future__ import annotations

import pytest

from engine.errors import ModelError, ShapeError
from engine.geometry import Window, fitting_sizes, out_size, pads, pair


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, (3, 3)), ([2, 5], (2, 5)), ((1, 4), (1, 4))],
)
def test_pair_accepts_int_and_two_list(value, expected):
    assert pair(value) == expected


@pytest.mark.parametrize("value", [[1, 2, 3], 0, -1, 2.0, "3", True, [2, None]])
def test_pair_rejects_bad_forms(value):
    with pytest.raises(ModelError) as err:
        pair(value, layer="conv1", field="stride")
    assert err.value.layer == "conv1" and err.value.field == "stride"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, (0, 0, 0, 0)), (2, (2, 2, 2, 2)), ([1, 2], (1, 2, 1, 2)), ([1, 2, 3, 4], (1, 2, 3, 4))],
)
def test_pads_forms(value, expected):
    assert pads(value) == expected


@pytest.mark.parametrize("value", [-1, [1, -1], [0, 0, 0, -2], [1, 2, 3]])
def test_pads_reject_negative_or_odd_lengths(value):
    with pytest.raises(ModelError, match="pad"):
        pads(value, layer="p")


def test_window_out_hw_with_asymmetric_pads_and_dilation():
    win = Window.make([3, 2], [2, 1], [1, 0, 0, 1], [2, 1])
    # height: (10 + 1 + 0 - 2*(3-1) - 1)/2 + 1 = 4; width: (7 + 0 + 1 - 1*(2-1) - 1)/1 + 1 = 7
    assert win.out_hw(10, 7, "strict") == (4, 7)


def test_floor_floors_and_strict_explains():
    assert out_size(10, 3, 2, 0, 0, 1, "floor") == 4
    with pytest.raises(ShapeError, match=r"\(10 - 3 \+ 2\*0\)/2 \+ 1 = 4.5") as err:
        out_size(10, 3, 2, 0, 0, 1, "strict", layer="c")
    assert 'fit="floor"' in err.value.message and err.value.layer == "c"


def test_window_larger_than_padded_input():
    with pytest.raises(ShapeError, match="larger than the padded input"):
        out_size(4, 3, 1, 0, 0, 2, "floor")  # dilated extent 5 > 4


def test_fitting_sizes_brackets_the_input():
    assert fitting_sizes(224, 11, 4, 0, 0, 1) == (223, 227)


def test_unknown_fit_is_a_model_error():
    with pytest.raises(ModelError, match="fit"):
        out_size(7, 3, 1, 0, 0, 1, "round")
