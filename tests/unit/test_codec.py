"""V2 request decoding and response encoding: JSON and binary tensors, and every malformed kind."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.codec import decode_infer, encode_infer, parse_header_length
from service.errors import BadRequest


def binary_request(images: np.ndarray, datatype: str, **extra) -> tuple[bytes, int]:
    raw = images.tobytes()
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": datatype,
                "shape": list(images.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        **extra,
    }
    head = json.dumps(header).encode()
    return head + raw, len(head)


def json_request(images: np.ndarray, datatype: str, **extra) -> bytes:
    doc = {
        "inputs": [
            {
                "name": "input",
                "datatype": datatype,
                "shape": list(images.shape),
                "data": images.ravel().tolist(),
            }
        ],
        **extra,
    }
    return json.dumps(doc).encode()


@pytest.mark.parametrize("datatype,dtype", [("UINT8", np.uint8), ("FP32", np.float32)])
def test_binary_and_json_give_the_same_images(datatype, dtype):
    rng = np.random.default_rng(0)
    images = (
        rng.integers(0, 256, (2, 5, 4, 3))
        if dtype == np.uint8
        else rng.standard_normal((2, 5, 4, 3))
    ).astype(dtype)
    body, n = binary_request(images, datatype)
    from_binary = decode_infer(body, parse_header_length(str(n), len(body)))
    from_json = decode_infer(json_request(images, datatype), None)
    for got in (from_binary.images, from_json.images):
        assert got.dtype == dtype and got.shape == images.shape
        np.testing.assert_array_equal(got, images)


def test_nested_json_data_is_accepted():
    images = np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3)
    doc = {
        "inputs": [
            {"name": "input", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": images.tolist()}
        ]
    }
    np.testing.assert_array_equal(decode_infer(json.dumps(doc).encode(), None).images, images)


def test_outputs_and_binary_flags_are_read():
    images = np.zeros((1, 2, 2), np.uint8)
    body = json_request(
        images,
        "UINT8",
        id="r1",
        outputs=[{"name": "conv1", "parameters": {"binary_data": False}}, {"name": "pool1"}],
        parameters={"binary_data_output": True},
    )
    req = decode_infer(body, None)
    assert req.outputs == ["conv1", "pool1"]
    assert req.binary == {"conv1": False}
    assert req.binary_default is True and req.id == "r1"


def _expect_400(body: bytes, header_length=None, match: str = ""):
    with pytest.raises(BadRequest, match=match):
        decode_infer(body, header_length)


BAD_JSON = [
    (b"", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [NaN]}]}',
        "not valid JSON",
    ),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply|not valid JSON|JSON object"),
    (b'{"inputs": []}', "one tensor"),
    (
        b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1,1,1], "data": [1]}]}',
        "named 'input'",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "INT64", "shape": [1,1,1], "data": [1]}]}',
        "datatype",
    ),
    (b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1], "data": [1]}]}', "shape"),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,-1], "data": [1]}]}',
        "shape",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,2], "data": [1]}]}',
        "has 1 values",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [256]}]}',
        "0..255",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [1.5]}]}',
        "0..255",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1,1,1], "data": [1e300]}]}',
        "finite",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1,1,1], "data": [1'
        + b"0" * 400
        + b"]}]}",
        "float range",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1,1,2], "data": ["1", 2]}]}',
        "numbers only",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1,1,2], "data": [true, 2]}]}',
        "numbers only",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1,1,2], "data": [[1], 2]}]}',
        "numbers only|regular",
    ),
    (b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1]}]}', "needs data"),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [1]}],'
        b' "extra": 1}',
        "unknown field",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [1],'
        b' "bogus": 1}]}',
        "unknown field",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [1]}],'
        b' "outputs": [{"name": "a"}, {"name": "a"}]}',
        "twice",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [1]}],'
        b' "outputs": [{"name": "a", "parameters": {"classification": 0}}]}',
        "classification must be a positive integer",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [1]}],'
        b' "outputs": "a"}',
        "outputs must be a list",
    ),
    (
        b'{"inputs": [{"name": "input", "datatype": "UINT8", "shape": [1,1,1], "data": [1]}],'
        b' "parameters": {"binary_data_output": "yes"}}',
        "true or false",
    ),
]


@pytest.mark.parametrize("body,match", BAD_JSON)
def test_malformed_json_requests_are_400(body, match):
    _expect_400(body, match=match)


def test_binary_size_must_match_shape_and_body():
    images = np.zeros((1, 4, 4, 3), np.uint8)
    body, n = binary_request(images, "UINT8")
    _expect_400(body[:-1], n, "binary tensor data")  # body short by one byte
    _expect_400(body + b"\0", n, "binary tensor data")  # one byte too many
    doc = json.loads(body[:n])
    doc["inputs"][0]["parameters"]["binary_data_size"] = 47  # header disagrees with shape
    head = json.dumps(doc).encode()
    _expect_400(head + images.tobytes(), len(head), "binary_data_size")
    _expect_400(
        json_request(images, "UINT8") + b"xx",
        len(json_request(images, "UINT8")),
        "no input declares",
    )


@pytest.mark.parametrize("value", ["abc", "0", "-3", "99999"])
def test_header_length_outside_the_body_is_400(value):
    with pytest.raises(BadRequest, match="Inference-Header-Content-Length"):
        parse_header_length(value, 100)


def test_encode_mixes_binary_and_json_outputs():
    a = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3)
    b = np.full((1, 1, 1, 2), 2.5, np.float32)
    chunks, headers = encode_infer(
        "m",
        3,
        [("a", a.shape, memoryview(a.tobytes())), ("b", b.shape, memoryview(b.tobytes()))],
        binary={"a"},
        request_id="x",
    )
    body = b"".join(bytes(c) for c in chunks)
    n = int(headers["Inference-Header-Content-Length"])
    assert int(headers["Content-Length"]) == len(body)
    doc = json.loads(body[:n])
    assert doc["model_name"] == "m" and doc["model_version"] == "3" and doc["id"] == "x"
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == a.nbytes
    np.testing.assert_array_equal(np.frombuffer(body[n:], np.float32).reshape(a.shape), a)
    assert doc["outputs"][1]["data"] == [2.5, 2.5]


def test_encode_all_json_has_no_header_length():
    a = np.ones((1, 1, 1, 1), np.float32)
    _, headers = encode_infer("m", 1, [("a", a.shape, memoryview(a.tobytes()))], binary=set())
    assert "Inference-Header-Content-Length" not in headers
    assert headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("datatype", [["UINT8"], {"t": 1}, 8, None, "FP16"])
def test_a_datatype_that_is_not_one_of_the_names_is_a_bad_request(datatype):
    body = json_request(np.zeros((1, 2, 2, 3), np.uint8), datatype)
    with pytest.raises(BadRequest, match="datatype must be one of UINT8, FP32"):
        decode_infer(body, None)
