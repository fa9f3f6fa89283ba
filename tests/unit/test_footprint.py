"""engine.footprint: the predicted peak working memory bounds what a run really allocates."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Model
from engine.footprint import SCRATCH_BYTES, peak_bytes
from engine.spec import parse_spec
from tests.integration.apikit import SPEC, arrays

OPEN = {**SPEC, "input": {"channels": 3}, "fit": "floor"}


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(9, 24),
    st.integers(9, 24),
    st.lists(st.sampled_from(["conv1", "relu1", "pool1", "fc"]), min_size=1, max_size=4),
)
def test_a_run_allocates_no_more_than_predicted(n, h, w, outputs):
    model = Model.from_arrays(OPEN, arrays())
    images = np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    model.run(images, outputs)  # compile, pack filters and grow the scratch buffers first
    tracemalloc.start()
    try:
        model.run(images, outputs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    predicted = model.peak_bytes(n, h, w, outputs)
    assert peak <= predicted - SCRATCH_BYTES + 64 * 1024  # arrays only; scratch is a reserve
    assert predicted >= model.output_bytes(n, h, w, outputs)


def test_a_huge_pad_counts_its_intermediate_layers():
    # One 1x1 pixel through two convs, the first of pad 500: the requested output is one value,
    # but the first layer's 1001x1001x64 output (and its padded input) are alive on the way.
    spec = parse_spec(
        {
            "name": "pad",
            "input": {"channels": 1},
            "layers": [
                {"name": "a", "type": "conv", "filters": 64, "size": 1, "pad": 500},
                {"name": "b", "type": "conv", "filters": 1, "size": 1001},
            ],
        }
    )
    first = 1001 * 1001 * 64 * 4
    padded_input = 1001 * 1001 * 1 * 4
    assert peak_bytes(spec, 1, 1, 1, ["b"]) >= first + padded_input
    assert peak_bytes(spec, 2, 1, 1, ["b"]) >= 2 * peak_bytes(spec, 1, 1, 1, ["b"]) - SCRATCH_BYTES


def test_requested_outputs_stay_counted_after_their_layer():
    spec = parse_spec({**OPEN, "input": {"channels": 3}})
    only_last = peak_bytes(spec, 4, 64, 64, ["fc"])
    with_first = peak_bytes(spec, 4, 64, 64, ["conv1", "fc"])
    conv1 = 4 * 32 * 32 * 4 * 4
    assert with_first >= only_last and with_first - only_last <= conv1
    with pytest.raises(Exception, match="larger than the padded input"):
        peak_bytes(spec, 1, 2, 2, ["fc"])


def test_a_branch_keeps_its_source_alive_until_its_last_reader(monkeypatch):
    # image -> a -> b, and c reads the image again (a graph branch): the image stays alive
    # through b, so b's step holds image + a + b.
    from types import SimpleNamespace

    from engine import footprint

    layers = [
        SimpleNamespace(name="a", window=None, inputs=["image"]),
        SimpleNamespace(name="b", window=None, inputs=["a"]),
        SimpleNamespace(name="c", window=None, inputs=["image"]),
    ]
    spec = SimpleNamespace(layers=layers, channels=1)
    monkeypatch.setattr(footprint, "layer_shapes", lambda s, h, w: [(h, w, 10)] * 3)
    unit = 4 * 8 * 8  # one channel of an 8x8 float32 map
    image, a, b = unit, 10 * unit, 10 * unit
    assert footprint.peak_bytes(spec, 1, 8, 8, ["c"]) == image + a + b
    # asking for a keeps it to the end: c's step holds image + a + c
    assert footprint.peak_bytes(spec, 1, 8, 8, ["a", "c"]) == image + a + b
    chain = SimpleNamespace(
        layers=[SimpleNamespace(**{**vars(x), "inputs": None}) for x in layers], channels=1
    )
    assert footprint.peak_bytes(chain, 1, 8, 8, ["c"]) == a + b  # the image is freed after a


def test_a_concat_whose_branches_write_into_it_stays_within_the_prediction():
    # The concat's output is allocated by its first conv branch, a, while the image and the
    # pool branch's p are still alive: the prediction counts it from there, not from cat.
    from tests.unit.test_graph import _conv_arrays

    spec = {
        "input": {"height": 48, "width": 48, "channels": 32},
        "layers": [
            {"name": "a", "type": "conv", "filters": 8, "size": 3, "input": "image"},
            {"name": "p", "type": "maxpool", "size": 3, "stride": 1, "input": "image"},
            {"name": "pc", "type": "conv", "filters": 8, "size": 1},
            {"name": "cat", "type": "concat", "inputs": ["a", "pc"]},
        ],
    }
    model = Model.from_arrays(spec, _conv_arrays(spec, 1))
    x = np.random.default_rng(0).standard_normal((4, 48, 48, 32)).astype(np.float32)
    model.run(x)
    tracemalloc.start()
    try:
        model.run(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    predicted = model.peak_bytes(4, 48, 48)
    assert peak <= predicted - SCRATCH_BYTES + 64 * 1024
    # while p is made: the float32 image, cat (16 channels), a (8, counted apart, an upper
    # bound: it is cat's first slice) and p (32)
    image, per_channel = 4 * 48 * 48 * 32 * 4, 4 * 4 * 46 * 46
    assert predicted - SCRATCH_BYTES == image + per_channel * (16 + 8 + 32)
