"""V2 routes about the server and its models: health, metadata, the repository extension."""

from __future__ import annotations

from flask import Blueprint, current_app

from worker.contract.queue import live_workers
from worker.contract.store import NameTaken

from .auth import current_owner
from .body import blank, json_object, read_body
from .codec import INPUT_NAME
from .context import convq
from .errors import BadRequest, Conflict, NotFound, Unavailable
from .names import public_name, resolve, stored_name
from .submit import find_model
from .upload import check_name, parse_upload

bp = Blueprint("v2_models", __name__, url_prefix="/v2")

SERVER_NAME = "convq"
EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "jobs"]


@bp.get("/health/live")
def live():
    return {"live": True}


@bp.get("/health/ready")
def ready():
    ext = convq()
    retry = int(current_app.config["RETRY_AFTER"])
    try:
        ext.redis.ping()
        workers = live_workers(ext.queue)
    except Exception as e:  # readiness answers 503 for any Redis trouble, never raises
        raise Unavailable(
            f"the job store (Redis) is unreachable: {type(e).__name__}", retry_after=retry
        ) from None
    if workers < 1:
        raise Unavailable("no worker is running; start one with `convq worker`", retry_after=retry)
    return {"ready": True, "workers": workers}


@bp.get("")
def server_metadata():
    from importlib.metadata import version

    return {"name": SERVER_NAME, "version": version("convq"), "extensions": EXTENSIONS}


def _visible(info: dict) -> bool:
    return info.get("owner") is None or info.get("owner") == current_owner()


@bp.post("/repository/index")
def repository_index():
    body = read_body(1 << 16)
    doc = json_object(body, "index request") if not blank(body) else {}
    unknown = sorted(set(doc) - {"ready"})
    if unknown:
        raise BadRequest(f"index request: unknown field(s) {', '.join(unknown)}", field=unknown[0])
    if not isinstance(doc.get("ready", False), bool):
        raise BadRequest("ready must be true or false", field="ready")
    shown: dict[str, dict] = {}
    for info in convq().store.list_models():  # sorted by stored name: plain names come first
        if _visible(info):
            shown[public_name(info["name"])] = info  # the caller's own shadows the server's
    return [
        {"name": name, "version": str(info["version"]), "state": "READY", "reason": ""}
        for name, info in sorted(shown.items())
    ]


@bp.post("/repository/models/<name>/load")
def load(name: str):
    ext = convq()
    model = parse_upload(name)
    if model is None:  # Triton's plain "load": nothing uploaded, report what is there
        found = resolve(ext.store, name)
        if found is None:
            raise NotFound(
                f"model {name!r} is not in the repository; send parameters.config "
                "and a parameters['file:<name>'] weights file to upload it"
            )
        return {"name": name, "version": str(found[1]["version"]), "state": "READY"}
    # Into the caller's own namespace (names.py): another key's models are never in the way.
    owner = current_owner()
    try:
        version = ext.store.put_model(
            stored_name(name), model.spec, model.to_safetensors(), owner=owner
        )
    except NameTaken:  # a plain name of another owner's (a model stored before namespaces)
        raise NotFound(f"model {name!r} cannot be stored under this name") from None
    return {"name": name, "version": str(version), "state": "READY"}


@bp.post("/repository/models/<name>/unload")
def unload(name: str):
    check_name(name)
    body = read_body(1 << 16)
    if not blank(body):
        json_object(body, "unload request")  # Triton sends unload_dependents; nothing to do
    ext = convq()
    found = resolve(ext.store, name)
    if found is None:
        raise NotFound(f"model {name!r} not found")
    stored, info = found
    if info.get("owner") != current_owner():
        raise Conflict(f"model {name!r} belongs to the server; it cannot be unloaded with a key")
    ext.store.delete_model(stored)
    return {"name": name, "state": "UNAVAILABLE"}


def _dim(d) -> int:
    return -1 if d is None else int(d)


def metadata(name: str, version: str | None):
    target = find_model(name, version)
    model = target.model
    h, w, c = model.input_shape
    shapes = model.output_shapes(h, w) if h is not None and w is not None else {}
    summary = model.summary(h, w)
    outputs = []
    for row in summary:
        shape = shapes.get(row["name"]) or tuple(row.get("output_shape") or (None, None, None))
        outputs.append(
            {
                "name": row["name"],
                "datatype": "FP32",
                "shape": [-1, *(_dim(d) for d in tuple(shape)[-3:])],
            }
        )
    labels = model.spec.get("labels")
    return {
        "name": target.name,
        "versions": [str(target.version)],
        "platform": "convq",
        "inputs": [
            {
                "name": INPUT_NAME,
                "datatype": "UINT8",
                "shape": [-1, _dim(h), _dim(w), int(c)],
                "parameters": {"datatypes": ["UINT8", "FP32"]},
            }
        ],
        "outputs": outputs,
        "summary": summary,
    } | ({"labels": list(labels)} if labels else {})


@bp.get("/models/<name>")
def model_metadata(name: str):
    return metadata(name, None)


@bp.get("/models/<name>/versions/<version>")
def model_version_metadata(name: str, version: str):
    return metadata(name, version)


@bp.get("/models/<name>/ready")
def model_ready(name: str):
    target = find_model(name)
    return {"name": target.name, "version": str(target.version), "ready": True}


@bp.get("/models/<name>/versions/<version>/ready")
def model_version_ready(name: str, version: str):
    target = find_model(name, version)
    return {"name": target.name, "version": str(target.version), "ready": True}
