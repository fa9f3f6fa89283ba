"""A stock Open Inference Protocol client (tritonclient.http) against a live server."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.integration.apikit import SPEC, Live, arrays, images, npz_bytes, reference_model


@pytest.fixture(scope="module")
def server():
    live = Live(workers=1)
    yield live
    live.close()


@pytest.fixture(scope="module")
def client(server):
    client = httpclient.InferenceServerClient(server.url, network_timeout=30)
    client.load_model(
        "tiny", config=json.dumps(SPEC), files={"file:weights.npz": npz_bytes(arrays())}
    )
    yield client
    client.close()


def test_live_ready_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "convq" and "binary_tensor_data" in meta["extensions"]
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert not client.is_model_ready("nope")
    model = client.get_model_metadata("tiny")
    assert model["inputs"][0]["shape"] == [-1, 9, 9, 3]
    assert [o["name"] for o in model["outputs"]] == ["conv1", "relu1", "pool1", "fc"]
    index = client.get_model_repository_index()
    assert {"name": "tiny", "version": "1", "state": "READY", "reason": ""} in index


def _input(imgs: np.ndarray, binary: bool):
    datatype = "UINT8" if imgs.dtype == np.uint8 else "FP32"
    tensor = httpclient.InferInput("input", list(imgs.shape), datatype)
    tensor.set_data_from_numpy(imgs, binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("layer", ["conv1", "relu1", "pool1", "fc"])
def test_infer_any_layer_binary_and_json(client, binary, layer):
    imgs = images(2, seed=11)
    result = client.infer(
        "tiny",
        [_input(imgs, binary)],
        outputs=[httpclient.InferRequestedOutput(layer, binary_data=binary)],
    )
    expect = reference_model().run(imgs, outputs=[layer])[layer]
    np.testing.assert_array_equal(result.as_numpy(layer), expect)


def test_infer_fp32_with_default_outputs(client):
    imgs = np.random.default_rng(4).standard_normal((1, 9, 9, 3)).astype(np.float32)
    result = client.infer("tiny", [_input(imgs, True)])
    np.testing.assert_array_equal(result.as_numpy("fc"), reference_model().run(imgs)["fc"])


@pytest.mark.parametrize("binary", [True, False])
def test_lean_results_read_by_the_stock_client(client, binary):
    # request parameters carry scalars only: the lean mapping goes as JSON text
    imgs = images(2, seed=12)
    lean = {
        "conv1": {"dtype": "float16"},
        "relu1": {"dtype": "uint8", "channels": "1:3"},
        "pool1": {"stats": True},
        "fc": {"png": True},
    }
    names = ["conv1", "relu1", "pool1", "fc"]
    result = client.infer(
        "tiny",
        [_input(imgs, binary)],
        outputs=[httpclient.InferRequestedOutput(n, binary_data=binary) for n in names],
        parameters={"lean": json.dumps(lean)},
    )
    expect = reference_model().run(imgs, outputs=names)
    conv1 = result.as_numpy("conv1")
    assert conv1.dtype == np.float16
    np.testing.assert_allclose(conv1.astype(np.float32), expect["conv1"], rtol=2.0**-11, atol=1e-7)
    q, out = result.as_numpy("relu1"), result.get_output("relu1")
    assert q.dtype == np.uint8 and out["datatype"] == "UINT8"
    scale = result.as_numpy(out["parameters"]["scale"]).astype(np.float64)[:, None, None, :]
    offset = result.as_numpy(out["parameters"]["offset"])[:, None, None, :]
    assert np.all(np.abs(scale * q + offset - expect["relu1"][..., 1:3]) <= scale / 2 * (1 + 1e-9))
    stats = result.as_numpy("pool1")
    np.testing.assert_array_equal(stats[..., 1], expect["pool1"].max(axis=(1, 2)))
    pictures = result.as_numpy("fc")  # BYTES: one PNG per image, binary whatever was asked
    assert pictures.shape == (2,) and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pictures)


def test_client_errors_carry_the_message(client):
    with pytest.raises(InferenceServerException, match="conv9"):
        client.infer(
            "tiny", [_input(images(1), True)], outputs=[httpclient.InferRequestedOutput("conv9")]
        )
    with pytest.raises(InferenceServerException, match="not found"):
        client.get_model_metadata("nope")


def test_compressed_requests_and_responses(client):
    imgs = images(1, seed=3)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("tiny", [_input(imgs, True)], request_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("fc"), reference_model().run(imgs)["fc"])


def test_load_replace_and_unload(client):
    client.load_model("second", config=json.dumps(SPEC), files={"file:w.npz": npz_bytes(arrays(5))})
    imgs = images(1)
    result = client.infer("second", [_input(imgs, True)])
    np.testing.assert_array_equal(result.as_numpy("fc"), reference_model(5).run(imgs)["fc"])
    client.unload_model("second")
    assert not client.is_model_ready("second")
