"""The API and its workers sharing a blob directory (CONVQ_BLOB_DIR) when files go wrong.

The happy paths run in both stores in test_api_jobs.py and test_api_infer.py; here are the
failures only files have: a missing or cut file, a full disk, and the sweep of old files.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from tests.integration.apikit import Api, images, parse_v2, reference_model, v2_json
from worker.contract.blobs import SWEEP_MARGIN, BlobDir, BlobDirError
from worker.contract.config import Settings
from worker.runner import burst
from worker.runtime import current
from worker.workers import build


@pytest.fixture
def api(tmp_path):
    api = Api(blob_dir=str(tmp_path / "blobs"), retries=2)
    assert api.load().status_code == 200
    return api


def submitted(api, outputs=("conv1", "fc")) -> str:
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(2), list(outputs)))
    assert rv.status_code == 202, rv.json
    return rv.json["id"]


def finished(api, outputs=("conv1", "fc")) -> str:
    job_id = submitted(api, outputs)
    api.burst()
    assert api.client.get(f"/v2/jobs/{job_id}").json["status"] == "finished"
    return job_id


def age(api, name: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(os.path.join(api.settings.blob_dir, name), (then, then))


def test_job_bytes_are_files_and_redis_holds_only_their_names(api):
    job_id = submitted(api)
    assert sorted(api.blob_files()) == [f"input-{job_id}"]
    api.burst()
    assert sorted(api.blob_files()) == [f"result-{job_id}.0", f"result-{job_id}.1"]
    expect = reference_model().run(images(2), outputs=["conv1", "fc"])
    assert api.blob_files()[f"result-{job_id}.0"] == expect["conv1"].tobytes()
    job_keys = api.redis.keys(f"convq:*{job_id}*")
    assert job_keys and all(len(api.redis.dump(k)) < 1024 for k in job_keys), job_keys


def test_a_job_whose_input_file_is_gone_fails_once_and_says_why(api):
    job_id = submitted(api)
    os.remove(os.path.join(api.settings.blob_dir, f"input-{job_id}"))
    api.burst()
    status = api.client.get(f"/v2/jobs/{job_id}").json
    assert status["status"] == "failed", status
    assert "input" in status["error"] and "CONVQ_BLOB_DIR" in status["error"], status
    assert status["attempt"] == 1 and api.queue_keys() == 0  # retries=2, yet not retried
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    assert rv.status_code == 409 and "failed" in rv.json["error"]


def test_a_worker_without_the_blob_dir_fails_the_job_and_names_the_setting(api):
    job_id = submitted(api)
    burst(api.redis, Settings(threads=1, retries=2))  # a worker that was not given the dir
    status = api.client.get(f"/v2/jobs/{job_id}").json
    assert status["status"] == "failed" and status["attempt"] == 1, status
    assert "CONVQ_BLOB_DIR" in status["error"], status


def test_a_worker_with_a_blob_dir_answers_an_api_without_one_through_redis(tmp_path):
    api = Api()  # this API moves job data through Redis
    assert api.load().status_code == 200
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(2), ["conv1"]))
    job_id = rv.json["id"]
    worker_dir = tmp_path / "worker-only"
    burst(api.redis, Settings(threads=1, retries=0, blob_dir=str(worker_dir)))
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    assert rv.status_code == 200, rv.data[:300]
    got = parse_v2(rv.data, rv.headers.get("Inference-Header-Content-Length"))
    expect = reference_model().run(images(2), outputs=["conv1"])["conv1"]
    assert np.array_equal(got["conv1"], expect)
    assert list(worker_dir.iterdir()) == []  # nothing written where the API cannot look


@pytest.mark.parametrize("path", ["/v2/models/tiny/jobs", "/v2/models/tiny/infer"])
def test_a_full_blob_dir_is_507_with_retry_after_and_nothing_queued(api, monkeypatch, path):
    def full(self, name, parts):
        raise BlobDirError(28, "No space left on device")

    monkeypatch.setattr(BlobDir, "write", full)
    rv = api.client.post(path, json=v2_json(images(1)))
    assert rv.status_code == 507 and rv.is_json, rv.data[:300]
    assert rv.json["type"] == "InsufficientStorage" and "CONVQ_BLOB_DIR" in rv.json["error"]
    assert int(rv.headers["Retry-After"]) > 0
    assert api.queue_keys() == 0 and not api.redis.keys("convq:input*")
    assert api.blob_files() == {}


@pytest.mark.parametrize(
    "query",
    ["", "?format=json", "?format=npy&output=conv1", "?format=png&output=conv1", "?output=fc"],
)
@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_a_result_whose_file_is_gone_or_cut_is_404_json(api, query, damage):
    job_id = finished(api)
    for i in (0, 1):
        path = os.path.join(api.settings.blob_dir, f"result-{job_id}.{i}")
        if damage == "deleted":
            os.remove(path)
        else:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) - 4)
    rv = api.client.get(f"/v2/jobs/{job_id}/result{query}")
    assert rv.status_code == 404 and rv.is_json, (rv.status_code, rv.data[:300])
    assert rv.json["type"] == "NotFound" and f"result-{job_id}" in rv.json["error"]


def test_a_result_is_served_from_its_file_after_the_input_is_gone(api):
    job_id = finished(api, ["fc"])
    assert f"input-{job_id}" not in api.blob_files()  # finish_run dropped it
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    got = parse_v2(rv.data, rv.headers["Inference-Header-Content-Length"])
    np.testing.assert_array_equal(got["fc"], reference_model().run(images(2))["fc"])


def test_a_workers_sweep_deletes_blob_files_past_their_ttl(api):
    done = finished(api, ["fc"])
    stale, fresh = submitted(api), submitted(api)
    age(api, f"result-{done}.0", api.settings.result_ttl + SWEEP_MARGIN + 60)
    age(api, f"input-{stale}", api.settings.input_ttl + SWEEP_MARGIN + 60)
    age(api, f"input-{fresh}", api.settings.input_ttl + SWEEP_MARGIN - 60)
    api.redis.delete(*api.redis.keys("convq:sweep-lock:*"))  # burst() swept a moment ago
    worker = build("thread", api.redis, api.settings, current())
    worker.clean_registries()
    assert sorted(api.blob_files()) == [f"input-{fresh}"]


def test_a_sweep_that_cannot_read_the_blob_dir_does_not_end_the_worker(api):
    shutil.rmtree(api.settings.blob_dir)  # say, a /tmp cleaner took it
    worker = build("thread", api.redis, api.settings, current())
    worker.clean_registries()
    assert worker.last_cleaned_at is not None
