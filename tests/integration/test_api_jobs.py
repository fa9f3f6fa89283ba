"""The jobs extension over fakeredis with a burst worker: submit, status, results, cancel.

Every test runs twice: job data in Redis, and job data in files (CONVQ_BLOB_DIR).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from service.render import grid
from tests.integration.apikit import (
    Api,
    images,
    npy_bytes,
    parse_v2,
    reference_model,
    v2_binary,
    v2_json,
)


@pytest.fixture
def api(blob_dir):
    api = Api(blob_dir=blob_dir)
    assert api.load().status_code == 200
    return api


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def submit(api, body=None, **kw):
    rv = api.client.post("/v2/models/tiny/jobs", json=body, **kw)
    return rv


def finished(api, rv) -> str:
    assert rv.status_code == 202, rv.json
    job_id = rv.json["id"]
    assert rv.json["status"] == "queued" and rv.headers["Location"] == f"/v2/jobs/{job_id}"
    api.burst()
    status = api.client.get(f"/v2/jobs/{job_id}").json
    assert status["status"] == "finished", status
    return job_id


def test_json_job_result_equals_model_run_in_every_format(api):
    imgs = images(3)
    job_id = finished(api, submit(api, v2_json(imgs, ["conv1", "fc"])))
    expect = reference_model().run(imgs, outputs=["conv1", "fc"])
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    assert rv.headers["Content-Type"] == "application/octet-stream"
    got = parse_v2(rv.data, rv.headers["Inference-Header-Content-Length"])
    assert list(got) == ["conv1", "fc"]
    for name in expect:
        np.testing.assert_array_equal(got[name], expect[name])
    rv = api.client.get(f"/v2/jobs/{job_id}/result?format=json")
    assert rv.headers["Content-Type"] == "application/json"
    got = parse_v2(rv.data, None)
    np.testing.assert_array_equal(got["fc"], expect["fc"])
    rv = api.client.get(f"/v2/jobs/{job_id}/result?format=json&output=fc")
    assert [o["name"] for o in rv.json["outputs"]] == ["fc"]
    rv = api.client.get(f"/v2/jobs/{job_id}/result?output=conv1&format=npy")
    np.testing.assert_array_equal(np.load(io.BytesIO(rv.data), allow_pickle=False), expect["conv1"])


def test_png_grid_is_that_images_maps(api):
    imgs = images(2)
    job_id = finished(api, submit(api, v2_json(imgs, ["conv1"])))
    rv = api.client.get(f"/v2/jobs/{job_id}/result?output=conv1&format=png&image=1")
    assert rv.mimetype == "image/png"
    picture = np.asarray(Image.open(io.BytesIO(rv.data)))
    expect = grid(reference_model().run(imgs, outputs=["conv1"])["conv1"][1])
    np.testing.assert_array_equal(picture, expect)
    assert picture.shape == (2 * 6 - 1, 2 * 6 - 1)  # 4 maps of 5x5 in a 2x2 grid, 1px gaps
    rv = api.client.get(f"/v2/jobs/{job_id}/result?output=conv1&format=png&image=2")
    assert rv.status_code == 404 and rv.json["field"] == "image"


def test_grid_scales_each_channel_and_survives_constant_maps():
    maps = np.zeros((2, 2, 2), np.float32)
    maps[..., 0] = [[1, 2], [3, 5]]
    out = grid(maps)
    assert out[0, 0] == 0 and out[1, 1] == 255 and out[0, 1] == round(255 / 4)
    assert (out[:2, 3:] == 0).all()  # the constant channel is black, not NaN


def test_binary_fp32_job_and_all_outputs(api):
    imgs = np.random.default_rng(5).standard_normal((2, 9, 9, 3)).astype(np.float32)
    body, headers = v2_binary(imgs)
    doc = json.loads(body[: int(headers["Inference-Header-Content-Length"])])
    rv = api.client.post("/v2/models/tiny/jobs", data=body, headers=headers)
    job_id = finished(api, rv)
    assert rv.json["outputs"] == ["fc"] and "outputs" not in doc
    got = parse_v2(
        *(lambda r: (r.data, r.headers["Inference-Header-Content-Length"]))(
            api.client.get(f"/v2/jobs/{job_id}/result")
        )
    )
    np.testing.assert_array_equal(got["fc"], reference_model().run(imgs)["fc"])


@pytest.mark.parametrize("kind", ["png", "npy-uint8", "npy-float32"])
def test_multipart_images_job(api, kind):
    imgs = images(2)
    if kind == "png":
        files = [(io.BytesIO(png_bytes(i)), f"{n}.png") for n, i in enumerate(imgs)]
        sent = imgs
    elif kind == "npy-uint8":
        files = [(io.BytesIO(npy_bytes(i)), f"{n}.npy") for n, i in enumerate(imgs)]
        sent = imgs
    else:
        sent = imgs.astype(np.float32) / 255
        files = [(io.BytesIO(npy_bytes(i)), f"{n}.npy") for n, i in enumerate(sent)]
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        content_type="multipart/form-data",
        data={"images": files, "outputs": "all"},
    )
    job_id = finished(api, rv)
    assert rv.json["outputs"] == ["conv1", "relu1", "pool1", "fc"]
    got = parse_v2(
        *(lambda r: (r.data, r.headers["Inference-Header-Content-Length"]))(
            api.client.get(f"/v2/jobs/{job_id}/result")
        )
    )
    expect = reference_model().run(sent, outputs="all")
    for name in expect:
        np.testing.assert_array_equal(got[name], expect[name])


def test_multipart_comma_outputs(api):
    files = [(io.BytesIO(png_bytes(images(1)[0])), "a.png")]
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        content_type="multipart/form-data",
        data={"images": files, "outputs": "pool1, conv1"},
    )
    assert rv.status_code == 202 and rv.json["outputs"] == ["pool1", "conv1"]


def test_status_reports_timings_and_no_owner(api):
    job_id = finished(api, submit(api, v2_json(images(1))))
    status = api.client.get(f"/v2/jobs/{job_id}").json
    assert "owner" not in status
    assert status["timings"]["compute_seconds"] >= 0 and status["error"] is None


def test_result_before_finish_is_409_then_delete_cancels(api):
    rv = submit(api, v2_json(images(1)))
    job_id = rv.json["id"]
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    assert rv.status_code == 409 and rv.headers["Retry-After"]
    rv = api.client.delete(f"/v2/jobs/{job_id}")
    assert rv.json == {"id": job_id, "status": "canceled"}
    assert api.queue_keys() == 0
    assert api.client.get(f"/v2/jobs/{job_id}").status_code == 404
    api.burst()  # nothing left to run
    assert api.client.delete(f"/v2/jobs/{job_id}").status_code == 404


def test_delete_after_finish_removes_the_result(api):
    job_id = finished(api, submit(api, v2_json(images(1))))
    assert api.client.delete(f"/v2/jobs/{job_id}").json["status"] == "deleted"
    left = api.redis.keys(f"*{job_id}*")
    # Only the worker's short-lived cancel mark may stay (so a re-queued retry cannot run).
    assert all(k.startswith(b"convq:cancel:") and api.redis.ttl(k) > 0 for k in left), left
    assert not [name for name in api.blob_files() if job_id in name]


def test_expired_result_is_404(api):
    job_id = finished(api, submit(api, v2_json(images(1))))
    api.app.extensions["convq"].store.delete_job(job_id)  # what the TTL does
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    assert rv.status_code == 404 and "expired" in rv.json["error"]


def test_result_query_errors(api):
    job_id = finished(api, submit(api, v2_json(images(1), ["conv1"])))
    for query, status, field in [
        ("format=xml", 400, "format"),
        ("format=npy", 400, "output"),
        ("format=png&output=conv1&image=-1", 400, "image"),
        ("output=fc", 404, "output"),
        ("bogus=1", 400, "bogus"),
    ]:
        rv = api.client.get(f"/v2/jobs/{job_id}/result?{query}")
        assert (rv.status_code, rv.json["field"]) == (status, field), query


@pytest.mark.parametrize("job_id", ["0" * 32, "nope", "../../etc", "a" * 500])
def test_unknown_jobs_are_404(api, job_id):
    for method in ("get", "delete"):
        assert getattr(api.client, method)(f"/v2/jobs/{job_id}").status_code == 404
    assert api.client.get(f"/v2/jobs/{job_id}/result").status_code == 404


def _rejected(api, rv, status: int, words: str = ""):
    assert rv.status_code == status, rv.json
    assert words in rv.json["error"], rv.json
    assert api.queue_keys() == 0
    assert not api.redis.keys("convq:input*")
    assert not [name for name in api.blob_files() if "input-" in name]


def test_unknown_model_and_unknown_output(api):
    rv = api.client.post("/v2/models/nope/jobs", json=v2_json(images(1)))
    _rejected(api, rv, 404, "nope")
    _rejected(api, submit(api, v2_json(images(1), ["conv9"])), 400, "conv9")


def test_wrong_size_channels_and_dtype_mix(api):
    _rejected(api, submit(api, v2_json(images(1, h=10))), 400, "9x9")
    gray = np.zeros((1, 9, 9), np.uint8)
    _rejected(api, submit(api, v2_json(gray)), 400, "channels")
    files = [
        (io.BytesIO(npy_bytes(images(1)[0])), "a.npy"),
        (io.BytesIO(npy_bytes(images(1)[0].astype(np.float32))), "b.npy"),
    ]
    rv = api.client.post(
        "/v2/models/tiny/jobs", content_type="multipart/form-data", data={"images": files}
    )
    _rejected(api, rv, 400, "share")


def test_non_finite_fp32_images_are_400(api):
    imgs = np.zeros((1, 9, 9, 3), np.float32)
    imgs[0, 0, 0, 0] = np.inf
    body, headers = v2_binary(imgs)
    _rejected(
        api, api.client.post("/v2/models/tiny/jobs", data=body, headers=headers), 400, "finite"
    )


@pytest.mark.parametrize(
    "data,status",
    [
        (b"garbage", 415),
        (b"GIF89a", 415),
        (b"\x89PNG\r\n\x1a\n....", 400),
        (b"\x93NUMPY\x01\x00\x04\x00{}  ", 400),
    ],
)
def test_bad_image_files(api, data, status):
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        content_type="multipart/form-data",
        data={"images": [(io.BytesIO(data), "upload")]},
    )
    _rejected(api, rv, status)


def test_bomb_and_mislabelled_uploads(api):
    from tests.unit.test_images import lying_png

    rv = api.client.post(
        "/v2/models/tiny/jobs",
        content_type="multipart/form-data",
        data={"images": [(io.BytesIO(lying_png(10000, 10000)), "bomb.png")]},
    )
    _rejected(api, rv, 413, "bomb.png")
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        content_type="multipart/form-data",
        data={"images": [(io.BytesIO(png_bytes(images(1)[0])), "a.jpg")]},
    )
    _rejected(api, rv, 415, "JPEG")


def test_multipart_needs_images_and_known_fields(api):
    rv = api.client.post(
        "/v2/models/tiny/jobs", content_type="multipart/form-data", data={"outputs": "all"}
    )
    _rejected(api, rv, 400, "images")
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        content_type="multipart/form-data",
        data={"images": [(io.BytesIO(png_bytes(images(1)[0])), "a.png")], "colour": "red"},
    )
    _rejected(api, rv, 400, "colour")


def test_limits_images_pixels_output_bytes_queue(blob_dir):
    api = Api(
        blob_dir=blob_dir,
        MAX_IMAGES=2,
        MAX_PIXELS=81,
        MAX_OUTPUT_BYTES=5 * 5 * 4 * 4 * 2,
        MAX_QUEUE=1,
    )
    api.load()
    _rejected(api, submit(api, v2_json(images(3))), 413, "limit")
    _rejected(api, submit(api, v2_json(images(1, h=10))), 413, "pixels")
    _rejected(api, submit(api, v2_json(images(2), ["conv1", "relu1"])), 413, "bytes")
    files = [(io.BytesIO(png_bytes(images(1)[0])), f"{i}.png") for i in range(3)]
    rv = api.client.post(
        "/v2/models/tiny/jobs", content_type="multipart/form-data", data={"images": files}
    )
    _rejected(api, rv, 413, "limit")
    assert submit(api, v2_json(images(2), ["conv1"])).status_code == 202
    rv = submit(api, v2_json(images(1)))
    assert rv.status_code == 503 and int(rv.headers["Retry-After"]) > 0
    assert "queue is full" in rv.json["error"]


def test_body_limits_by_length_chunked_and_gzip(blob_dir):
    import gzip

    api = Api(blob_dir=blob_dir, MAX_CONTENT_LENGTH=1500)
    api.load()
    big = json.dumps(v2_json(images(2))).encode()
    small = json.dumps(v2_json(images(1), ["fc"])).encode()
    assert len(big) > 1500 > len(small)
    rv = api.client.post("/v2/models/tiny/jobs", data=big, content_type="application/json")
    _rejected(api, rv, 413)

    # A chunked body: no Content-Length, the server reads until the stream ends.
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        input_stream=io.BytesIO(big),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert rv.request.content_length is None
    _rejected(api, rv, 413)
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        data=gzip.compress(big),
        content_type="application/json",
        headers={"Content-Encoding": "gzip"},
    )
    _rejected(api, rv, 413, "decompressed")
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        input_stream=io.BytesIO(small),
        content_type="application/json",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert rv.status_code == 202
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        data=gzip.compress(small),
        content_type="application/json",
        headers={"Content-Encoding": "gzip"},
    )
    assert rv.status_code == 202
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        data=b"xx",
        content_type="application/json",
        headers={"Content-Encoding": "br"},
    )
    assert rv.status_code == 415


def test_wrong_content_types_and_malformed_bodies(api):
    rv = api.client.post("/v2/models/tiny/jobs", data="hi", content_type="text/plain")
    _rejected(api, rv, 415)
    for body in (b"{", b"[]", b"null", b'{"inputs": 5}', b"[" * 50000):
        rv = api.client.post("/v2/models/tiny/jobs", data=body, content_type="application/json")
        _rejected(api, rv, 400)
    body, headers = v2_binary(images(1))
    rv = api.client.post("/v2/models/tiny/jobs", data=body[:-3], headers=headers)
    _rejected(api, rv, 400, "binary")
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        data=body,
        headers={**headers, "Inference-Header-Content-Length": "999999"},
    )
    _rejected(api, rv, 400, "Inference-Header-Content-Length")


def test_a_job_whose_input_expired_fails_with_a_clear_error(api):
    rv = submit(api, v2_json(images(1)))
    job_id = rv.json["id"]
    store = api.app.extensions["convq"].store
    api.redis.delete(store.input_key(job_id))  # what input_ttl does to a job queued too long
    api.burst()
    status = api.client.get(f"/v2/jobs/{job_id}").json
    assert status["status"] == "failed" and "input" in status["error"]
    rv = api.client.get(f"/v2/jobs/{job_id}/result")
    assert rv.status_code == 409 and "failed" in rv.json["error"]


def test_json_and_png_results_have_size_caps(blob_dir):
    api = Api(
        blob_dir=blob_dir, MAX_JSON_OUTPUT_BYTES=2 * 5 * 5 * 4 * 4 - 1, MAX_PNG_PIXELS=5 * 5 * 4 - 1
    )
    api.load()
    job_id = finished(api, submit(api, v2_json(images(2), ["conv1", "fc"])))
    rv = api.client.get(f"/v2/jobs/{job_id}/result?format=json")
    assert rv.status_code == 413 and "binary" in rv.json["error"]
    assert api.client.get(f"/v2/jobs/{job_id}/result?format=json&output=fc").status_code == 200
    assert api.client.get(f"/v2/jobs/{job_id}/result").status_code == 200  # binary: no cap
    rv = api.client.get(f"/v2/jobs/{job_id}/result?format=png&output=conv1")
    assert rv.status_code == 413 and "npy" in rv.json["error"]
    assert api.client.get(f"/v2/jobs/{job_id}/result?format=png&output=fc").status_code == 200
    # infer refuses a JSON answer that would be too big before running anything.
    rv = api.client.post("/v2/models/tiny/infer", json=v2_json(images(2), ["conv1"]))
    assert rv.status_code == 413 and api.queue_keys() == 0


def test_big_json_tensors_must_go_binary(blob_dir):
    api = Api(blob_dir=blob_dir, MAX_JSON_INPUT_BYTES=500)
    api.load()
    _rejected(api, submit(api, v2_json(images(1))), 413, "binary tensor extension")
    body, headers = v2_binary(images(1))
    assert api.client.post("/v2/models/tiny/jobs", data=body, headers=headers).status_code == 202
