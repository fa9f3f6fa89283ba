"""What-would-fit hints in closed form: the same sizes a search finds, at a cost bounded by the
layer count whatever the strides and the input size."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import sizing
from engine.errors import ShapeError
from engine.geometry import nearby_stride, out_size
from engine.spec import parse_spec


def _spec(windows: list[tuple[int, int, int, int]], fit: str) -> object:
    """An open-size spec of pools, one per (size, stride, pad, dilation) along both axes."""
    layers = [
        {"name": f"p{i}", "type": "maxpool", "size": f, "stride": s, "pad": p, "dilation": d}
        for i, (f, s, p, d) in enumerate(windows)
    ]
    return parse_spec({"name": "m", "input": {"channels": 1}, "fit": fit, "layers": layers})


def _searched(spec, n: int, reach: int) -> list[int]:
    """The plain search the closed form replaces: the nearest fitting sizes below and above n."""
    below = next((m for m in range(n - 1, 0, -1) if sizing.axis_fits(spec, m, "height")), None)
    above = next((m for m in range(n + 1, n + reach) if sizing.axis_fits(spec, m, "height")), None)
    return [m for m in (below, above) if m is not None]


WINDOW = st.tuples(
    st.integers(1, 4), st.integers(1, 4), st.integers(0, 2), st.integers(1, 2)
).filter(lambda w: 2 * w[2] < w[0] or w[2] == 0)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(WINDOW, min_size=1, max_size=4),
    st.integers(1, 120),
    st.sampled_from(["strict", "floor"]),
)
def test_fitting_inputs_match_a_plain_search(windows, n, fit):
    spec = _spec(windows, fit)
    period = 1
    for _, s, _, _ in windows:
        period *= s
    got = sizing.fitting_inputs(spec, n, "height")
    assert got == _searched(spec, n, reach=4 * period + 200)
    for m in got:
        assert sizing.axis_fits(spec, m, "height")


def test_huge_strides_cost_one_pass_per_layer(monkeypatch):
    # Four layers of stride 65536: the old search called axis_fits thousands of times per axis.
    spec = _spec([(1, 65536, 0, 1)] * 4, "strict")
    calls = []
    real = sizing.out_size
    monkeypatch.setattr(sizing, "out_size", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ShapeError) as err:
        spec.shapes(3000, 65537)
    assert len(calls) <= 4 * 4 + 8  # the failing walk plus axis_fits once per axis
    # The network fits 1 + 65536**4 * (m - 1): around 3000 that is 1 and 65536**4 + 1.
    assert f"fits input height 1 or {65536**4 + 1}" in err.value.message


def test_the_nearest_fitting_sizes_for_a_deep_stride_chain():
    spec = _spec([(3, 2, 1, 1), (2, 2, 0, 1), (3, 3, 0, 1)], "strict")
    # inputs that fit: 12*m - 1 (m >= 1): 11, 23, 35, ...
    assert sizing.fitting_inputs(spec, 30, "height") == [23, 35]
    assert sizing.fitting_inputs(spec, 5, "height") == [11]


def _alarm(seconds: int):
    def fail(*_):
        raise TimeoutError("the hint search did not finish")

    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


def test_strict_misfit_with_an_enormous_stride_answers_at_once():
    # The stride hint looked at every stride up to s + 2: with s = 10**12 that never ends.
    _alarm(10)
    try:
        with pytest.raises(ShapeError, match="stride 1,|fit=") as err:
            out_size(10**12 + 7, 3, 10**12, 0, 0, 1, "strict", layer="c")
    finally:
        signal.alarm(0)
    assert "is not an integer" in err.value.message


@pytest.mark.parametrize(
    ("span", "s", "expected"),
    [
        (12, 5, 6),
        (12, 4, 6),
        (7, 2, 1),
        (0, 3, 5),
        (9, 1, 3),
        (5, 1, None),
        (100, 101, 100),
        (100, 200, 1),
    ],
)
def test_nearby_stride_is_the_largest_divisor_up_to_s_plus_2(span, s, expected):
    assert nearby_stride(span, s) == expected


def _padding_only_reference(n: int, out: int, f: int, s: int, lo: int, d: int) -> int | None:
    """The first output index whose window holds only padding, one window at a time."""
    for o in range(out):
        taps = [o * s - lo + d * j for j in range(f)]
        if not any(0 <= t < n for t in taps):
            return o
    return None


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 6),
    st.integers(1, 4),
    st.integers(0, 8),
    st.integers(0, 8),
    st.integers(1, 4),
)
def test_pool_window_check_matches_a_window_by_window_reference(n, f, s, lo, hi, d):
    spec = parse_spec(
        {
            "name": "m",
            "input": {"channels": 1},
            "fit": "floor",
            "layers": [
                {"name": "p", "type": "maxpool", "size": f, "stride": s, "pad": [lo, 0, hi, 0]},
            ],
        }
    )
    extent = d * (f - 1) + 1
    if n + lo + hi < extent:
        return
    out = (n + lo + hi - extent) // s + 1
    layer = spec.layers[0]
    layer = type(layer)(
        **{**layer.__dict__, "window": type(layer.window)(f, 1, s, 1, d, 1, lo, 0, hi, 0)}
    )
    expected = _padding_only_reference(n, out, f, s, lo, d)
    if expected is None:
        sizing.check_pool_windows(layer, n, 1, out, 1)
    else:
        with pytest.raises(ShapeError, match=f"index {expected} of {out} pools only padding"):
            sizing.check_pool_windows(layer, n, 1, out, 1)


def test_pool_checks_of_wide_padded_windows_cost_no_step_per_window():
    # 256 pools of size 32768 and pad 32767 on 4096 pixels: ~2 * 32767 edge windows per axis and
    # layer, each a Python step before (seconds); now one numpy pass per axis and layer.
    layers = [
        {"name": f"p{i}", "type": "maxpool", "size": 32768, "pad": 32767, "stride": 1}
        for i in range(256)
    ]
    _alarm(10)
    try:
        spec = parse_spec(
            {
                "name": "m",
                "input": {"height": 4096, "width": 4096, "channels": 1},
                "fit": "floor",
                "layers": layers,
            }
        )
    finally:
        signal.alarm(0)
    assert spec.shapes(4096, 4096)[-1] == (4096 + 256 * 32767, 4096 + 256 * 32767, 1)


def test_specs_that_are_not_one_chain_get_a_bounded_search(monkeypatch):
    spec = _spec([(3, 2, 1, 1), (2, 2, 0, 1), (3, 3, 0, 1)], "strict")
    monkeypatch.setattr(sizing, "_is_chain", lambda s: False)
    calls = []
    real = sizing.axis_fits
    monkeypatch.setattr(sizing, "axis_fits", lambda *a: calls.append(1) or real(*a))
    assert sizing.fitting_inputs(spec, 30, "height") == [23, 35]
    calls.clear()
    sizing.fitting_inputs(spec, 10**9, "height")  # nothing fits within reach: bounded anyway
    assert len(calls) <= 2 * sizing.SEARCH_REACH
