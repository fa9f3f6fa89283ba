"""ONNX uploads through the repository extension: converted by engine.onnx_import, then served."""

from __future__ import annotations

import base64
import io

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.integration.apikit import Api, parse_v2, v2_binary


def onnx_model() -> bytes:
    """Conv 3->4 (3x3, pad 1) -> Relu -> MaxPool 2 on a 1x3x8x8 float input."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            ),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2]),
        ],
        "net",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture(scope="module")
def api():
    return Api()


def test_onnx_upload_json_then_infer_matches_onnxruntime(api):
    data = onnx_model()
    rv = api.client.post(
        "/v2/repository/models/net/load",
        json={"parameters": {"file:model.onnx": base64.b64encode(data).decode()}},
    )
    assert rv.status_code == 200, rv.json
    meta = api.client.get("/v2/models/net").json
    assert meta["inputs"][0]["shape"] == [-1, 8, 8, 3]
    assert meta["outputs"][-1]["shape"] == [-1, 4, 4, 4]
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 3)).astype(np.float32)
    body, headers = v2_binary(x)
    job_id = api.client.post("/v2/models/net/jobs", data=body, headers=headers).json["id"]
    api.burst()
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    got = parse_v2(rv.data, rv.headers["Inference-Header-Content-Length"])
    ((name, array),) = got.items()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    expect = session.run(None, {"x": x.transpose(0, 3, 1, 2)})[0].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(array, expect, rtol=1e-5, atol=1e-5)


def test_onnx_upload_multipart(api):
    rv = api.client.post(
        "/v2/repository/models/net2/load",
        content_type="multipart/form-data",
        data={"weights": (io.BytesIO(onnx_model()), "model.onnx")},
    )
    assert rv.status_code == 200, rv.json
    assert api.client.get("/v2/models/net2").json["name"] == "net2"


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
    st.integers(1, 2000),
)
def test_mutated_onnx_uploads_are_4xx_never_5xx(api, flips, cut):
    data = bytearray(onnx_model())
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[:cut])
    rv = api.client.post(
        "/v2/repository/models/fuzz/load",
        json={"parameters": {"file:m.onnx": base64.b64encode(data).decode()}},
    )
    assert rv.status_code in (200, 400, 413, 415), rv.json
    assert "error" in rv.json or rv.status_code == 200


def test_non_onnx_bytes_named_onnx_are_400(api):
    rv = api.client.post(
        "/v2/repository/models/x/load",
        json={"parameters": {"file:m.onnx": base64.b64encode(b"not onnx at all").decode()}},
    )
    assert rv.status_code == 400 and rv.json["field"] == "weights"
