"""The web page at `/`: static HTML/JS/CSS, plus the two pictures the page needs that V2 lacks.

- `GET /` the page; `GET /ui/static/...` its script and styles (no CDN: everything ships here).
- `GET /ui/models/<name>/filters.png[?layer=NAME]` a conv layer's filters as colour tiles (as in
  Krizhevsky et al.'s figure); the first conv layer by default.
- `GET /ui/samples` and `/ui/samples/<file>` the demo's sample pictures, so a newcomer has
  something to drop; `GET /ui/demo/spec.json` and `/ui/demo/weights.npz` the demo model as
  upload-ready files, so a stack started without it (docker compose) gets it in one click.
With CONVQ_API_KEYS set, the model route wants the same bearer key as /v2 and shows only models
that key may see; the page itself, its assets, the samples and the demo files
are public.
"""

from __future__ import annotations

import functools
import hmac
import io
import json
import math
import threading
from collections import OrderedDict

import numpy as np
from flask import Blueprint, Response, current_app, g, jsonify, request, send_from_directory
from PIL import Image

from worker.contract.cache import ModelGone

from . import defaults
from .auth import api_keys, owner_id
from .demo import demo_images, demo_model
from .errors import BadRequest, NotFound, Unauthorized
from .names import resolve

bp = Blueprint("web", __name__, static_folder="static", static_url_path="/ui/static")

TILE_PX = 44  # on-screen side of one filter tile; 11x11 filters are drawn 4x
GAP_PX = 2
# (model, version, layer, limit) -> (PNG, filters in the layer); a model version is immutable
_filter_pngs: OrderedDict[tuple[str, int, str, int], tuple[bytes, int]] = OrderedDict()
_filter_lock = threading.Lock()
_FILTER_CACHE = 16


@bp.get("/")
def index():
    """Serve the page."""
    response = send_from_directory(bp.static_folder, "index.html")
    response.headers["Cache-Control"] = "no-cache"
    return response


