"""Cost limits checked before the work they limit, and strict query parsing (issue 11)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.integration.apikit import SPEC, Api, images, load_body, npz_bytes, v2_json

PAD_SPEC = {
    "name": "pad",
    "input": {"channels": 1},
    "fit": "floor",
    "layers": [
        {"name": "a", "type": "conv", "filters": 64, "size": 1, "pad": 500},
        {"name": "b", "type": "conv", "filters": 1, "size": 1},
    ],
}
PAD_ARRAYS = {
    "a.w": np.ones((64, 1, 1, 1), np.float32),
    "a.b": np.zeros(64, np.float32),
    "b.w": np.zeros((1, 1, 1, 64), np.float32),
    "b.b": np.zeros(1, np.float32),
}


def tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def api(blob_dir):
    api = Api(blob_dir=blob_dir)
    assert api.load().status_code == 200
    return api


def finished_job(api, imgs=None, outputs=("conv1", "fc")) -> str:
    imgs = images(2) if imgs is None else imgs
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(imgs, list(outputs)))
    assert rv.status_code == 202, rv.json
    api.burst()
    return rv.json["id"]


def test_a_tiny_png_whose_run_holds_hundreds_of_mb_is_413_before_queueing(blob_dir):
    api = Api(blob_dir=blob_dir, MAX_RUN_BYTES=128 << 20)
    rv = api.load("pad", spec=PAD_SPEC, data=npz_bytes(PAD_ARRAYS))
    assert rv.status_code == 200, rv.json
    rv = api.client.post(
        "/v2/models/pad/jobs",
        data={"images": [(io.BytesIO(tiny_png()), "a.png")]},
        content_type="multipart/form-data",
    )
    # The output is 4 MB (1001x1001x1); layer a's 1001x1001x64 output alone is 256 MB.
    assert rv.status_code == 413, rv.json
    assert "would hold up to" in rv.json["error"] and rv.json["field"] == "images"
    assert api.queue_keys() == 0


@pytest.mark.parametrize(
    "query",
    ["output=conv1&output=fc", "format=json&format=binary", "image=0&image=1"],
)
def test_a_repeated_query_parameter_is_400(api, query):
    job_id = finished_job(api)
    rv = api.client.get(f"/v2/jobs/{job_id}/result?{query}")
    assert rv.status_code == 400, rv.data[:200]
    assert "more than once" in rv.json["error"]


@pytest.mark.parametrize("image", ["²", "١", "+1", " 1", "1_0"])
def test_image_index_takes_ascii_digits_only(api, image):
    job_id = finished_job(api)
    rv = api.client.get(
        f"/v2/jobs/{job_id}/result",
        query_string={"format": "png", "output": "conv1", "image": image},
    )
    assert rv.status_code == 400, rv.data[:200]
    assert rv.json["field"] == "image"


def test_the_spec_size_limit_holds_on_the_api_path(api):
    # A valid spec padded with whitespace past 1 MiB: load_spec refuses it from a file.
    body = load_body()
    body["parameters"]["config"] = json.dumps(SPEC) + " " * (1 << 20)
    rv = api.client.post("/v2/repository/models/big/load", json=body)
    assert rv.status_code == 413, rv.json
    assert "spec" in rv.json["error"] and rv.json["field"] == "config"
    # A spec given as an inline JSON object is measured too.
    body["parameters"]["config"] = {**SPEC, "notes": "x" * (1 << 20)}
    rv = api.client.post("/v2/repository/models/big/load", json=body)
    assert rv.status_code == 413, rv.json


def test_non_finite_results_are_422_in_json_and_intact_in_binary(api):
    imgs = np.full((1, 9, 9, 3), 3e38, np.float32)
    job_id = finished_job(api, imgs, outputs=("conv1",))
    rv = api.client.get(f"/v2/jobs/{job_id}/result?format=json")
    assert rv.status_code == 422, rv.data[:200]
    assert "non-finite" in rv.json["error"] and rv.json["field"] == "format"
    rv = api.client.get(f"/v2/jobs/{job_id}/result?format=npy&output=conv1")
    assert rv.status_code == 200
    assert not np.isfinite(np.load(io.BytesIO(rv.data))).all()


A = {"Authorization": "Bearer key-a-0123456789ab"}
B = {"Authorization": "Bearer key-b-0123456789ab"}
ONE_JOB = 2 * 9 * 9 * 3 + 2 * 1 * 1 * 5 * 4  # two uint8 images in, fc's float32 maps out


def _job(api, headers=None):
    return api.client.post("/v2/models/tiny/jobs", json=v2_json(images(2)), headers=headers or {})


def test_a_key_may_have_so_many_jobs_queued_then_429(blob_dir):
    api = Api(
        blob_dir=blob_dir,
        API_KEYS="key-a-0123456789ab, key-b-0123456789ab",
        MAX_KEY_JOBS=2,
        RETRY_AFTER=7,
    )
    assert api.load(headers=A).status_code == 200
    assert [_job(api, A).status_code for _ in range(2)] == [202, 202]
    rv = _job(api, A)
    assert rv.status_code == 429 and rv.headers["Retry-After"] == "7"
    assert "2 jobs queued or running" in rv.json["error"]
    assert api.queue_keys() == 2
    assert api.client.post(
        "/v2/repository/models/tiny/load", json=load_body(), headers=B
    ).status_code in (200, 409)
    api.burst()  # both finish: the key may queue again
    assert [_job(api, A).status_code for _ in range(2)] == [202, 202]


def test_a_key_may_store_so_many_bytes_then_429_until_it_deletes(blob_dir):
    api = Api(blob_dir=blob_dir, MAX_KEY_STORED_BYTES=2 * ONE_JOB)
    assert api.load().status_code == 200
    first = _job(api)
    assert first.status_code == 202 and _job(api).status_code == 202
    api.burst()  # finished jobs still hold their results until deleted or expired
    rv = _job(api)
    assert rv.status_code == 429, rv.json
    assert f"store {2 * ONE_JOB} bytes" in rv.json["error"]
    assert api.client.delete(f"/v2/jobs/{first.json['id']}").status_code == 200
    assert _job(api).status_code == 202
    # A job bigger than the whole budget can never fit: 413, not a retry.
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(5)))
    assert rv.status_code == 413 and "a key may store" in rv.json["error"]


def test_the_stored_bytes_expire_with_the_results(blob_dir, monkeypatch):
    api = Api(blob_dir=blob_dir, MAX_KEY_STORED_BYTES=ONE_JOB)
    assert api.load().status_code == 200
    assert _job(api).status_code == 202
    api.burst()
    assert _job(api).status_code == 429
    import service.budget

    later = service.budget.time.time() + api.settings.result_ttl + api.settings.job_timeout + 1
    monkeypatch.setattr(service.budget.time, "time", lambda: later)
    assert _job(api).status_code == 202
