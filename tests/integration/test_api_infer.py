"""POST .../infer: a queued job waited for (embedded workers); deadlines; Redis down.

Every test of a job runs twice: job data in Redis, and job data in files (CONVQ_BLOB_DIR).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from service.app import create_app
from tests.integration.apikit import Api, images, parse_v2, reference_model, v2_binary, v2_json


@pytest.fixture(scope="module")
def live(module_blob_dir):
    from worker.embedded import start_workers

    api = Api(blob_dir=module_blob_dir)
    assert api.load().status_code == 200
    handle = start_workers(api.redis, api.settings, n=1)
    yield api
    handle.stop()


def test_ready_with_a_worker(live):
    rv = live.client.get("/v2/health/ready")
    assert rv.status_code == 200 and rv.json["workers"] >= 1


def test_json_infer_answers_json_equal_to_model_run(live):
    imgs = images(2)
    rv = live.client.post("/v2/models/tiny/infer", json=v2_json(imgs, ["pool1", "conv1"]))
    assert rv.status_code == 200, rv.json
    assert "Inference-Header-Content-Length" not in rv.headers
    spans = dict(part.split(";dur=") for part in rv.headers["Server-Timing"].split(", "))
    assert list(spans) == ["read", "submit", "queue", "compute", "infer"]  # where the time went
    ms = {k: float(v) for k, v in spans.items()}
    assert all(v >= 0 for v in ms.values())
    assert ms["infer"] >= ms["read"] + ms["submit"] + ms["compute"]
    doc = rv.json
    assert doc["model_name"] == "tiny" and doc["model_version"] == "1"
    got = parse_v2(rv.data, None)
    expect = reference_model().run(imgs, outputs=["pool1", "conv1"])
    assert list(got) == ["pool1", "conv1"]
    for name in expect:
        np.testing.assert_array_equal(got[name], expect[name])


def test_binary_infer_answers_binary_and_frees_the_job(live):
    imgs = np.random.default_rng(2).standard_normal((3, 9, 9, 3)).astype(np.float32)
    body, headers = v2_binary(imgs, ["relu1"])
    before = set(live.redis.keys("convq:*"))
    files_before = set(live.blob_files())
    rv = live.client.post("/v2/models/tiny/versions/1/infer", data=body, headers=headers)
    assert rv.status_code == 200, rv.data[:200]
    got = parse_v2(rv.data, rv.headers["Inference-Header-Content-Length"])
    np.testing.assert_array_equal(got["relu1"], reference_model().run(imgs, "relu1")["relu1"])
    rv.close()  # the job is deleted once the answer has been sent
    left = set(live.redis.keys("convq:*")) - before
    assert left == set()  # no input, result, run claim or cancel mark stays behind
    assert set(live.blob_files()) == files_before


def test_binary_data_output_and_per_output_choices(live):
    imgs = images(1)
    body = v2_json(imgs, None, binary_data_output=True)
    body["outputs"] = [{"name": "fc", "parameters": {"binary_data": False}}, {"name": "conv1"}]
    rv = live.client.post("/v2/models/tiny/infer", json=body)
    doc_len = int(rv.headers["Inference-Header-Content-Length"])
    import json

    doc = json.loads(rv.data[:doc_len])
    assert "data" in doc["outputs"][0] and "binary_data_size" in doc["outputs"][1]["parameters"]
    got = parse_v2(rv.data, str(doc_len))
    expect = reference_model().run(imgs, outputs="all")
    np.testing.assert_array_equal(got["fc"], expect["fc"])
    np.testing.assert_array_equal(got["conv1"], expect["conv1"])


def test_request_id_is_echoed(live):
    body = v2_json(images(1))
    body["id"] = "req-7"
    assert live.client.post("/v2/models/tiny/infer", json=body).json["id"] == "req-7"


def test_infer_errors_are_4xx(live):
    assert live.client.post("/v2/models/nope/infer", json=v2_json(images(1))).status_code == 404
    assert (
        live.client.post("/v2/models/tiny/versions/7/infer", json=v2_json(images(1))).status_code
        == 404
    )
    rv = live.client.post("/v2/models/tiny/infer", json=v2_json(images(1, h=4, w=4)))
    assert rv.status_code == 400


def test_infer_past_its_deadline_is_504_and_the_job_is_dropped(blob_dir):
    api = Api(blob_dir=blob_dir, INFER_TIMEOUT=0.2)  # no worker at all
    api.load()
    started = time.monotonic()
    rv = api.client.post("/v2/models/tiny/infer", json=v2_json(images(1)))
    assert rv.status_code == 504 and "error" in rv.json
    assert time.monotonic() - started < 2
    assert api.queue_keys() == 0 and not api.redis.keys("convq:input*")
    assert api.blob_files() == {}


def test_redis_down_is_503_with_retry_after_within_two_seconds():
    app = create_app({"TESTING": True, "REDIS_URL": "redis://127.0.0.1:9/0", "SOCKET_TIMEOUT": 0.5})
    client = app.test_client()
    assert client.get("/v2/health/live").status_code == 200
    for method, path, kw in [
        ("get", "/v2/health/ready", {}),
        ("get", "/v2/models/tiny", {}),
        ("post", "/v2/models/tiny/jobs", {"json": v2_json(images(1))}),
        ("get", "/v2/jobs/" + "0" * 32, {}),
        ("post", "/v2/repository/index", {}),
    ]:
        started = time.monotonic()
        rv = getattr(client, method)(path, **kw)
        assert rv.status_code == 503, (path, rv.json)
        assert int(rv.headers["Retry-After"]) > 0 and "error" in rv.json
        assert time.monotonic() - started < 2


def test_an_unexpected_error_is_a_logged_500_json(caplog):
    api = Api()
    api.app.add_url_rule("/boom", "boom", lambda: 1 / 0)
    rv = api.client.get("/boom")
    assert rv.status_code == 500 and rv.json == {
        "error": "internal server error",
        "type": "InternalError",
    }
    assert "ZeroDivisionError" in caplog.text


def test_classification_extension_returns_top_k_strings(live):
    imgs = images(2)
    body = v2_json(imgs)
    body["outputs"] = [
        {"name": "pool1", "parameters": {"classification": 3}},
        {"name": "conv1", "parameters": {"binary_data": False}},
    ]
    rv = live.client.post("/v2/models/tiny/infer", json=body)
    assert rv.status_code == 200, rv.json
    out = {o["name"]: o for o in rv.json["outputs"]}
    assert out["pool1"]["datatype"] == "BYTES" and out["pool1"]["shape"] == [2, 3]
    pool1 = reference_model().run(imgs, outputs=["pool1"])["pool1"].reshape(2, -1)
    for i, row in enumerate(np.reshape(out["pool1"]["data"], (2, 3))):
        want = np.argsort(-pool1[i], kind="stable")[:3]
        assert [int(s.split(":")[1]) for s in row] == list(want)
        assert [float(s.split(":")[0]) for s in row] == pytest.approx(pool1[i][want], abs=1e-6)
        assert all(s.split(":")[2] == s.split(":")[1] for s in row)  # no labels: the index
    assert out["conv1"]["datatype"] == "FP32"
    body["outputs"][0]["parameters"]["classification"] = "3"
    assert live.client.post("/v2/models/tiny/infer", json=body).status_code == 400
    jobs = live.client.post(
        "/v2/models/tiny/jobs", json=v2_json(imgs) | {"outputs": body["outputs"]}
    )
    assert jobs.status_code == 400 and "classification" in jobs.json["error"]
