"""The web page and its /ui routes, in-process on fakeredis, plus the API calls the page makes."""

from __future__ import annotations

import io
import re
from pathlib import Path

import fakeredis
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.demo import demo_model, filter_labels
from service.web import GAP_PX, filter_tiles
from worker.runner import burst

STATIC = Path(__file__).resolve().parents[2] / "service" / "static"


def npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def upload(client, name, spec, arrays, key=None):
    import json

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = {
        "spec": (io.BytesIO(json.dumps(spec).encode()), "spec.json"),
        "weights": (io.BytesIO(npz(arrays)), "weights.npz"),
    }
    return client.post(f"/v2/repository/models/{name}/load", data=data, headers=headers)


@pytest.fixture
def redis_conn():
    return fakeredis.FakeRedis()


@pytest.fixture
def app(redis_conn):
    return create_app({"REDIS": redis_conn, "TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def demo(client):
    assert upload(client, "demo", *demo_model()).status_code == 200
    return client


def png(resp) -> Image.Image:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.mimetype == "image/png"
    return Image.open(io.BytesIO(resp.data))


def get_closed(client, path):
    """GET path and close the response (file-backed answers hold an open file until closed)."""
    resp = client.get(path)
    resp.get_data()
    resp.close()
    return resp


def test_page_and_assets_are_served(client):
    page = get_closed(client, "/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', html)
    assert sorted(assets) == ["/ui/static/app.js", "/ui/static/style.css"]
    for asset in assets:
        assert get_closed(client, asset).status_code == 200, asset
    js = get_closed(client, "/ui/static/app.js")
    assert js.mimetype in ("text/javascript", "application/javascript")


def test_page_loads_nothing_from_elsewhere():
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), path.name
        assert not re.search(r"""(fetch|import)\(\s*["'`]https?://""", text), path.name
        assert "@import url(http" not in text, path.name


def test_every_element_the_script_uses_is_on_the_page():
    html = (STATIC / "index.html").read_text()
    ids = set(re.findall(r'id="([^"]+)"', html))
    used = set(re.findall(r'\$\("([^"]+)"\)', (STATIC / "app.js").read_text()))
    assert used and used <= ids, used - ids


def test_filter_tiles_draw_zero_as_grey_and_keep_colour():
    w = np.zeros((3, 2, 2, 3), np.float32)
    w[1, ..., 0] = 1.0  # all red
    w[2, 0, 0] = [-1.0, 0.0, 0.0]  # one pixel of "minus red"
    sheet = np.asarray(filter_tiles(w, columns=3))
    scale = 44 // 2

    def pixel(tile, y, x):
        return tuple(sheet[GAP_PX + y * scale, GAP_PX + tile * (2 * scale + GAP_PX) + x * scale])

    assert pixel(0, 1, 1) == (128, 128, 128)  # an all-zero filter is mid grey
    assert pixel(1, 0, 0) == (255, 128, 128)
    assert pixel(2, 0, 0) == (0, 128, 128)
    assert sheet.shape == (2 * GAP_PX + 2 * scale, 4 * GAP_PX + 3 * 2 * scale, 3)


def test_filters_png_shows_the_demo_filters_as_labelled(demo):
    image = png(demo.get("/ui/models/demo/filters.png"))
    assert demo.get("/ui/models/demo/filters.png").headers["X-Convq-Layer"] == "conv1"
    tile, step, columns = 44, 44 + GAP_PX, 12
    assert image.size == (columns * step + GAP_PX, 8 * step + GAP_PX)
    sheet = np.asarray(image).astype(int)

    def tile_of(label: str) -> np.ndarray:
        i = filter_labels().index(label)
        r, c = divmod(i, columns)
        return sheet[GAP_PX + r * step :][:tile, GAP_PX + c * step :][:, :tile]

    red = tile_of("colour blob hue 0deg")[tile // 2, tile // 2]
    assert red[0] > red[1] + 60 and red[0] > red[2] + 60
    vertical = tile_of("luminance edge 90deg odd l=6.5px")[..., 0]
    # a vertical edge detector changes across x, not down y
    assert np.abs(np.diff(vertical, axis=1)).sum() > 5 * np.abs(np.diff(vertical, axis=0)).sum()
    assert np.ptp(tile_of("luminance edge 90deg odd l=6.5px"), axis=2).max() <= 2  # grey


def test_filters_png_errors_are_json(demo):
    resp = demo.get("/ui/models/nope/filters.png")
    assert resp.status_code == 404 and "nope" in resp.get_json()["error"]
    resp = demo.get("/ui/models/demo/filters.png?layer=relu1")
    assert resp.status_code == 400 and resp.get_json()["field"] == "layer"
    assert "conv1" in resp.get_json()["error"]
    pool_only = {
        "name": "p",
        "input": {"channels": 1},
        "layers": [{"name": "pool", "type": "maxpool", "size": 2}],
    }
    assert upload(demo, "p", pool_only, {}).status_code == 200
    resp = demo.get("/ui/models/p/filters.png")
    assert resp.status_code == 404 and "no conv layer" in resp.get_json()["error"]


def test_filters_png_follows_api_keys(redis_conn):
    app = create_app(
        {"REDIS": redis_conn, "TESTING": True, "API_KEYS": "alice-0123456789ab,bob-0123456789abcd"}
    )
    client = app.test_client()
    assert upload(client, "mine", *demo_model(), key="alice-0123456789ab").status_code == 200
    assert client.get("/ui/models/mine/filters.png").status_code == 401
    bad = client.get("/ui/models/mine/filters.png", headers={"Authorization": "Bearer eve"})
    assert bad.status_code == 401 and "error" in bad.get_json()
    other = client.get(
        "/ui/models/mine/filters.png", headers={"Authorization": "Bearer bob-0123456789abcd"}
    )
    assert other.status_code == 404
    png(
        client.get(
            "/ui/models/mine/filters.png", headers={"Authorization": "Bearer alice-0123456789ab"}
        )
    )
    assert get_closed(client, "/").status_code == 200  # the page itself stays public


def test_samples_are_listed_and_served(client):
    listed = client.get("/ui/samples").get_json()["samples"]
    assert [s["name"] for s in listed] == [
        "scene.png",
        "stripes.png",
        "colour-blobs.png",
        "rings.png",
    ]
    for s in listed:
        assert png(client.get(s["url"])).size == (227, 227)
    resp = client.get("/ui/samples/..%2Fapp.py")
    assert resp.status_code == 404 and "error" in resp.get_json()


def test_the_pages_calls_end_in_one_grid_per_layer(demo, redis_conn):
    """Replay what app.js does: index, metadata, submit with outputs=all, poll, fetch grids."""
    models = demo.post("/v2/repository/index", json={}).get_json()
    assert [m["name"] for m in models] == ["demo"]
    meta = demo.get("/v2/models/demo").get_json()
    assert meta["inputs"][0]["shape"] == [-1, 227, 227, 3]
    stripes = demo.get("/ui/samples/stripes.png").data
    resp = demo.post(
        "/v2/models/demo/jobs",
        data={"images": (io.BytesIO(stripes), "stripes.png"), "outputs": "all"},
    )
    assert resp.status_code == 202, resp.get_data(as_text=True)
    job = resp.get_json()["id"]
    assert demo.get(f"/v2/jobs/{job}").get_json()["status"] == "queued"
    burst(redis_conn)
    status = demo.get(f"/v2/jobs/{job}").get_json()
    assert status["status"] == "finished", status
    names = status.get("outputs") or [o["name"] for o in meta["outputs"]]
    assert names == ["conv1", "relu1", "pool1"]
    sizes = {}
    for name in names:
        grid = png(demo.get(f"/v2/jobs/{job}/result?output={name}&format=png&image=0"))
        sizes[name] = grid.size
        assert np.asarray(grid).std() > 0  # the maps are not blank
    assert sizes["conv1"] == sizes["relu1"]


def test_the_pages_default_png_job_draws_the_grids_of_a_float32_job(demo, redis_conn):
    """What app.js sends by default (lean png) gives the very grids of the float32 maps."""
    assert '{ "*": { png: true } }' in (STATIC / "app.js").read_text()
    stripes = demo.get("/ui/samples/stripes.png").data
    jobs = {}
    for kind, lean in (("float32", None), ("png", '{"*": {"png": true}}')):
        data = {"images": (io.BytesIO(stripes), "stripes.png"), "outputs": "all"}
        if lean:
            data["lean"] = lean
        resp = demo.post("/v2/models/demo/jobs", data=data)
        assert resp.status_code == 202, resp.get_data(as_text=True)
        jobs[kind] = resp.get_json()["id"]
    burst(redis_conn)
    for name in ("conv1", "relu1", "pool1"):
        drawn = [
            demo.get(f"/v2/jobs/{jobs[kind]}/result?output={name}&format=png&image=0")
            for kind in ("float32", "png")
        ]
        assert drawn[0].status_code == drawn[1].status_code == 200
        assert drawn[0].data == drawn[1].data
    # the png job stores the pictures only: far fewer bytes than the float32 maps
    store = demo.application.extensions["convq"].store
    sizes = {
        kind: sum(store.result_nbytes(job, n) for n in ("conv1", "relu1", "pool1"))
        for kind, job in jobs.items()
    }
    assert sizes["png"] * 4 < sizes["float32"]


def test_demo_model_files_upload_as_they_are(client):
    spec = client.get("/ui/demo/spec.json")
    weights = client.get("/ui/demo/weights.npz")
    assert spec.status_code == 200 and spec.get_json() == demo_model()[0]
    with np.load(io.BytesIO(weights.data), allow_pickle=False) as arrays:
        np.testing.assert_array_equal(arrays["conv1.w"], demo_model()[1]["conv1.w"])
    data = {
        "spec": (io.BytesIO(spec.data), "spec.json"),
        "weights": (io.BytesIO(weights.data), "weights.npz"),
    }
    assert client.post("/v2/repository/models/demo/load", data=data).status_code == 200
    assert client.get("/ui/demo/secrets.txt").status_code == 404


def _conv_only(k: int, size: int) -> tuple[dict, dict]:
    spec = {
        "name": "wide",
        "input": {"channels": 1},
        "layers": [{"name": "c", "type": "conv", "filters": k, "size": size, "weights": "c.w"}],
    }
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((k, size, size, 1)).astype(np.float32)
    return spec, {"c.w": weights, "c.b": np.zeros(k, np.float32)}


def test_filters_png_draws_at_most_max_filters_and_says_so(client):
    from service.defaults import MAX_FILTERS_DRAWN

    assert upload(client, "wide", *_conv_only(MAX_FILTERS_DRAWN * 3, 1)).status_code == 200
    resp = client.get("/ui/models/wide/filters.png")
    assert resp.headers["X-Convq-Filters"] == f"{MAX_FILTERS_DRAWN} of {MAX_FILTERS_DRAWN * 3}"
    image = png(resp)
    columns = (image.size[0] - GAP_PX) // (44 + GAP_PX)
    rows = (image.size[1] - GAP_PX) // (44 + GAP_PX)
    assert columns * rows >= MAX_FILTERS_DRAWN > columns * (rows - 1)


def test_filters_png_limit_comes_from_the_configuration(redis_conn):
    client = create_app(
        {"REDIS": redis_conn, "TESTING": True, "MAX_FILTERS_DRAWN": 5}
    ).test_client()
    assert upload(client, "wide", *_conv_only(12, 1)).status_code == 200
    resp = client.get("/ui/models/wide/filters.png")
    assert resp.headers["X-Convq-Filters"] == "5 of 12"


def test_filters_png_samples_big_filters_down_to_one_tile(client):
    assert upload(client, "big", *_conv_only(2, 200)).status_code == 200
    resp = client.get("/ui/models/big/filters.png")
    assert resp.headers["X-Convq-Filters"] == "2 of 2"
    width, height = png(resp).size
    assert height <= 44 + 2 * GAP_PX and width <= 2 * (44 + GAP_PX) + GAP_PX
