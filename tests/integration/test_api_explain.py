"""Explain jobs over HTTP: parameters.explain in a V2 body, maps and overlays in the result."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.explain import CHANNEL, MAP, OVERLAY, explain
from tests.integration.apikit import Api, images, parse_v2, reference_model, v2_json


@pytest.fixture
def api(blob_dir):
    api = Api(blob_dir=blob_dir)
    assert api.load().status_code == 200
    return api


@pytest.mark.parametrize(
    "request_",
    [
        {"method": "saliency", "layer": "fc", "channel": "top"},
        {"method": "gradcam", "layer": "fc", "channel": 2},
        {"method": "gradient", "layer": "pool1", "channel": 1},
    ],
)
def test_explain_job_results_equal_engine_explain(api, request_):
    imgs = images(3)
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(imgs, ["fc"], explain=request_))
    assert rv.status_code == 202, rv.json
    assert rv.json["outputs"] == ["fc", MAP, OVERLAY, CHANNEL]
    job_id = rv.json["id"]
    api.burst()
    status = api.client.get(f"/v2/jobs/{job_id}").json
    assert status["status"] == "finished", status
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    got = parse_v2(rv.data, rv.headers.get("Inference-Header-Content-Length"))
    want = explain(reference_model(), imgs, request_)
    np.testing.assert_allclose(got[MAP], want.maps, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[OVERLAY], want.overlays.astype(np.float32))
    np.testing.assert_array_equal(got[CHANNEL], want.channels.astype(np.float32))
    rv = api.client.get(f"/v2/jobs/{job_id}/result?format=png&output={OVERLAY}&image=1")
    assert rv.status_code == 200 and rv.mimetype == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(rv.data)))
    np.testing.assert_array_equal(picture, want.overlays[1])


def test_explain_through_infer(api):
    from worker.embedded import start_workers

    imgs = images(2)
    body = v2_json(imgs, explain={"method": "saliency", "layer": "fc", "channel": 0})
    handle = start_workers(api.redis, api.settings, n=1)
    try:
        rv = api.client.post("/v2/models/tiny/infer", json=body)
    finally:
        handle.stop()
    assert rv.status_code == 200, rv.json
    got = parse_v2(rv.data, rv.headers.get("Inference-Header-Content-Length"))
    assert set(got) == {"fc", MAP, OVERLAY, CHANNEL} and got[MAP].shape == (2, 9, 9)


@pytest.mark.parametrize(
    "explain_,fragment",
    [
        ({"method": "lime"}, "method"),
        ({"method": "saliency", "layer": "nope"}, "unknown"),
        ({"method": "saliency", "layer": "fc", "channel": 9}, "out of range"),
        ({"method": "gradcam", "layer": "fc", "at": "relu1"}, "conv layer"),
        ("saliency", "object"),
    ],
)
def test_bad_explain_requests_are_400_and_never_queued(api, explain_, fragment):
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1), explain=explain_))
    assert rv.status_code == 400 and fragment in rv.json["error"]
    assert api.queue_keys() == 0


def test_multipart_explain_field(api):
    imgs = images(1)
    buf = io.BytesIO()
    Image.fromarray(imgs[0]).save(buf, format="PNG")
    form = {
        "images": (io.BytesIO(buf.getvalue()), "a.png"),
        "outputs": "fc",
        "explain": '{"method": "gradcam", "layer": "fc", "channel": 1}',
    }
    rv = api.client.post("/v2/models/tiny/jobs", data=form, content_type="multipart/form-data")
    assert rv.status_code == 202, rv.json
    api.burst()
    rv = api.client.get(f"/v2/jobs/{rv.json['id']}/result?format=npy&output={MAP}")
    got = np.load(io.BytesIO(rv.data))
    want = explain(reference_model(), imgs, {"method": "gradcam", "layer": "fc", "channel": 1})
    np.testing.assert_allclose(got, want.maps, rtol=1e-5, atol=1e-6)
    form = {"images": (io.BytesIO(buf.getvalue()), "a.png"), "explain": "{saliency"}
    rv = api.client.post("/v2/models/tiny/jobs", data=form, content_type="multipart/form-data")
    assert rv.status_code == 400 and "JSON" in rv.json["error"]
