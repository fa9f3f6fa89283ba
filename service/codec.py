"""Decode V2 (Open Inference Protocol) inference requests and encode responses.

JSON tensors and the binary tensor extension: a JSON header of Inference-Header-Content-Length
bytes, then each binary input's raw bytes in input order (its size in parameters.binary_data_size).
Images are (N, H, W, C) or (N, H, W); datatype UINT8 or FP32, row-major, little-endian.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from math import prod
from typing import Literal

import numpy as np

from worker.contract.lean import KEYS as LEAN_KEYS

from .body import json_object
from .classify import parse_k
from .errors import BadRequest, Unprocessable

DTYPES: dict[str, np.dtype] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
DATATYPES = {"<f4": "FP32", "<f2": "FP16", "|u1": "UINT8", "|O": "BYTES"}
"""V2 datatype of each dtype an output can be stored in (numpy dtype.str)."""
_REQUEST_KEYS = {"id", "inputs", "outputs", "parameters"}
_INPUT_KEYS = {"name", "shape", "datatype", "parameters", "data"}
_OUTPUT_KEYS = {"name", "parameters"}
INPUT_NAME = "input"


@dataclass
class InferRequest:
    """A decoded inference request: the images and which outputs to return, and how."""

    images: np.ndarray
    outputs: list[str] | Literal["all"] | None = None  # None: the last layer; "all": every one
    binary: dict[str, bool] = field(default_factory=dict)  # per requested output
    binary_default: bool | None = None  # request-level binary_data_output
    id: str | None = None
    explain: dict | None = None  # parameters.explain, checked against the model at enqueue
    classification: dict[str, int] = field(default_factory=dict)  # output -> top-k
    lean: dict[str, dict] = field(default_factory=dict)  # output or "*" -> lean options, unchecked
    callback: str | None = None  # parameters.callback: URL POSTed when the job ends


def parse_header_length(value: str | None, body_size: int) -> int | None:
    """Check Inference-Header-Content-Length against the body size; None when absent."""
    if value is None:
        return None
    try:
        # Digits only: int() would also take "1_0", " 10", "+10" or non-ASCII digits.
        if not (value.isascii() and value.isdigit()):
            raise ValueError(value)
        n = int(value)
    except ValueError:
        raise BadRequest(
            "Inference-Header-Content-Length must be an integer",
            field="Inference-Header-Content-Length",
        ) from None
    if not 0 < n <= body_size:
        raise BadRequest(
            f"Inference-Header-Content-Length {n} is outside the body ({body_size} bytes)",
            field="Inference-Header-Content-Length",
        )
    return n


def _check_keys(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BadRequest(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed: "
            f"{', '.join(sorted(allowed))}",
            field=unknown[0],
        )


def _shape(value, where: str) -> tuple[int, ...]:
    ok = (
        isinstance(value, list)
        and len(value) in (3, 4)
        and all(type(d) is int and 0 < d < 1 << 31 for d in value)
    )
    if not ok:
        raise BadRequest(
            f"{where}.shape must be [N, H, W, C] or [N, H, W] of positive integers, "
            f"got {json.dumps(value)[:80]}",
            field="shape",
        )
    return tuple(value)


def _json_data(data, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    """Turn a (flat or nested) JSON list of numbers into an array of shape and dtype."""
    if not isinstance(data, list):
        raise BadRequest(f"{where}.data must be a list of numbers", field="data")
    try:
        flat = np.array(data, dtype=object).ravel()
    except ValueError as e:  # numpy refuses some ragged or over-deep nestings outright
        raise BadRequest(f"{where}.data is not a regular array: {e}", field="data") from None
    # A ragged nesting leaves lists inside the object array; numbers only (bool is not a number).
    for v in flat:
        if type(v) not in (int, float):
            raise BadRequest(
                f"{where}.data must hold numbers only, found {json.dumps(v)[:40]}", field="data"
            )
    if flat.size != prod(shape):
        raise BadRequest(
            f"{where}.data has {flat.size} values but shape {list(shape)} needs {prod(shape)}",
            field="data",
        )
    if dtype == np.uint8:
        if any(type(v) is not int or not 0 <= v <= 255 for v in flat):
            raise BadRequest(f"{where}.data: UINT8 values must be integers 0..255", field="data")
    try:
        values = flat.astype(np.float64)
    except OverflowError:  # a JSON integer too large for a float
        raise BadRequest(f"{where}.data holds a number out of float range", field="data") from None
    if dtype != np.uint8 and not np.all(np.abs(values) <= np.finfo(np.float32).max):
        raise BadRequest(f"{where}.data: FP32 values must be finite float32 numbers", field="data")
    return values.astype(dtype).reshape(shape)


def _outputs(value, request: InferRequest) -> None:
    if not isinstance(value, list):
        raise BadRequest("outputs must be a list of {name, parameters}", field="outputs")
    names = []
    for i, out in enumerate(value):
        where = f"outputs[{i}]"
        if not isinstance(out, dict):
            raise BadRequest(f"{where} must be an object", field="outputs")
        _check_keys(out, _OUTPUT_KEYS, where)
        name = out.get("name")
        if not isinstance(name, str) or not name:
            raise BadRequest(f"{where}.name must be a layer name", field="name")
        if name in names:
            raise BadRequest(f"output {name!r} is requested twice", field="outputs")
        names.append(name)
        params = out.get("parameters", {})
        if not isinstance(params, dict):
            raise BadRequest(f"{where}.parameters must be an object", field="parameters")
        if "classification" in params:
            request.classification[name] = parse_k(params["classification"], where)
        lean = {k: params[k] for k in LEAN_KEYS if k in params}
        if lean:
            request.lean[name] = {**request.lean.get(name, {}), **lean}
        binary = params.get("binary_data")
        if binary is not None:
            if not isinstance(binary, bool):
                raise BadRequest(
                    f"{where}.parameters.binary_data must be true or false", field="binary_data"
                )
            request.binary[name] = binary
    request.outputs = names or None


def decode_infer(body: bytes, header_length: int | None) -> InferRequest:
    """Decode a V2 inference request (JSON, or JSON header + binary tensors) into images."""
    header = body if header_length is None else body[:header_length]
    blob = memoryview(body)[len(header) :]
    req = json_object(header, "inference request")
    _check_keys(req, _REQUEST_KEYS, "inference request")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest(
            f"inputs must be a list with one tensor named {INPUT_NAME!r}", field="inputs"
        )
    tensor = inputs[0]
    _check_keys(tensor, _INPUT_KEYS, "inputs[0]")
    if tensor.get("name") != INPUT_NAME:
        raise BadRequest(
            f"the model's input is named {INPUT_NAME!r}, not {json.dumps(tensor.get('name'))[:40]}",
            field="name",
        )
    datatype = tensor.get("datatype")
    dtype = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise BadRequest(
            f"datatype must be one of {', '.join(DTYPES)}, not "
            f"{json.dumps(tensor.get('datatype'))[:40]}",
            field="datatype",
        )
    shape = _shape(tensor.get("shape"), "inputs[0]")
    params = tensor.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest("inputs[0].parameters must be an object", field="parameters")
    size = params.get("binary_data_size")
    if size is not None:
        if "data" in tensor:
            raise BadRequest("inputs[0] has both data and binary_data_size", field="data")
        want = prod(shape) * dtype.itemsize
        if type(size) is not int or size != want:
            raise BadRequest(
                f"inputs[0].binary_data_size is {json.dumps(size)[:20]} but shape "
                f"{list(shape)} of {tensor['datatype']} is {want} bytes",
                field="binary_data_size",
            )
        if len(blob) != size:
            raise BadRequest(
                f"the body carries {len(blob)} bytes of binary tensor data but "
                f"binary_data_size says {size}",
                field="binary_data_size",
            )
        images = np.frombuffer(blob, dtype=dtype).reshape(shape)
    else:
        if len(blob):
            raise BadRequest(
                "binary data follows the header but no input declares binary_data_size",
                field="binary_data_size",
            )
        if "data" not in tensor:
            raise BadRequest("inputs[0] needs data or parameters.binary_data_size", field="data")
        images = _json_data(tensor["data"], shape, dtype, "inputs[0]")
    request = InferRequest(images=images)
    if "id" in req:
        if not isinstance(req["id"], str):
            raise BadRequest("id must be a string", field="id")
        request.id = req["id"]
    rparams = req.get("parameters", {})
    if not isinstance(rparams, dict):
        raise BadRequest("parameters must be an object", field="parameters")
    if "lean" in rparams:
        request.lean = parse_lean(rparams["lean"], "parameters.lean")
    if "outputs" in req:
        _outputs(req["outputs"], request)  # an output's own parameters override parameters.lean
    if "binary_data_output" in rparams:
        if not isinstance(rparams["binary_data_output"], bool):
            raise BadRequest(
                "parameters.binary_data_output must be true or false", field="binary_data_output"
            )
        request.binary_default = rparams["binary_data_output"]
    if "explain" in rparams:
        if not isinstance(rparams["explain"], dict):
            raise BadRequest(
                'parameters.explain must be an object {"method", "layer", "channel"}',
                field="explain",
            )
        request.explain = rparams["explain"]
    if "callback" in rparams:
        if not isinstance(rparams["callback"], str):
            raise BadRequest("parameters.callback must be a URL string", field="callback")
        request.callback = rparams["callback"]
    return request


def parse_lean(value, where: str) -> dict[str, dict]:
    """Return a lean mapping {output or "*": options} from an object or its JSON text.

    JSON text is what a client that sends only scalar parameters (tritonclient) can pass; the
    options themselves are checked against the model at submit (worker.contract.lean).
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRequest(f"{where} is not valid JSON", field="lean") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise BadRequest(
            f'{where} must be an object {{"<output>" or "*": {{"dtype": ..., ...}}}}',
            field="lean",
        )
    return value


