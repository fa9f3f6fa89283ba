"""Lean results over the API (V2 JSON, V2 binary, multipart jobs, /infer), run by a real rq
worker (burst, or embedded workers), each compared with the float32 run of the same images.

Every test of a job runs twice: job data in Redis, and job data in files (CONVQ_BLOB_DIR).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from service.render import grid
from tests.integration.apikit import Api, images, parse_v2, reference_model, v2_binary, v2_json
from worker.contract.lean import stored_bytes

# tiny on 9x9 images: conv1 and relu1 are 5x5x4, pool1 4x4x4, fc 1x1x5
SHAPES = {"conv1": (5, 5, 4), "relu1": (5, 5, 4), "pool1": (4, 4, 4), "fc": (1, 1, 5)}


@pytest.fixture
def api(blob_dir):
    api = Api(blob_dir=blob_dir)
    assert api.load().status_code == 200
    return api


def with_options(body: dict, options: dict[str, dict]) -> dict:
    """Put options[name] in the parameters of each requested output name."""
    for out in body["outputs"]:
        out.setdefault("parameters", {}).update(options.get(out["name"], {}))
    return body


def finished(api, rv) -> str:
    assert rv.status_code == 202, rv.json
    api.burst()
    job_id = rv.json["id"]
    status = api.client.get(f"/v2/jobs/{job_id}").json
    assert status["status"] == "finished", status
    return job_id


def result(api, job_id: str, query: str = "") -> tuple[dict, dict[str, np.ndarray]]:
    rv = api.client.get(f"/v2/jobs/{job_id}/result{query}")
    assert rv.status_code == 200, rv.data[:300]
    length = rv.headers.get("Inference-Header-Content-Length")
    head = json.loads(rv.data[: int(length) if length else None])
    return {o["name"]: o for o in head["outputs"]}, parse_v2(rv.data, length)


def dequantised(got: dict[str, np.ndarray], name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (scale * q + offset, scale) per image and channel, in float64."""
    scale = got[f"{name}:scale"].astype(np.float64)[:, None, None, :]
    return scale * got[name] + got[f"{name}:offset"][:, None, None, :], scale


def check_lean(got: dict[str, np.ndarray], expect: dict[str, np.ndarray]) -> None:
    """Check the outputs of OPTIONS against the float32 maps expect."""
    conv1 = expect["conv1"][..., [3, 0]]
    back, scale = dequantised(got, "conv1")
    assert got["conv1"].dtype == np.uint8 and got["conv1"].shape == conv1.shape
    assert np.all(np.abs(back - conv1) <= scale / 2 * (1 + 1e-9))
    pool1 = expect["pool1"][:, 1:3, 0:4, 1:3]
    assert got["pool1"].dtype == np.float16
    np.testing.assert_allclose(got["pool1"].astype(np.float32), pool1, rtol=2.0**-11, atol=1e-7)
    relu1 = expect["relu1"]
    stats = got["relu1"]
    assert stats.shape == (len(relu1), 4, 5) and stats.dtype == np.float32
    np.testing.assert_array_equal(stats[..., 0], relu1.min(axis=(1, 2)))
    np.testing.assert_array_equal(stats[..., 1], relu1.max(axis=(1, 2)))
    np.testing.assert_allclose(stats[..., 2], relu1.mean(axis=(1, 2), dtype=np.float64), 1e-6)
    np.testing.assert_allclose(stats[..., 3], relu1.std(axis=(1, 2), dtype=np.float64), 1e-6)
    np.testing.assert_allclose(stats[..., 4], (relu1 == 0).mean(axis=(1, 2)), 1e-7)
    np.testing.assert_array_equal(got["fc"], expect["fc"])  # no options: float32 as ever


OPTIONS = {
    "conv1": {"dtype": "uint8", "channels": [3, 0]},
    "pool1": {"dtype": "float16", "channels": "1:3", "crop": [1, 0, 2, 4]},
    "relu1": {"stats": True},
}
NAMES = ["conv1", "relu1", "pool1", "fc"]


def binary_body(imgs: np.ndarray, names: list[str], options: dict) -> tuple[bytes, dict]:
    """Return a V2 binary request (body, headers) with options in its outputs' parameters."""
    body, headers = v2_binary(imgs, names)
    head_len = int(headers["Inference-Header-Content-Length"])
    head = json.dumps(with_options(json.loads(body[:head_len]), options)).encode()
    headers["Inference-Header-Content-Length"] = str(len(head))
    return head + body[head_len:], headers


