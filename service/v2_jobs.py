"""V2 inference and the jobs extension: submit, wait (infer), status, results, cancel."""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator

import numpy as np
from flask import Blueprint, Response, current_app, request, url_for

from engine.explain import OVERLAY as EXPLAIN_OVERLAY
from engine.npy import npy_header
from worker.contract.lean import parameters as lean_parameters
from worker.contract.queue import ENDED, cancel, job_status, list_jobs, wait_for_end

from . import budget
from .auth import check_visible, current_owner
from .classify import top_k
from .codec import DATATYPES, OutputData, Streamed, encode_infer, iter_body
from .context import convq
from .errors import (
    ApiError,
    BadRequest,
    Conflict,
    InferTimeout,
    JobFailed,
    NotFound,
    TooLarge,
)
from .render import grid_png, rgb_png
from .submit import check_lean, enqueue, find_model, output_bytes, parse_request

bp = Blueprint("v2_jobs", __name__, url_prefix="/v2")
log = logging.getLogger(__name__)

JOB_ID = re.compile(r"[0-9a-f]{32}")
FORMATS = ("binary", "json", "npy", "png")


def _status(job_id: str) -> dict:
    """Return the caller's job status; 404 for unknown ids and other keys' jobs."""
    status = job_status(convq().queue, job_id) if JOB_ID.fullmatch(job_id) else None
    if status is None:
        raise NotFound(f"job {job_id[:40]!r} not found (unknown, expired or deleted)")
    check_visible(status.get("owner"), f"job {job_id!r}")
    return status


def _public(status: dict) -> dict:
    return {k: v for k, v in status.items() if k != "owner"}


def _v2_body(
    job_id: str,
    status: dict,
    names: list[str],
    binary: set[str],
    request_id: str | None = None,
    classes: dict[str, int] | None = None,
    labels: dict[str, list[str]] | None = None,
    index: dict | None = None,
) -> tuple[Iterator[bytes], dict]:
    """Return (body iterator, headers) of a V2 inference response with the job's outputs names.

    Binary outputs are read from Redis in slices while the body is sent, never assembled;
    an output in classes is sent as its top-k strings (labels: output -> class names). Lean
    outputs (status["lean"]) carry their datatype and the parameters that say how to read them;
    byte strings (png) are always binary. index: the result's index (Store.result_index), when
    the caller has read it already.
    """
    classes, labels, lean = classes or {}, labels or {}, status.get("lean") or {}
    store = convq().store
    if index is None:
        found = store.result_index(job_id)
        if found is None:
            raise NotFound(f"the result of job {job_id} has expired")
        index = found[1]
    layouts = {}
    for name in names:
        layout = store.result_layout(job_id, name, index)
        if layout is None:
            raise NotFound(f"the result of job {job_id} has expired")
        layouts[name] = layout
    binary = binary | {n for n in names if layouts[n][1].kind == "O" and n not in classes}
    plain = [n for n in names if n not in binary and n not in classes]
    _check_json_size(sum(_nbytes(*layouts[n]) for n in plain))
    outputs: list[tuple] = []
    for name in names:
        shape, dtype = layouts[name]
        if name in classes:
            array = store.result_array(job_id, name, index)
            if array is None:
                raise NotFound(f"the result of job {job_id} has expired")
            rows = top_k(array, classes[name], labels.get(name))
            outputs.append((name, (len(rows), len(rows[0]) if rows else 0), sum(rows, [])))
            continue
        data: OutputData | None
        if name in binary:
            pieces = store.result_slices(job_id, name, index)
            size = store.result_nbytes(job_id, name, index)
            data = None if pieces is None or size is None else Streamed(size, pieces)
        else:
            array = store.result_array(job_id, name, index)
            data = None if array is None else np.ascontiguousarray(array).data.cast("B")
        if data is None:
            raise NotFound(f"the result of job {job_id} has expired")
        params = lean_parameters(name, lean.get(name) or {})
        outputs.append((name, shape, data, DATATYPES[dtype.str], params))
    chunks, headers = encode_infer(status["model"], status["version"], outputs, binary, request_id)
    return iter_body(chunks), headers


def _labels(model) -> dict[str, list[str]]:
    """Return {last layer: its class labels} when the model carries labels, else {}."""
    labels = model.spec.get("labels")
    return {model.layer_names[-1]: list(labels)} if labels else {}


