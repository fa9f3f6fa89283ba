"""Turn an infer or jobs request into a queued job: parse, check against the model, enqueue.

Everything a worker could refuse is refused here first (shape, channels, outputs, output bytes),
so a bad request costs milliseconds and never reaches the queue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flask import current_app, request

from engine import Model
from worker.contract.queue import queue_depth, submit

from .app import convq
from .auth import current_owner
from .body import read_body
from .codec import InferRequest, decode_infer, parse_header_length
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
    model = ext.models.get(ext.store, stored, int(info["version"]), info["spec"])
    if model is None:
        raise NotFound(f"model {name!r} was removed")
    return Target(name, int(info["version"]), model, stored)


def _multipart(model: Model) -> InferRequest:
    cfg = current_app.config
    files = [
        (f.filename or f"images[{i}]", f.read())
        for i, f in enumerate(request.files.getlist("images"))
    ]
    unknown = sorted(set(request.files) - {"images"})
    unknown += sorted(set(request.form) - {"outputs"})
    if unknown:
        raise BadRequest(
            f"unknown form field(s) {', '.join(unknown)}; send images and outputs", field=unknown[0]
        )
    channels = model.input_shape[2]
    images = stack_images(
        files,
        channels=channels,
        max_pixels=int(cfg["MAX_PIXELS"]),
        max_images=int(cfg["MAX_IMAGES"]),
    )
    outputs: list[str] | str | None = None
    fields = [v for raw in request.form.getlist("outputs") for v in raw.split(",") if v.strip()]
    if fields:
        outputs = "all" if [f.strip() for f in fields] == ["all"] else [f.strip() for f in fields]
    return InferRequest(images=images, outputs=outputs)


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


def check_images(model: Model, images: np.ndarray) -> np.ndarray:
    """Return images as (N, H, W, C) after checking them against what the model takes."""
    cfg = current_app.config
    if images.ndim == 3:
        images = images[..., None]
    n, h, w, c = images.shape
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
    if images.dtype == np.float32 and not np.isfinite(images).all():
        raise BadRequest("FP32 images must be finite (no NaN or infinity)", field="data")
    return images


def enqueue(target: Target, parsed: InferRequest, meta: dict | None = None) -> tuple[str, list]:
    """Check parsed against the model and the limits, then queue it; return (job id, outputs)."""
    cfg, ext = current_app.config, convq()
    images = check_images(target.model, parsed.images)
    outputs = target.model.resolve_outputs(parsed.outputs)
    n, h, w, _ = images.shape
    predicted = target.model.output_bytes(n, h, w, outputs)
    if predicted > int(cfg["MAX_OUTPUT_BYTES"]):
        raise TooLarge(
            f"the requested outputs would take {predicted} bytes; the limit is "
            f"{cfg['MAX_OUTPUT_BYTES']} (ask for fewer layers or images)",
            field="outputs",
        )
    retry = int(cfg["RETRY_AFTER"])
    if queue_depth(ext.queue) >= int(cfg["MAX_QUEUE"]):
        raise Unavailable(
            f"the queue is full ({cfg['MAX_QUEUE']} jobs); retry later", retry_after=retry
        )
    job_id = submit(
        ext.queue,
        ext.store,
        model=target.stored or target.name,
        version=target.version,
        images=np.ascontiguousarray(images),
        outputs=list(outputs),
        owner=current_owner(),
        meta={"model": target.name, **(meta or {})},
        job_timeout=ext.settings.job_timeout,
        retries=ext.settings.retries,
    )
    return job_id, list(outputs)