@pytest.mark.parametrize("wire", ["json", "binary"])
def test_every_option_in_a_v2_job_against_the_float32_run(api, wire):
    imgs = images(3)
    if wire == "json":
        body = with_options(v2_json(imgs, NAMES), OPTIONS)
        rv = api.client.post("/v2/models/tiny/jobs", json=body)
    else:
        data, headers = binary_body(imgs, NAMES, OPTIONS)
        rv = api.client.post("/v2/models/tiny/jobs", data=data, headers=headers)
    assert rv.json["outputs"] == [*NAMES, "conv1:scale", "conv1:offset"]
    assert rv.json["lean"]["pool1"] == OPTIONS["pool1"]
    job_id = finished(api, rv)
    expect = reference_model().run(imgs, outputs=NAMES)
    described, got = result(api, job_id)
    check_lean(got, expect)
    assert described["conv1"]["datatype"] == "UINT8"
    assert described["conv1"]["parameters"]["scale"] == "conv1:scale"
    assert described["conv1"]["parameters"]["offset"] == "conv1:offset"
    assert described["conv1:scale"]["shape"] == [3, 2]
    assert described["pool1"]["datatype"] == "FP16"
    assert described["relu1"]["parameters"]["stats"] == "min,max,mean,std,zeros"
    # the same values as JSON numbers, and one output as .npy in its own dtype
    described, as_json = result(api, job_id, "?format=json")
    assert "binary_data_size" not in described["pool1"].get("parameters", {})
    for name, array in got.items():
        np.testing.assert_array_equal(as_json[name], array)
    rv = api.client.get(f"/v2/jobs/{job_id}/result?output=pool1&format=npy")
    np.testing.assert_array_equal(np.load(io.BytesIO(rv.data)), got["pool1"])


def test_lean_results_store_their_lean_bytes_and_count_them(api):
    imgs = images(2)
    body = with_options(v2_json(imgs, NAMES), OPTIONS)
    job_id = finished(api, api.client.post("/v2/models/tiny/jobs", json=body))
    store = api.app.extensions["convq"].store
    for name in NAMES:
        nbytes = store.result_nbytes(job_id, name)
        nbytes += sum(store.result_nbytes(job_id, f"{name}:{x}") or 0 for x in ("scale", "offset"))
        assert nbytes == stored_bytes(2, SHAPES[name], OPTIONS.get(name, {}))
    # the key's stored-bytes budget holds the lean bytes, not the float32 ones
    lean_total = imgs.nbytes + sum(stored_bytes(2, SHAPES[n], OPTIONS.get(n, {})) for n in NAMES)
    assert int(api.redis.get("convq:budget:-:total")) == lean_total


def test_png_outputs_are_the_grids_of_the_float32_maps(api):
    imgs = images(2)
    body = with_options(
        v2_json(imgs, ["conv1"]), {"conv1": {"png": True, "channels": "1:4", "crop": [0, 1, 4, 3]}}
    )
    job_id = finished(api, api.client.post("/v2/models/tiny/jobs", json=body))
    maps = reference_model().run(imgs, outputs=["conv1"])["conv1"][:, 0:4, 1:4, 1:4]
    described, got = result(api, job_id)
    assert described["conv1"]["datatype"] == "BYTES" and described["conv1"]["shape"] == [2]
    assert described["conv1"]["parameters"]["content_type"] == "image/png"
    for i in range(2):
        np.testing.assert_array_equal(
            np.asarray(Image.open(io.BytesIO(got["conv1"][i]))), grid(maps[i])
        )
        rv = api.client.get(f"/v2/jobs/{job_id}/result?output=conv1&format=png&image={i}")
        assert rv.mimetype == "image/png" and rv.data == got["conv1"][i]
    for query in ("?format=json", "?output=conv1&format=npy", "?format=json&top=2"):
        rv = api.client.get(f"/v2/jobs/{job_id}/result{query}")
        assert rv.status_code == 400 and "PNG pictures" in rv.json["error"], query
    assert (
        api.client.get(f"/v2/jobs/{job_id}/result?output=conv1&format=png&image=2").status_code
        == 404
    )