def _job_labels(status: dict) -> dict[str, list[str]]:
    """Return _labels of the model version the job ran on; {} when it is gone."""
    try:
        return _labels(find_model(status["model"], str(status["version"])).model)
    except ApiError:
        return {}


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


def _check_json_size(nbytes: int) -> None:
    limit = int(current_app.config["MAX_JSON_OUTPUT_BYTES"])
    if nbytes > limit:
        raise TooLarge(
            f"{nbytes} bytes of outputs are too many to send as JSON numbers (limit "
            f"{limit}); ask for binary_data (or format=binary / format=npy)",
            field="binary_data",
        )


@bp.post("/models/<name>/infer")
@bp.post("/models/<name>/versions/<version>/infer")
def infer(name: str, version: str | None = None):
    began = time.perf_counter()
    ext, cfg = convq(), current_app.config
    target = find_model(name, version)
    parsed = parse_request(target.model)
    if parsed.callback is not None:
        raise BadRequest(
            "a callback applies to jobs (POST /v2/models/{m}/jobs); /infer answers with the "
            "result itself",
            field="callback",
        )
    parsed_at = time.perf_counter()
    # V2: an output is binary if it asks, else if the request asks; JSON requests get JSON.
    default = parsed.binary_default
    if default is None:
        default = request.headers.get("Inference-Header-Content-Length") is not None
    wanted = target.model.resolve_outputs(parsed.outputs)
    classes = parsed.classification
    binary = {n for n in wanted if parsed.binary.get(n, default) and n not in classes}
    as_json = [n for n in wanted if n not in binary and n not in classes]
    images = parsed.images if parsed.images.ndim == 4 else parsed.images[..., None]
    n, h, w = images.shape[:3]
    leaned = check_lean(target.model, parsed.lean, wanted, h, w)
    leaned_classes = sorted(set(classes) & set(leaned))
    if leaned_classes:
        raise BadRequest(
            f"output {leaned_classes[0]!r}: classification ranks the float32 result; it takes "
            f'no lean options (an empty entry, "{leaned_classes[0]}": {{}}, exempts it from "*")',
            field="classification",
        )
    if as_json:
        _check_json_size(output_bytes(target.model, n, h, w, as_json, leaned))
    job_id, outputs, _ = enqueue(target, parsed)
    binary |= {n for n in outputs if n not in wanted and default}  # an explanation's arrays
    enqueued_at = time.perf_counter()
    status = wait_for_end(ext.queue, job_id, time.monotonic() + float(cfg["INFER_TIMEOUT"]))
    if status is False:
        cancel(ext.queue, ext.store, job_id)
        budget.release(ext.redis, current_owner(), job_id)
        raise InferTimeout(
            f"the job did not finish within {cfg['INFER_TIMEOUT']} s; submit "
            "it to /v2/models/{m}/jobs to wait without a deadline"
        )
    try:
        if status is None or status["status"] != "finished":
            error = (status or {}).get("error") or "the job was canceled"
            raise JobFailed(f"the job failed: {error}")
        labels = _labels(target.model)
        body, headers = _v2_body(job_id, status, outputs, binary, parsed.id, classes, labels)
    except Exception:
        cancel(ext.queue, ext.store, job_id)
        budget.release(ext.redis, current_owner(), job_id)
        raise
    timings = status["timings"]
    spans = [("read", parsed_at - began), ("submit", enqueued_at - parsed_at)]
    spans += [(key, timings.get(key + "_seconds")) for key in ("queue", "compute")]
    spans.append(("infer", time.perf_counter() - began))  # this view, from body to answer
    headers["Server-Timing"] = ", ".join(
        f"{key};dur={1000 * seconds:.2f}" for key, seconds in spans if seconds is not None
    )
    response = Response(body, status=200, headers=headers)
    # An infer result is read once: free it, but after the answer is on its way.
    owner = current_owner()  # read now: the request context is gone when the answer is sent
    response.call_on_close(lambda: _after_answer(_forget, ext, job_id, owner))
    return response


def _after_answer(fn, *args) -> None:
    """Run fn(*args) now that the answer is sent; under gevent (gunicorn's worker) in a
    greenlet of its own, so the connection's next request is read while its Redis round trips
    wait (it held a client that posts back to back ~4 ms per request)."""
    gevent, monkey = sys.modules.get("gevent"), sys.modules.get("gevent.monkey")
    if gevent is not None and monkey is not None and monkey.is_module_patched("socket"):
        gevent.spawn(fn, *args)
    else:
        fn(*args)


