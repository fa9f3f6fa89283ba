"""Turn an infer or jobs request into a queued job: parse, check against the model, enqueue.

Everything a worker could refuse is refused here first (shape, channels, outputs, output bytes),
so a bad request costs milliseconds and never reaches the queue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np
from flask import current_app, request

from engine import Model
from engine.explain import RESULTS as EXPLAIN_RESULTS
from engine.explain import check_request, result_bytes
from worker.contract import callbacks, lean
from worker.contract.cache import ModelGone
from worker.contract.queue import queue_depth, submit

from . import budget
from .auth import current_owner
from .body import read_body
from .codec import InferRequest, decode_infer, parse_header_length, parse_lean
from .context import convq
from .errors import BadRequest, NotFound, TooLarge, Unavailable, UnsupportedMediaType
from .images import stack_images
from .names import resolve

_V2_TYPES = ("", "application/json", "application/octet-stream")


@dataclass
class Target:
    """The model a request runs: name, version, validated Model."""

    name: str
    version: int
    model: Model
    stored: str = ""
    """The store's name (names.stored_name): what a job asks a worker to load."""


def find_model(name: str, version: str | None = None) -> Target:
    """Return the model name means to the caller (at version, when given); 404 otherwise."""
    ext = convq()
    found = resolve(ext.store, name)
    if found is None:
        raise NotFound(f"model {name[:80]!r} not found")
    stored, info = found
    if version not in (None, "", str(info["version"])):
        raise NotFound(
            f"model {name!r} has no version {version[:20]!r}; the current version "
            f"is {info['version']}"
        )
    try:
        model = ext.models.get(ext.store, stored, int(info["version"]), info["spec"])
    except ModelGone:
        raise NotFound(f"model {name!r} was removed") from None
    return Target(name, int(info["version"]), model, stored)


def _form_outputs() -> list[str] | Literal["all"] | None:
    fields = [v for raw in request.form.getlist("outputs") for v in raw.split(",") if v.strip()]
    if not fields:
        return None
    return "all" if [f.strip() for f in fields] == ["all"] else [f.strip() for f in fields]


def _multipart(model: Model) -> InferRequest:
    cfg = current_app.config
    files = [
        (f.filename or f"images[{i}]", f.read())
        for i, f in enumerate(request.files.getlist("images"))
    ]
    unknown = sorted(set(request.files) - {"images"})
    unknown += sorted(set(request.form) - {"outputs", "explain", "lean", "callback"})
    if unknown:
        raise BadRequest(
            f"unknown form field(s) {', '.join(unknown)}; send images, outputs, explain, lean "
            "and callback",
            field=unknown[0],
        )
    if len(request.form.getlist("callback")) > 1:
        raise BadRequest("give one callback URL", field="callback")
    requested = parse_lean(request.form["lean"], "the lean field") if "lean" in request.form else {}
    explain = None
    if "explain" in request.form:
        try:
            explain = json.loads(request.form["explain"])
        except ValueError:
            raise BadRequest("the explain field must be JSON", field="explain") from None
        if not isinstance(explain, dict):
            raise BadRequest(
                'explain must be an object {"method", "layer", "channel"}', field="explain"
            )
    outputs = _form_outputs()
    resolved = model.resolve_outputs(outputs)

    def check(n: int, h: int, w: int, c: int) -> None:
        check_shape(model, n, h, w, c)
        check_cost(model, n, h, w, resolved, check_lean(model, requested, resolved, h, w))

    images = stack_images(
        files,
        channels=model.input_shape[2],
        max_pixels=int(cfg["MAX_PIXELS"]),
        max_images=int(cfg["MAX_IMAGES"]),
        check=check,
    )
    return InferRequest(
        images=images,
        outputs=outputs,
        explain=explain,
        lean=requested,
        callback=request.form.get("callback"),
    )


def parse_request(model: Model) -> InferRequest:
    """Decode the body (V2 JSON, V2 binary, or multipart images) into images and outputs."""
    if request.mimetype == "multipart/form-data":
        return _multipart(model)
    if request.mimetype not in _V2_TYPES:
        raise UnsupportedMediaType(
            f"send a V2 inference request (application/json, or the "
            f"binary extension) or multipart/form-data, not "
            f"{request.mimetype}"
        )
    body = read_body(int(current_app.config["MAX_CONTENT_LENGTH"]))
    length = parse_header_length(request.headers.get("Inference-Header-Content-Length"), len(body))
    json_bytes = len(body) if length is None else length
    if json_bytes > int(current_app.config["MAX_JSON_INPUT_BYTES"]):
        raise TooLarge(
            f"{json_bytes} bytes of JSON; the limit is "
            f"{current_app.config['MAX_JSON_INPUT_BYTES']}: send big tensors with the "
            "binary tensor extension (Inference-Header-Content-Length)",
            field="data",
        )
    return decode_infer(body, length)


def check_shape(model: Model, n: int, h: int, w: int, c: int) -> None:
    """Check a batch's shape against the limits and what the model takes (no pixel is read)."""
    cfg = current_app.config
    if n > int(cfg["MAX_IMAGES"]):
        raise TooLarge(f"{n} images in one job; the limit is {cfg['MAX_IMAGES']}", field="shape")
    if h * w > int(cfg["MAX_PIXELS"]):
        raise TooLarge(
            f"{h}x{w} images are over the limit of {cfg['MAX_PIXELS']} pixels", field="shape"
        )
    want_h, want_w, want_c = model.input_shape
    if c != want_c:
        raise BadRequest(f"the model takes {want_c} channels, the images have {c}", field="shape")
    if (want_h, want_w) != (None, None) and (h, w) != (want_h, want_w):
        raise BadRequest(f"the model takes {want_h}x{want_w} images, got {h}x{w}", field="shape")
    model.output_shapes(h, w)  # ShapeError (400) if the layers do not fit this size


