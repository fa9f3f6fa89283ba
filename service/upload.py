"""Parse a model upload (Triton repository-load JSON or multipart) and validate it with the engine.

JSON: {"parameters": {"config": "<spec JSON>", "file:weights.npz": "<base64>"}}; the file may be
.npz, .safetensors, or .onnx (converted by engine.onnx_import when that module is present).
Multipart: `spec` (file or field) and `weights` (file). No kernel runs: Model.from_bytes checks.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import logging
import re

from flask import current_app, request

from engine import EngineError, Model
from engine.spec import MAX_SPEC_BYTES

from .body import blank, json_object, parse_json, read_body
from .errors import BadRequest, TooLarge, UnsupportedMediaType

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
WEIGHT_SUFFIXES = (".npz", ".safetensors", ".onnx")
log = logging.getLogger(__name__)


def check_name(name: str) -> str:
    """Return name if it is a valid model name (letters, digits, _ . -, at most 64)."""
    if not NAME.fullmatch(name):
        raise BadRequest(
            f"model name {name[:80]!r} must be 1-64 letters, digits, '_', '.', '-'", field="name"
        )
    return name


def _spec(value, where: str) -> dict:
    # The engine's spec size limit holds on every path, an inline JSON object included.
    if isinstance(value, str):
        value = value.encode("utf-8", errors="replace")
    elif isinstance(value, dict):
        value = json.dumps(value).encode()
    if isinstance(value, bytes) and len(value) > MAX_SPEC_BYTES:
        raise TooLarge(
            f"{where} is {len(value)} bytes; a spec may take {MAX_SPEC_BYTES}", field="config"
        )
    spec = parse_json(value, where) if isinstance(value, bytes) else value
    if not isinstance(spec, dict):
        raise BadRequest(f"{where} must be a JSON object (the model spec)", field="config")
    return spec


def _suffix(filename: str) -> str:
    lower = filename.lower()
    for suffix in WEIGHT_SUFFIXES:
        if lower.endswith(suffix):
            return suffix
    raise UnsupportedMediaType(
        f"weights file {filename[:80]!r} must end in {', '.join(WEIGHT_SUFFIXES)}", field="weights"
    )


def _build(name: str, spec: dict | None, filename: str, data: bytes) -> Model:
    """Validate spec + weights bytes into a Model named name."""
    if _suffix(filename) == ".onnx":
        try:
            onnx_import = importlib.import_module("engine.onnx_import")
        except ImportError:
            raise UnsupportedMediaType(
                "ONNX import is not available on this server", field="weights"
            ) from None
        try:
            onnx_spec, arrays = onnx_import.convert(data)
        except EngineError:
            raise
        except Exception as e:  # noqa: BLE001 - a crafted graph breaks an importer in many ways
            # Logged with its traceback: the importer should have named the problem itself.
            log.warning("ONNX import failed on an upload", exc_info=True)
            raise BadRequest(
                f"weights: not a convertible ONNX model ({type(e).__name__}: {e})", field="weights"
            ) from None
        onnx_spec = {**onnx_spec, **(spec or {}), "name": name}
        return Model.from_arrays(onnx_spec, arrays)
    if spec is None:
        raise BadRequest("send the model spec (parameters.config or the spec part)", field="config")
    return Model.from_bytes({**spec, "name": name}, data, filename=filename)


def _from_json(name: str, body: bytes) -> Model | None:
    doc = json_object(body, "load request") if not blank(body) else {}
    unknown = sorted(set(doc) - {"parameters"})
    if unknown:
        raise BadRequest(f"load request: unknown field(s) {', '.join(unknown)}", field=unknown[0])
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest("parameters must be an object", field="parameters")
    files = {k[5:]: v for k, v in params.items() if k.startswith("file:")}
    config = params.get("config")
    if config is None and not files:
        return None  # Triton's "load what the repository has": nothing to upload
    if len(files) != 1:
        raise BadRequest(
            f"send exactly one weights file as parameters['file:<name>'], got {len(files)}",
            field="file",
        )
    ((filename, encoded),) = files.items()
    if not isinstance(encoded, str):
        raise BadRequest(f"file:{filename[:80]} must be a base64 string", field="file")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"file:{filename[:80]} is not valid base64", field="file") from None
    spec = None if config is None else _spec(config, "parameters.config")
    return _build(name, spec, filename, data)


def _from_multipart(name: str) -> Model:
    weights = request.files.get("weights")
    if weights is None:
        raise BadRequest("multipart upload needs a 'weights' file", field="weights")
    spec_file = request.files.get("spec")
    spec_text = spec_file.read() if spec_file is not None else request.form.get("spec")
    spec = None if spec_text is None else _spec(spec_text, "spec")
    return _build(name, spec, weights.filename or "weights.npz", weights.read())


def parse_upload(name: str) -> Model | None:
    """Return the uploaded, validated Model; None when the body uploads nothing (plain load)."""
    check_name(name)
    limit = int(current_app.config["MAX_MODEL_BYTES"])
    if request.mimetype == "multipart/form-data":
        request.max_content_length = limit
        request.max_form_memory_size = limit
        return _from_multipart(name)
    if request.mimetype not in ("", "application/json"):
        raise UnsupportedMediaType(
            f"send application/json or multipart/form-data, not {request.mimetype}"
        )
    return _from_json(name, read_body(limit))