def _forget(ext, job_id: str, owner: str | None) -> None:
    try:
        cancel(ext.queue, ext.store, job_id)
        budget.release(ext.redis, owner, job_id)
    except Exception:  # noqa: BLE001 - the answer is sent; the TTLs clean up what is left
        log.warning("could not delete infer job %s", job_id, exc_info=True)


@bp.post("/models/<name>/jobs")
def submit_job(name: str):
    target = find_model(name)
    parsed = parse_request(target.model)
    if parsed.classification:
        raise BadRequest(
            "the classification extension applies to /infer; a job ranks its results when "
            "they are read: GET /v2/jobs/{id}/result?format=json&top=K",
            field="classification",
        )
    job_id, outputs, leaned = enqueue(target, parsed)
    location = url_for("v2_jobs.get_job", job_id=job_id)
    return (
        {
            "id": job_id,
            "status": "queued",
            "model": target.name,
            "version": target.version,
            "outputs": outputs,
            **({"lean": leaned} if leaned else {}),
        },
        202,
        {"Location": location},
    )


LIST_LIMIT = 100
"""Jobs per page of GET /v2/jobs unless limit says otherwise (at most LIST_MAX)."""

LIST_MAX = 1000

STATUSES = ("queued", "started", *ENDED)


@bp.get("/jobs")
def list_own_jobs():
    """The caller's jobs, newest first, a page at a time (next: the cursor of the next page)."""
    args = request.args
    unknown = sorted(set(args) - {"status", "model", "limit", "cursor"})
    if unknown:
        raise BadRequest(f"unknown query parameter(s) {', '.join(unknown)}", field=unknown[0])
    repeated = sorted(k for k in args if len(args.getlist(k)) > 1)
    if repeated:
        raise BadRequest(
            f"query parameter {repeated[0]} is given more than once", field=repeated[0]
        )
    status = args.get("status") or None
    if status is not None and status not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}", field="status")
    model = args.get("model") or None
    if model is not None and len(model) > 200:
        raise BadRequest("model is not a model name (too long)", field="model")
    raw = args.get("limit", str(LIST_LIMIT))
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not 0 < int(raw) <= LIST_MAX:
        raise BadRequest(f"limit must be an integer from 1 to {LIST_MAX}", field="limit")
    ext = convq()
    try:
        items, cursor = list_jobs(
            ext.queue,
            current_owner(),
            status=status,
            model=model,
            limit=int(raw),
            cursor=args.get("cursor"),
        )
    except ValueError:
        raise BadRequest("cursor is not the next of a previous page", field="cursor") from None
    return {"jobs": items, "next": cursor}


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    return _public(_status(job_id))


@bp.delete("/jobs/<job_id>")
def delete_job(job_id: str):
    status = _status(job_id)
    ext = convq()
    cancel(ext.queue, ext.store, job_id)
    budget.release(ext.redis, status.get("owner"), job_id)
    was = status["status"]
    return {"id": job_id, "status": "canceled" if was in ("queued", "started") else "deleted"}


def _query() -> tuple[str, list[str], int, int | None]:
    args = request.args
    unknown = sorted(set(args) - {"format", "output", "image", "top"})
    if unknown:
        raise BadRequest(f"unknown query parameter(s) {', '.join(unknown)}", field=unknown[0])
    repeated = sorted(k for k in ("format", "output", "image") if len(args.getlist(k)) > 1)
    if repeated:
        raise BadRequest(
            f"query parameter {repeated[0]} is given more than once; list outputs with commas "
            "(output=a,b)",
            field=repeated[0],
        )
    fmt = args.get("format", "binary")
    if fmt not in FORMATS:
        raise BadRequest(f"format must be one of {', '.join(FORMATS)}", field="format")
    outputs = [o for raw in args.getlist("output") for o in raw.split(",") if o]
    image = args.get("image", "0")
    if not (image.isascii() and image.isdigit()) or len(image) > 9:
        raise BadRequest("image must be an image index (0, 1, ...)", field="image")
    if fmt in ("npy", "png") and len(outputs) != 1:
        raise BadRequest(f"format={fmt} needs exactly one output=NAME", field="output")
    top = args.get("top")
    if top is not None and (fmt != "json" or not top.isdigit() or not 0 < int(top) <= 10**6):
        raise BadRequest(
            "top=K (a positive integer) ranks outputs as classification strings with format=json",
            field="top",
        )
    return fmt, outputs, int(image), None if top is None else int(top)