@dataclass
class Streamed:
    """A binary output sent after the header: its byte size and an iterator over its bytes."""

    size: int
    pieces: Iterable[bytes]


OutputData = bytes | memoryview | Streamed | list[str]
"""One output's data for encode_infer: bytes of its datatype, a Streamed, or class strings."""


def encode_infer(
    model: str,
    version: int,
    outputs: list[tuple],
    binary: set[str],
    request_id: str | None = None,
) -> tuple[list, dict]:
    """Build a V2 response (body chunks, headers); outputs named in binary follow as raw bytes.

    An output is (name, shape, data[, datatype, parameters]); datatype FP32 (default), FP16,
    UINT8 or BYTES (binary only: V2's length-prefixed strings); parameters (scalars) describe it.
    Its data is a bytes-like of that little-endian type, (binary outputs only) a Streamed whose
    pieces are read while the body is sent, or a list of strings (a classification output,
    BYTES, always JSON); iter_body flattens the chunks.
    """
    described: list[dict] = []
    tails: list[bytes | memoryview | Streamed] = []
    for name, shape, raw, *more in outputs:
        datatype = more[0] if more else "FP32"
        entry: dict = {"name": name, "datatype": datatype, "shape": list(shape)}
        if len(more) > 1 and more[1]:
            entry["parameters"] = dict(more[1])
        if isinstance(raw, list):
            entry["datatype"] = "BYTES"
            entry["data"] = raw
        elif name in binary or isinstance(raw, Streamed):
            size = raw.size if isinstance(raw, Streamed) else memoryview(raw).nbytes
            entry["parameters"] = {**entry.get("parameters", {}), "binary_data_size": size}
            tails.append(raw)
        else:
            values = np.frombuffer(raw, dtype=_NUMBERS[datatype])
            if datatype == "UINT8":
                entry["data"] = values.tolist()
                described.append(entry)
                continue
            if not np.isfinite(values).all():
                # JSON has no Infinity or NaN: say so rather than send invalid JSON.
                bad = int(np.count_nonzero(~np.isfinite(values)))
                raise Unprocessable(
                    f"output {name!r} holds {bad} non-finite value(s) (inf or NaN), which JSON "
                    "cannot carry; fetch it in binary (format=binary, binary_data) or as .npy",
                    field="format",
                )
            entry["data"] = values.tolist()
        described.append(entry)
    doc = {"model_name": model, "model_version": str(version), "outputs": described}
    if request_id is not None:
        doc["id"] = request_id
    head = json.dumps(doc, separators=(",", ":")).encode()
    size = sum(t.size if isinstance(t, Streamed) else memoryview(t).nbytes for t in tails)
    headers = {"Content-Length": str(len(head) + size)}
    if tails:
        headers["Inference-Header-Content-Length"] = str(len(head))
        headers["Content-Type"] = "application/octet-stream"
    else:
        headers["Content-Type"] = "application/json"
    return [head, *tails], headers


_NUMBERS = {"FP32": "<f4", "FP16": "<f2", "UINT8": "|u1"}


def iter_body(chunks: list) -> Iterator[bytes]:
    """Yield the bytes of encode_infer's chunks in order, reading Streamed outputs as it goes."""
    for chunk in chunks:
        if isinstance(chunk, Streamed):
            yield from chunk.pieces
        else:
            yield chunk