def check_lean(
    model: Model, requested: dict, outputs: list[str], h: int, w: int
) -> dict[str, dict]:
    """Return the lean options {output: checked options} of a run of h x w images; 400 if bad."""
    if not requested:
        return {}
    shapes = model.output_shapes(h, w)
    try:
        checked = lean.check_all(requested, outputs, shapes)
    except lean.LeanError as exc:
        raise BadRequest(str(exc), field=exc.field) from None
    limit = int(current_app.config["MAX_PNG_PIXELS"])
    for name, opts in checked.items():
        hh, ww, k = lean.lean_shape(shapes[name], opts)
        if opts.get("png") and hh * ww * k > limit:
            raise TooLarge(
                f"output {name!r}: png: {hh}x{ww}x{k} maps are too big to draw (limit {limit} "
                "pixels); ask for fewer channels or a crop",
                field="png",
            )
    return checked


def output_bytes(
    model: Model, n: int, h: int, w: int, outputs: list[str], leaned: dict | None = None
) -> int:
    """Return the bytes a run's outputs take as stored: lean where leaned says, else float32."""
    shapes = model.output_shapes(h, w)
    leaned = leaned or {}
    return sum(
        lean.stored_bytes(n, shapes[name], leaned[name])
        if name in leaned
        else model.output_bytes(n, h, w, [name])
        for name in outputs
    )


def check_cost(
    model: Model, n: int, h: int, w: int, outputs: list[str], leaned: dict | None = None
) -> int:
    """Refuse (413) a run whose stored outputs or working memory pass the limits; return the
    outputs' stored bytes (lean options leaned counted as they are stored)."""
    cfg = current_app.config
    predicted = output_bytes(model, n, h, w, outputs, leaned)
    if predicted > int(cfg["MAX_OUTPUT_BYTES"]):
        raise TooLarge(
            f"the requested outputs would take {predicted} bytes; the limit is "
            f"{cfg['MAX_OUTPUT_BYTES']} (ask for fewer layers or images, or lean results: "
            "channels, crop, dtype, stats, png)",
            field="outputs",
        )
    peak = model.peak_bytes(n, h, w, outputs)
    if peak > int(cfg["MAX_RUN_BYTES"]):
        raise TooLarge(
            f"the run would hold up to {peak} bytes at once (input, layer outputs and "
            f"scratch); the limit is {cfg['MAX_RUN_BYTES']} (send fewer or smaller images)",
            field="images",
        )
    return predicted


def check_images(model: Model, images: np.ndarray) -> np.ndarray:
    """Return images as (N, H, W, C) after checking them against what the model takes."""
    if images.ndim == 3:
        images = images[..., None]
    check_shape(model, *images.shape)
    if images.dtype == np.float32 and not np.isfinite(images).all():
        raise BadRequest("FP32 images must be finite (no NaN or infinity)", field="data")
    return images


def check_callback(url: str) -> str:
    """Return url if a job's callback may go there (callbacks.check); 400 saying why not."""
    try:
        return callbacks.check(url, convq().callback_allow).url
    except callbacks.CallbackRefused as exc:
        raise BadRequest(str(exc), field="callback") from None


def enqueue(
    target: Target, parsed: InferRequest, meta: dict | None = None
) -> tuple[str, list, dict]:
    """Check parsed against the model and the limits, then queue it.

    Return (job id, the names its result will hold, its checked lean options).
    """
    cfg, ext = current_app.config, convq()
    images = check_images(target.model, parsed.images)
    outputs = target.model.resolve_outputs(parsed.outputs)
    n, h, w, _ = images.shape
    leaned = check_lean(target.model, parsed.lean, outputs, h, w)
    job_bytes = images.nbytes + check_cost(target.model, n, h, w, outputs, leaned)
    explain = None
    if parsed.explain is not None:
        explain = check_request(target.model, parsed.explain, (h, w))  # ModelError: 400
        job_bytes += result_bytes(target.model, n, h, w, explain)
    job_meta = {"model": target.name, **(meta or {})}
    if parsed.callback is not None:
        job_meta["callback"] = check_callback(parsed.callback)
    retry = int(cfg["RETRY_AFTER"])
    if queue_depth(ext.queue) >= int(cfg["MAX_QUEUE"]):
        raise Unavailable(
            f"the queue is full ({cfg['MAX_QUEUE']} jobs); retry later", retry_after=retry
        )
    owner = current_owner()
    budget.check(
        ext.redis,
        owner,
        job_bytes,
        max_jobs=int(cfg["MAX_KEY_JOBS"]),
        max_bytes=int(cfg["MAX_KEY_STORED_BYTES"]),
        retry_after=retry,
    )
    ttl = ext.settings.result_ttl + ext.settings.job_timeout
    job_id = submit(
        ext.queue,
        ext.store,
        model=target.stored or target.name,
        version=target.version,
        images=np.ascontiguousarray(images),
        outputs=list(outputs),
        owner=owner,
        meta=job_meta,
        job_timeout=ext.settings.job_timeout,
        retries=ext.settings.retries,
        explain=explain,
        lean=leaned or None,
        also_write=lambda pipe, job_id: budget.record(pipe, owner, job_id, job_bytes, ttl),
    )
    names = [*outputs, *(x for name, opts in leaned.items() for x in lean.extras(name, opts))]
    return job_id, names if explain is None else [*names, *EXPLAIN_RESULTS], leaned