@bp.get("/jobs/<job_id>/result")
def get_result(job_id: str):
    status = _status(job_id)
    fmt, wanted, image, top = _query()
    if status["status"] in ("queued", "started"):
        raise ApiError(
            f"job {job_id} is {status['status']}; its result is not ready",
            status=409,
            retry_after=1,
        )
    if status["status"] != "finished":
        raise Conflict(
            f"job {job_id} is {status['status']}; it has no result: "
            f"{status.get('error') or ''}".rstrip(": ")
        )
    store = convq().store
    found = store.result_index(job_id)
    if found is None:
        raise NotFound(f"the result of job {job_id} has expired")
    names, index = found
    for name in wanted:
        if name not in names:
            raise NotFound(
                f"job {job_id} has no output {name[:80]!r}; it has: {', '.join(names)}",
                field="output",
            )
    names = wanted or names
    _check_lean_format(status.get("lean") or {}, names, fmt, top is not None)
    if top is not None:  # the classification extension on a job's result
        labels = _job_labels(status)
        classes = {name: top for name in names}
        body, headers = _v2_body(job_id, status, names, set(), None, classes, labels, index)
        return Response(body, status=200, headers=headers)
    if fmt in ("binary", "json"):
        binary = set(names) if fmt == "binary" else set()
        body, headers = _v2_body(job_id, status, names, binary, index=index)
        return Response(body, status=200, headers=headers)
    if fmt == "npy":
        array = store.result_layout(job_id, names[0], index)
        pieces = store.result_slices(job_id, names[0], index)
        if array is None or pieces is None:
            raise NotFound(f"the result of job {job_id} has expired")
        shape, dtype = array
        head = npy_header(shape, dtype)
        return Response(
            _chain(head, pieces),
            mimetype="application/octet-stream",
            headers={
                "Content-Length": str(len(head) + _nbytes(shape, dtype)),
                "Content-Disposition": f"attachment; filename={job_id}-{names[0]}.npy",
            },
        )
    layout = store.result_layout(job_id, names[0], index)
    if layout is None:
        raise NotFound(f"the result of job {job_id} has expired")
    shape = layout[0]
    if len(shape) < 3 and layout[1].kind != "O":
        raise BadRequest(f"{names[0]} holds no maps to draw; fetch format=npy", field="format")
    if image >= shape[0]:
        raise NotFound(
            f"job {job_id} has {shape[0]} image(s); image={image} is past the end", field="image"
        )
    if layout[1].kind != "O" and int(np.prod(shape[1:])) > int(
        current_app.config["MAX_PNG_PIXELS"]
    ):
        raise TooLarge(
            f"{names[0]} is {shape[1:]} per image, too big to draw; fetch format=npy instead",
            field="format",
        )
    maps = store.result_array(job_id, names[0], index)
    if maps is None:
        raise NotFound(f"the result of job {job_id} has expired")
    if maps.dtype.kind == "O":  # a png output: the worker drew it already
        return Response(maps[image], mimetype="image/png")
    if names[0] == EXPLAIN_OVERLAY:  # an RGB picture, not maps to tile
        return Response(rgb_png(maps[image]), mimetype="image/png")
    one = maps[image] if maps.ndim == 4 else maps[image][..., None]  # (N, H, W): one map each
    return Response(grid_png(one.astype(np.float32, copy=False)), mimetype="image/png")


def _check_lean_format(leaned: dict, names: list[str], fmt: str, ranked: bool) -> None:
    """Refuse (400) a format that a lean output (stats, png) cannot be read in."""
    for name in names:
        opts = leaned.get(name) or {}
        if opts.get("png") and (fmt in ("json", "npy") or ranked):
            raise BadRequest(
                f"output {name!r} holds PNG pictures (png): fetch format=png&image=I, or "
                "format=binary (V2 BYTES)",
                field="format",
            )
        if opts.get("dtype") == "uint8" and ranked:
            raise BadRequest(
                f"output {name!r} is uint8 with a scale per channel, which top-k cannot rank; "
                "fetch it and its scale and offset",
                field="top",
            )
        if opts.get("stats") and (fmt == "png" or ranked):
            raise BadRequest(
                f"output {name!r} holds per-channel stats, not maps: fetch format=json, "
                "binary or npy",
                field="format",
            )


def _chain(head: bytes, pieces: Iterator[bytes]) -> Iterator[bytes]:
    yield head
    yield from pieces
