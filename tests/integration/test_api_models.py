"""Server and model routes over fakeredis: health, metadata, the repository extension, uploads."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from safetensors.numpy import save

from tests.integration.apikit import SPEC, Api, arrays, load_body, npz_bytes, reference_model


@pytest.fixture
def api():
    return Api()


def test_liveness_and_server_metadata(api):
    assert api.client.get("/v2/health/live").status_code == 200
    meta = api.client.get("/v2").json
    assert meta["name"] == "convq"
    assert {"binary_tensor_data", "model_repository", "jobs"} <= set(meta["extensions"])


def test_readiness_needs_a_worker(api):
    rv = api.client.get("/v2/health/ready")
    assert rv.status_code == 503 and "worker" in rv.json["error"]
    assert rv.headers["Retry-After"]


def test_load_json_then_metadata_lists_every_layer(api):
    rv = api.load()
    assert rv.status_code == 200 and rv.json["version"] == "1"
    meta = api.client.get("/v2/models/tiny").json
    assert meta["name"] == "tiny" and meta["versions"] == ["1"] and meta["platform"] == "convq"
    assert meta["inputs"] == [
        {
            "name": "input",
            "datatype": "UINT8",
            "shape": [-1, 9, 9, 3],
            "parameters": {"datatypes": ["UINT8", "FP32"]},
        }
    ]
    shapes = {o["name"]: o["shape"] for o in meta["outputs"]}
    assert shapes == {
        "conv1": [-1, 5, 5, 4],
        "relu1": [-1, 5, 5, 4],
        "pool1": [-1, 4, 4, 4],
        "fc": [-1, 1, 1, 5],
    }
    rows = {r["name"]: r for r in meta["summary"]}
    assert rows["conv1"]["params"] == 4 * 27 + 4 and rows["fc"]["params"] == 5 * 64 + 5
    assert api.client.get("/v2/models/tiny/versions/1").json["outputs"] == meta["outputs"]
    assert api.client.get("/v2/models/tiny/ready").status_code == 200
    assert api.client.get("/v2/models/tiny/versions/1/ready").status_code == 200


def test_stored_weights_are_the_uploaded_ones(api):
    api.load(seed=3)
    info = api.app.extensions["convq"].store.model_info("tiny")
    weights = api.app.extensions["convq"].store.model_weights("tiny", info["version"])
    from engine import Model

    stored = Model.from_bytes(info["spec"], weights, filename="w.safetensors")
    for name, array in reference_model(3).arrays().items():
        np.testing.assert_array_equal(stored.arrays()[name], array)


def test_reload_bumps_the_version_and_old_versions_are_404(api):
    api.load()
    assert api.load(seed=2).json["version"] == "2"
    assert api.client.get("/v2/models/tiny").json["versions"] == ["2"]
    rv = api.client.get("/v2/models/tiny/versions/1")
    assert rv.status_code == 404 and "current version is 2" in rv.json["error"]


def test_safetensors_and_multipart_uploads(api):
    st = save(arrays())
    assert api.load(filename="w.safetensors", data=st).status_code == 200
    rv = api.client.post(
        "/v2/repository/models/multi/load",
        content_type="multipart/form-data",
        data={
            "spec": (io.BytesIO(json.dumps(SPEC).encode()), "spec.json"),
            "weights": (io.BytesIO(npz_bytes(arrays())), "w.npz"),
        },
    )
    assert rv.status_code == 200, rv.json
    assert api.client.get("/v2/models/multi").json["name"] == "multi"


def test_plain_load_of_a_stored_model_is_ok_and_unknown_is_404(api):
    api.load()
    assert api.client.post("/v2/repository/models/tiny/load", json={}).status_code == 200
    assert api.client.post("/v2/repository/models/nope/load").status_code == 404


def test_index_and_unload(api):
    api.load()
    api.load("other")
    names = sorted(m["name"] for m in api.client.post("/v2/repository/index").json)
    assert names == ["other", "tiny"]
    rv = api.client.post(
        "/v2/repository/models/tiny/unload", json={"parameters": {"unload_dependents": False}}
    )
    assert rv.status_code == 200
    assert api.client.get("/v2/models/tiny").status_code == 404
    assert api.client.get("/v2/models/tiny/ready").status_code == 404
    assert api.client.post("/v2/repository/models/tiny/unload").status_code == 404
    assert [m["name"] for m in api.client.post("/v2/repository/index", json={}).json] == ["other"]


def _spec(**changes) -> dict:
    spec = json.loads(json.dumps(SPEC))
    for key, value in changes.items():
        spec["layers"][0][key] = value
    return spec


BAD_UPLOADS = [
    # (body, status, words the error must contain)
    ({"parameters": {"config": "{not json", "file:w.npz": "AAAA"}}, 400, "JSON"),
    ({"parameters": {"config": json.dumps(SPEC)}}, 400, "exactly one"),
    (
        {"parameters": {"config": json.dumps(SPEC), "file:a.npz": "", "file:b.npz": ""}},
        400,
        "exactly one",
    ),
    ({"parameters": {"config": json.dumps(SPEC), "file:w.npz": "!!!"}}, 400, "base64"),
    ({"parameters": {"config": json.dumps(SPEC), "file:w.npz": 5}}, 400, "base64"),
    ({"parameters": {"config": json.dumps(SPEC), "file:w.bin": "AAAA"}}, 415, ".npz"),
    ({"parameters": {"config": "[1]", "file:w.npz": "AAAA"}}, 400, "spec"),
    ({"parameters": "x"}, 400, "object"),
    ({"parameters": {}, "extra": 1}, 400, "unknown"),
    (load_body(data=b"PK\x03\x04garbage"), 400, ""),
    (load_body(data=npz_bytes({"conv1.w": np.zeros((4, 3, 3, 3), np.float32)})), 400, ""),
    (load_body(_spec(type="bogus")), 400, "conv1"),
    (load_body(_spec(stride=0)), 400, "conv1"),
    (load_body(_spec(unknown_key=1)), 400, "conv1"),
    (load_body(_spec(stride=3)), 400, "conv1"),  # 9+2-3 = 8 not divisible by 3 (fit strict)
]


@pytest.mark.parametrize("body,status,words", BAD_UPLOADS)
def test_bad_uploads_are_4xx_json(api, body, status, words):
    rv = api.client.post("/v2/repository/models/tiny/load", json=body)
    assert rv.status_code == status, rv.json
    assert words in rv.json["error"] and rv.json["type"]
    assert api.client.get("/v2/models/tiny").status_code == 404


def test_engine_errors_name_layer_and_field(api):
    rv = api.client.post("/v2/repository/models/tiny/load", json=load_body(_spec(stride=0)))
    assert rv.json["layer"] == "conv1" and rv.json["field"] == "stride"


def test_non_finite_weights_are_refused(api):
    bad = arrays()
    bad["fc.w"][0, 0, 0, 0] = np.nan
    rv = api.client.post("/v2/repository/models/tiny/load", json=load_body(data=npz_bytes(bad)))
    assert rv.status_code == 400 and rv.json["layer"] == "fc"


def test_pickled_npz_weights_do_not_run(api, tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    np.savez(buf, **{"conv1.w": np.array([Evil()], dtype=object)})
    rv = api.client.post("/v2/repository/models/tiny/load", json=load_body(data=buf.getvalue()))
    assert rv.status_code == 400 and not marker.exists()


@pytest.mark.parametrize("name", ["bad name", "-x", "a" * 65, "x/y"])
def test_bad_model_names(api, name):
    rv = api.client.post(f"/v2/repository/models/{name}/load", json=load_body())
    assert rv.status_code in (400, 404) and "error" in rv.json


def test_upload_content_type_and_size_limits():
    api = Api(MAX_MODEL_BYTES=2000)
    rv = api.client.post("/v2/repository/models/tiny/load", data=b"x", content_type="text/plain")
    assert rv.status_code == 415
    rv = api.load()
    assert rv.status_code == 413 and "limit" in rv.json["error"]
    rv = api.client.post(
        "/v2/repository/models/tiny/load",
        content_type="multipart/form-data",
        data={
            "spec": (io.BytesIO(json.dumps(SPEC).encode()), "spec.json"),
            "weights": (io.BytesIO(npz_bytes(arrays())), "w.npz"),
        },
    )
    assert rv.status_code == 413


def test_multipart_upload_needs_weights(api):
    rv = api.client.post(
        "/v2/repository/models/tiny/load",
        content_type="multipart/form-data",
        data={"spec": json.dumps(SPEC)},
    )
    assert rv.status_code == 400 and rv.json["field"] == "weights"


def test_unknown_model_routes_are_404_json(api):
    for path in (
        "/v2/models/nope",
        "/v2/models/nope/ready",
        "/v2/models/nope/versions/1",
        "/v2/nothing-here",
    ):
        rv = api.client.get(path)
        assert rv.status_code == 404 and "error" in rv.json
    rv = api.client.put("/v2/models/nope")
    assert rv.status_code == 405 and "error" in rv.json


def test_weights_upload_base64_round_trip_matches_triton_client_encoding(api):
    # tritonclient sends base64.b64encode(bytes) through rapidjson: a plain base64 string.
    body = {
        "parameters": {
            "config": json.dumps(SPEC),
            "file:w.npz": base64.b64encode(npz_bytes(arrays())).decode(),
        }
    }
    assert api.client.post("/v2/repository/models/tiny/load", json=body).status_code == 200


def test_npz_zip_bomb_is_refused_before_inflating(api):
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays(), junk=np.zeros(32 << 20, np.uint8))  # 32 MB -> ~32 KB
    assert len(buf.getvalue()) < 200_000
    rv = api.client.post("/v2/repository/models/tiny/load", json=load_body(data=buf.getvalue()))
    assert rv.status_code == 400 and rv.json["field"] == "weights"


def _safetensors(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + payload


@pytest.mark.parametrize(
    "data",
    [
        (1 << 40).to_bytes(8, "little") + b"{}",  # huge header
        _safetensors(
            {"conv1.w": {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [0, 1 << 30]}},
            b"\0" * 64,
        ),  # past the end
        _safetensors(
            {
                "conv1.w": {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [0, 432]},
                "conv1.b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            },
            b"\0" * 432,
        ),  # overlapping
        _safetensors(
            {"conv1.w": {"dtype": "F32", "shape": [4, 3, 3, 3], "data_offsets": [8, 4]}},
            b"\0" * 432,
        ),  # reversed
        b"\x05\x00\x00",  # truncated
    ],
)
def test_crafted_safetensors_are_4xx(api, data):
    rv = api.client.post(
        "/v2/repository/models/tiny/load", json=load_body(filename="w.safetensors", data=data)
    )
    assert rv.status_code == 400, rv.json
    assert api.client.get("/v2/models/tiny").status_code == 404


def test_model_cache_is_byte_bounded_and_keeps_the_latest():
    api = Api(MODEL_CACHE_BYTES=1)
    api.load()
    api.load("other")
    cache = api.app.extensions["convq"].models
    assert api.client.get("/v2/models/tiny").status_code == 200
    assert api.client.get("/v2/models/other").status_code == 200
    assert cache.keys() == [("other", 1)]
    assert api.client.get("/v2/models/tiny").status_code == 200  # reloaded from Redis
    assert cache.keys() == [("tiny", 1)]
