"""Hypothesis against the whole app (Flask test client over fakeredis): specs, images, headers
and query strings. Whatever is sent, the answer is never a 5xx and every error is JSON
{"error": "..."}. CONVQ_FUZZ_EXAMPLES sets the examples per test (small by default for CI).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.apikit import SPEC, Api, arrays, images, load_body, npz_bytes, v2_json

EXAMPLES = int(os.environ.get("CONVQ_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

LIMITS = {
    "MAX_CONTENT_LENGTH": 256 * 1024,
    "MAX_MODEL_BYTES": 1024 * 1024,
    "MAX_IMAGES": 4,
    "MAX_PIXELS": 512 * 512,
    "MAX_RUN_BYTES": 512 << 20,
}


@pytest.fixture(scope="module")
def api():
    api = Api(**LIMITS)
    assert api.load().status_code == 200
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(2), ["conv1", "fc"]))
    assert rv.status_code == 202
    api.burst()
    api.job = rv.json["id"]
    return api


def check(rv) -> None:
    """No 5xx; an error answer is a JSON object with a non-empty error string."""
    assert rv.status_code < 500, (rv.status_code, rv.data[:300])
    if rv.status_code >= 400:
        assert rv.is_json, rv.data[:300]
        doc = json.loads(rv.data)
        assert isinstance(doc.get("error"), str) and doc["error"], doc


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=24,
)
SPEC_KEYS = ["size", "stride", "pad", "dilation", "filters", "type", "name", "fit", "count_pad"]
dims = st.one_of(
    st.integers(-3, 70000), st.lists(st.integers(-2, 70000), min_size=0, max_size=5), json_values
)


@st.composite
def specs(draw) -> dict:
    spec = json.loads(json.dumps(SPEC))
    if draw(st.booleans()):
        spec["input"] = draw(
            st.fixed_dictionaries({"channels": st.integers(0, 5)})
            | st.fixed_dictionaries(
                {
                    "height": st.integers(0, 5000),
                    "width": st.integers(0, 5000),
                    "channels": st.just(3),
                }
            )
            | json_values
        )
    if draw(st.booleans()):
        spec["fit"] = draw(st.sampled_from(["strict", "floor", "round"]) | json_values)
    for _ in range(draw(st.integers(0, 3))):
        layer = draw(st.integers(0, len(spec["layers"]) - 1))
        key = draw(st.sampled_from(SPEC_KEYS))
        spec["layers"][layer][key] = draw(
            dims | st.text(max_size=6).map(lambda s: "conv1" + s) | st.just("conv1\n")
        )
    return spec


@FUZZ
@given(specs())
def test_random_specs_load_or_are_refused(api, spec):
    body = load_body(spec=SPEC)
    body["parameters"]["config"] = json.dumps(spec)
    check(api.client.post("/v2/repository/models/fz/load", json=body))


def _png_header(width: int, height: int, tail: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + tail


def _npy(shape, descr: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
    )
    return buf.getvalue() + payload


image_files = st.one_of(
    st.binary(max_size=200),
    st.builds(
        _png_header, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1), st.binary(max_size=64)
    ),
    st.builds(
        _npy,
        st.lists(st.integers(0, 2**62), min_size=0, max_size=4),
        st.sampled_from(["|u1", "<f4", "<f8", ">f4", "|O"]),
        st.binary(max_size=300),
    ),
    st.just(npz_bytes(arrays())),
)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(["a.png", "b.npy", "c.jpg", "d", "e.npz"]), image_files),
        min_size=0,
        max_size=5,
    ),
    st.lists(st.text(max_size=12), max_size=3),
)
def test_random_image_uploads_are_queued_or_refused(api, files, outputs):
    data = {"images": [(io.BytesIO(blob), name) for name, blob in files]}
    if outputs:
        data["outputs"] = outputs
    rv = api.client.post("/v2/models/tiny/jobs", data=data, content_type="multipart/form-data")
    check(rv)


header_names = st.sampled_from(
    [
        "Inference-Header-Content-Length",
        "Content-Encoding",
        "Content-Type",
        "Authorization",
        "Content-Length",
        "Transfer-Encoding",
        "Accept",
    ]
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=16
) | st.sampled_from(["1_0", "+5", " 5", "0", "-1", "gzip", "chunked", "application/json"])


@FUZZ
@given(st.dictionaries(header_names, header_values, max_size=4), st.binary(max_size=300))
def test_random_headers_and_bodies_are_answered(api, headers, body):
    for path in ("/v2/models/tiny/jobs", "/v2/repository/models/tiny/load"):
        check(api.client.post(path, data=body, headers=headers))


query_keys = st.sampled_from(["format", "output", "image", "x", "format ", "output[]"])
query_values = st.text(max_size=8) | st.sampled_from(
    ["json", "npy", "png", "binary", "conv1", "fc", "conv1,fc", "²", "1_0", "99999999999", "0"]
)


@FUZZ
@given(st.lists(st.tuples(query_keys, query_values), max_size=4))
def test_random_result_queries_are_answered(api, pairs):
    rv = api.client.get(f"/v2/jobs/{api.job}/result", query_string=pairs)
    check(rv)
    if rv.status_code == 200 and rv.mimetype == "application/json":
        json.loads(rv.data)  # valid JSON (no bare Infinity/NaN)


@FUZZ
@given(json_values, st.sampled_from(["/v2/models/tiny/jobs", "/v2/repository/models/tiny/load"]))
def test_random_json_documents_are_answered(api, doc, path):
    check(api.client.post(path, json=doc))