def test_stats_cannot_be_drawn(api):
    body = with_options(v2_json(images(1), ["relu1"]), {"relu1": {"stats": True}})
    job_id = finished(api, api.client.post("/v2/models/tiny/jobs", json=body))
    rv = api.client.get(f"/v2/jobs/{job_id}/result?output=relu1&format=png")
    assert rv.status_code == 400 and "stats" in rv.json["error"]


def test_lean_mapping_in_request_parameters_as_json_text(api):
    # what a client sending only scalar parameters (tritonclient) can do; "*" for every output
    imgs = images(2)
    lean = json.dumps({"*": {"dtype": "float16"}, "fc": {"dtype": "float32"}})
    job_id = finished(
        api, api.client.post("/v2/models/tiny/jobs", json=v2_json(imgs, ["relu1", "fc"], lean=lean))
    )
    expect = reference_model().run(imgs, outputs=["relu1", "fc"])
    _, got = result(api, job_id)
    assert got["relu1"].dtype == np.float16 and got["fc"].dtype == np.float32
    np.testing.assert_allclose(got["relu1"].astype(np.float32), expect["relu1"], rtol=2.0**-11)
    np.testing.assert_array_equal(got["fc"], expect["fc"])


def test_multipart_job_takes_a_lean_field(api):
    imgs = images(2)
    files = [(io.BytesIO(_png(i)), f"{n}.png") for n, i in enumerate(imgs)]
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        content_type="multipart/form-data",
        data={
            "images": files,
            "outputs": "pool1,fc",
            "lean": json.dumps({"*": {"dtype": "uint8"}, "fc": {"stats": True}}),
        },
    )
    job_id = finished(api, rv)
    expect = reference_model().run(imgs, outputs=["pool1", "fc"])
    _, got = result(api, job_id)
    back, scale = dequantised(got, "pool1")
    assert np.all(np.abs(back - expect["pool1"]) <= scale / 2 * (1 + 1e-9))
    np.testing.assert_array_equal(got["fc"][..., 1], expect["fc"].max(axis=(1, 2)))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"conv1": {"channels": [4]}}, "channels", "'conv1': channels: channel 4 is unknown"),
        ({"conv1": {"channels": "2:9"}}, "channels", "not within conv1's 4 channels"),
        ({"pool1": {"crop": [2, 0, 3, 1]}}, "crop", "'pool1': crop: [2, 0, 3, 1] is outside"),
        ({"conv1": {"dtype": "int4"}}, "dtype", "'conv1': dtype: 'int4' is not one of"),
        ({"conv1": {"stats": True, "png": True}}, "png", "exclude"),
        ({"conv1": {"stats": True, "dtype": "float16"}}, "dtype", "maps only"),
        ({"conv1": {"png": "yes"}}, "png", "true or false"),
    ],
)
def test_bad_options_are_400_naming_output_and_field_before_queueing(api, options, field, words):
    body = with_options(v2_json(images(1), ["conv1", "pool1"]), options)
    rv = api.client.post("/v2/models/tiny/jobs", json=body)
    assert rv.status_code == 400 and rv.json["field"] == field, rv.json
    assert words in rv.json["error"]
    assert api.queue_keys() == 0


@pytest.mark.parametrize(
    ("lean", "field", "words"),
    [
        ('{"fc": {"dtype": "uint8"}}', "outputs", "'fc': outputs: not a requested output"),
        ("{not json", "lean", "not valid JSON"),
        ('{"conv1": 3}', "lean", "must be an object"),
        ('["conv1"]', "lean", "must be an object"),
        ('{"*": {"colour": "red"}}', "colour", "unknown option"),
    ],
)
def test_bad_lean_mappings_are_400(api, lean, field, words):
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1), ["conv1"], lean=lean))
    assert rv.status_code == 400 and rv.json["field"] == field, rv.json
    assert words in rv.json["error"]
    files = [(io.BytesIO(_png(images(1)[0])), "a.png")]
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        content_type="multipart/form-data",
        data={"images": files, "outputs": "conv1", "lean": lean},
    )
    assert rv.status_code == 400 and words in rv.json["error"], rv.json
    assert api.queue_keys() == 0


