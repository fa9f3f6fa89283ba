"""Hypothesis fuzzing of every decoder client bytes reach: success or an ApiError, never else."""

from __future__ import annotations

import io
import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.body import _decode, parse_json
from service.codec import decode_infer, parse_header_length
from service.errors import ApiError
from service.images import decode_image

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _npy() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.zeros((4, 5, 3), np.float32))
    return buf.getvalue()


SEEDS = [_png(), _npy()]


def _survives(call) -> None:
    try:
        call()
    except ApiError as e:
        assert 400 <= e.status < 500 and e.message


@FUZZ
@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(-5, 400).map(str)))
def test_infer_decoder_on_random_bytes(body, header):
    def call():
        decode_infer(body, parse_header_length(header, len(body)))

    _survives(call)


@FUZZ
@given(json_values)
def test_infer_decoder_on_random_json(value):
    _survives(lambda: decode_infer(json.dumps(value).encode(), None))


tensor = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["input", "x"]),
        "datatype": st.sampled_from(["UINT8", "FP32", "INT8"]),
        "shape": st.lists(st.integers(-1, 4), min_size=2, max_size=5),
    },
    optional={
        "data": st.lists(json_values, max_size=40),
        "parameters": st.fixed_dictionaries({"binary_data_size": st.integers(-1, 400)}),
    },
)


@FUZZ
@given(tensor, st.binary(max_size=200), st.booleans())
def test_infer_decoder_on_near_valid_requests(t, blob, binary):
    head = json.dumps({"inputs": [t], "outputs": [{"name": "a"}]}).encode()
    body = head + blob if binary else head
    _survives(lambda: decode_infer(body, len(head) if binary else None))


@FUZZ
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
    st.integers(0, 400),
)
def test_image_decoder_on_mutated_files(seed, flips, cut):
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[: max(cut, 1)] if cut < len(data) else data)
    _survives(lambda: decode_image(data, "f", channels=3, max_pixels=10_000))


@FUZZ
@given(st.binary(max_size=200))
def test_image_decoder_on_random_bytes(data):
    _survives(lambda: decode_image(data, "f", channels=3, max_pixels=10_000))


@FUZZ
@given(st.binary(max_size=200), st.sampled_from(["gzip", "deflate", "br", "identity"]))
def test_content_decoding_on_random_bytes(data, encoding):
    _survives(lambda: _decode(data, encoding, 1000))


@FUZZ
@given(st.text(max_size=200))
def test_json_parser_on_random_text(text):
    _survives(lambda: parse_json(text))