def filter_tiles(
    w: np.ndarray, columns: int | None = None, limit: int = defaults.MAX_FILTERS_DRAWN
) -> Image.Image:
    """Draw conv weights w (K, FH, FW, C) as a grid of tiles, mid-grey at zero.

    Each filter is scaled by its own largest |weight| so weak and strong filters read alike;
    C == 3 is drawn as RGB, any other C as the grey mean over channels. Only the first
    limit filters (CONVQ_MAX_FILTERS_DRAWN) are drawn, and a tile is at most TILE_PX on a
    side (a bigger filter is sampled down), so the picture's cost is bounded whatever the
    layer's size.
    """
    w = w[: max(1, limit)]
    k, fh, fw, c = w.shape
    if max(fh, fw) > TILE_PX:  # sample big filters down before any arithmetic on them
        w = w[:, :: math.ceil(fh / TILE_PX), :: math.ceil(fw / TILE_PX)]
        k, fh, fw, c = w.shape
    tiles = w if c == 3 else w.mean(axis=3, keepdims=True)
    peak = np.abs(tiles).reshape(k, -1).max(axis=1)
    peak[peak == 0] = 1.0
    tiles = np.rint(np.clip(127.5 + 127.5 * tiles / peak[:, None, None, None], 0, 255))
    tiles = tiles.astype(np.uint8)
    if tiles.shape[3] == 1:
        tiles = np.repeat(tiles, 3, axis=3)
    columns = columns or max(1, min(k, math.ceil(math.sqrt(k * 1.5))))
    rows = math.ceil(k / columns)
    scale = max(1, TILE_PX // max(fh, fw))
    th, tw = fh * scale, fw * scale
    sheet = Image.new(
        "RGB", (columns * (tw + GAP_PX) + GAP_PX, rows * (th + GAP_PX) + GAP_PX), (24, 24, 24)
    )
    for i in range(k):
        tile = Image.fromarray(tiles[i]).resize((tw, th), Image.Resampling.NEAREST)
        r, col = divmod(i, columns)
        sheet.paste(tile, (GAP_PX + col * (tw + GAP_PX), GAP_PX + r * (th + GAP_PX)))
    return sheet


def _check_key() -> None:
    """Apply the /v2 bearer-key rule to a /ui route: sets g.owner, 401 without a valid key."""
    keys = api_keys()
    if not keys:
        g.owner = None
        return
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    matched = [k for k in keys if hmac.compare_digest(k.encode(), given.encode())]
    if scheme.lower() != "bearer" or not given or not matched:
        raise Unauthorized("send Authorization: Bearer <key>")
    g.owner = owner_id(matched[0])


def _conv_layer(spec: dict, wanted: str | None) -> dict:
    convs = [layer for layer in spec["layers"] if layer["type"] == "conv"]
    if wanted is None:
        if not convs:
            raise NotFound(f"model {spec['name']!r} has no conv layer to draw", field="layer")
        return convs[0]
    for layer in convs:
        if layer["name"] == wanted:
            return layer
    names = ", ".join(layer["name"] for layer in convs) or "none"
    raise BadRequest(f"layer {wanted!r} is not a conv layer; conv layers: {names}", field="layer")


@bp.get("/ui/models/<name>/filters.png")
def filters_png(name: str):
    """Draw a conv layer's filters (the first conv layer unless ?layer=NAME)."""
    _check_key()
    store = current_app.extensions["convq"].store
    found = resolve(store, name)
    if found is None:
        raise NotFound(f"model {name!r} not found")
    stored, info = found
    layer = _conv_layer(info["spec"], request.args.get("layer") or None)
    limit = max(1, int(current_app.config["MAX_FILTERS_DRAWN"]))
    key = (stored, int(info["version"]), layer["name"], limit)
    with _filter_lock:
        cached = _filter_pngs.get(key)
    if cached is None:
        models = current_app.extensions["convq"].models
        try:
            model = models.get(store, stored, int(info["version"]), info["spec"])
        except ModelGone:
            raise NotFound(f"model {name!r} was removed") from None
        buf = io.BytesIO()
        weights = model.arrays()[layer["weights"]]
        filter_tiles(weights, limit=limit).save(buf, format="PNG")
        cached = (buf.getvalue(), int(weights.shape[0]))
        with _filter_lock:
            _filter_pngs[key] = cached
            while len(_filter_pngs) > _FILTER_CACHE:
                _filter_pngs.popitem(last=False)
    png, total = cached
    response = Response(png, mimetype="image/png")
    response.headers["X-Convq-Layer"] = layer["name"]
    drawn = min(total, limit)
    response.headers["X-Convq-Filters"] = f"{drawn} of {total}"
    response.headers["Cache-Control"] = "private, max-age=60"
    return response


@functools.cache
def _samples() -> dict[str, bytes]:
    return dict(demo_images())  # drawn once per process: they never change


@functools.cache
def _demo_files() -> dict[str, bytes]:
    spec, arrays = demo_model()
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return {"spec.json": json.dumps(spec, indent=1).encode(), "weights.npz": buf.getvalue()}


@bp.get("/ui/demo/<filename>")
def demo_file(filename: str):
    """Serve the demo model as an upload-ready spec.json or weights.npz."""
    data = _demo_files().get(filename)
    if data is None:
        raise NotFound(f"no demo file {filename[:80]!r}; there are spec.json and weights.npz")
    mimetype = "application/json" if filename.endswith(".json") else "application/octet-stream"
    response = Response(data, mimetype=mimetype)
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


@bp.get("/ui/samples")
def samples():
    """List the sample pictures: {"samples": [{"name", "url"}]}."""
    return jsonify(samples=[{"name": n, "url": f"/ui/samples/{n}"} for n in _samples()])


@bp.get("/ui/samples/<filename>")
def sample(filename: str):
    """Serve one sample picture as PNG."""
    data = _samples().get(filename)
    if data is None:
        raise NotFound(f"no sample named {filename[:80]!r}")
    response = Response(data, mimetype="image/png")
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response