def test_the_output_limit_counts_lean_bytes():
    float32 = 2 * 5 * 5 * 4 * 4
    api = Api(MAX_OUTPUT_BYTES=float32 - 1)
    assert api.load().status_code == 200
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(2), ["conv1"]))
    assert rv.status_code == 413 and "lean results" in rv.json["error"]
    for options in ({"dtype": "float16"}, {"stats": True}, {"channels": "0:3"}):
        body = with_options(v2_json(images(2), ["conv1"]), {"conv1": options})
        assert api.client.post("/v2/models/tiny/jobs", json=body).status_code == 202, options


def test_png_maps_too_big_to_draw_are_413():
    api = Api(MAX_PNG_PIXELS=5 * 5 * 4 - 1)
    assert api.load().status_code == 200
    body = with_options(v2_json(images(1), ["conv1"]), {"conv1": {"png": True}})
    rv = api.client.post("/v2/models/tiny/jobs", json=body)
    assert rv.status_code == 413 and rv.json["field"] == "png"
    body = with_options(v2_json(images(1), ["conv1"]), {"conv1": {"png": True, "channels": "0:3"}})
    assert api.client.post("/v2/models/tiny/jobs", json=body).status_code == 202


# -- /infer, waited for on embedded workers ------------------------------------------------------
@pytest.fixture(scope="module")
def live(module_blob_dir):
    from worker.embedded import start_workers

    api = Api(blob_dir=module_blob_dir)
    assert api.load().status_code == 200
    handle = start_workers(api.redis, api.settings, n=1)
    yield api
    handle.stop()


def test_binary_infer_with_every_option(live):
    imgs = images(2, seed=5)
    data, headers = binary_body(imgs, NAMES, OPTIONS)
    rv = live.client.post("/v2/models/tiny/infer", data=data, headers=headers)
    assert rv.status_code == 200, rv.data[:300]
    got = parse_v2(rv.data, rv.headers["Inference-Header-Content-Length"])
    assert list(got) == [*NAMES, "conv1:scale", "conv1:offset"]
    check_lean(got, reference_model().run(imgs, outputs=NAMES))


def test_json_infer_with_lean_options_and_png_forced_binary(live):
    imgs = images(1, seed=6)
    options = {**OPTIONS, "fc": {"png": True}}
    rv = live.client.post("/v2/models/tiny/infer", json=with_options(v2_json(imgs, NAMES), options))
    assert rv.status_code == 200, rv.data[:300]
    length = rv.headers["Inference-Header-Content-Length"]  # png travels as binary BYTES
    head = json.loads(rv.data[: int(length)])
    assert [
        o["name"] for o in head["outputs"] if "binary_data_size" in o.get("parameters", {})
    ] == ["fc"]
    got = parse_v2(rv.data, length)
    expect = reference_model().run(imgs, outputs=NAMES)
    check_lean({**got, "fc": expect["fc"]}, expect)
    drawn = np.asarray(Image.open(io.BytesIO(got["fc"][0])))
    np.testing.assert_array_equal(drawn, grid(expect["fc"][0]))


def test_infer_refuses_lean_options_on_a_classification_output(live):
    body = v2_json(images(1), ["fc"])
    body["outputs"][0]["parameters"] = {"classification": 2, "dtype": "float16"}
    rv = live.client.post("/v2/models/tiny/infer", json=body)
    assert rv.status_code == 400 and rv.json["field"] == "classification"
    body = v2_json(images(1), ["conv1", "fc"], lean={"*": {"png": True}})
    body["outputs"][1]["parameters"] = {"classification": 2}
    rv = live.client.post("/v2/models/tiny/infer", json=body)
    assert rv.status_code == 400 and "exempts it" in rv.json["error"]
    body["parameters"]["lean"]["fc"] = {}  # an empty entry exempts fc from "*"
    rv = live.client.post("/v2/models/tiny/infer", json=body)
    assert rv.status_code == 200, rv.json
    got = parse_v2(rv.data, rv.headers.get("Inference-Header-Content-Length"))
    assert got["conv1"].dtype == object and got["fc"].dtype == object  # PNGs, top-k strings


def test_uint8_outputs_cannot_be_ranked(api):
    body = with_options(v2_json(images(1), ["fc"]), {"fc": {"dtype": "uint8"}})
    job_id = finished(api, api.client.post("/v2/models/tiny/jobs", json=body))
    rv = api.client.get(f"/v2/jobs/{job_id}/result?format=json&top=2")
    assert rv.status_code == 400 and rv.json["field"] == "top"
