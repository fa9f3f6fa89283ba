"""Every kind of bad input, one table: a 4xx JSON error, nothing stored or queued, memory flat.

Each row goes through the Flask test client over fakeredis, once with job data in Redis and once
in files (CONVQ_BLOB_DIR). Besides its status and error words, every row must leave Redis and
the blob directory byte-for-byte as they were (no queued job, no input blob, no model version,
no half-written file), must not run a pickled payload, must answer well under a second, and must not
raise the API process's peak RSS by more than a few MB: bombs are refused from what they
declare, before anything is inflated. Peak RSS is read from /proc/self/status after resetting
it through /proc/self/clear_refs ("5": reset the peak), so only this request's peak counts.
"""

from __future__ import annotations

import base64
import copy
import gzip
import io
import json
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from werkzeug.datastructures import FileStorage
from werkzeug.test import encode_multipart

from tests.integration.apikit import (
    SPEC,
    Api,
    arrays,
    images,
    load_body,
    npy_bytes,
    npz_bytes,
    reference_model,
    v2_binary,
    v2_json,
)
from tests.unit.test_spec import BAD as BAD_SPECS
from tests.unit.test_spec import BASE as SPEC_BASE
from tests.unit.test_spec import spec_with

MAX_BODY = 64 * 1024
MAX_MODEL = 1024 * 1024
PEAK_GROWTH = 8 << 20  # bytes a refused request may add to the process's peak RSS
ANSWER_SECONDS = 1.0  # a generous bound: refusing reads headers, it never decodes or inflates


# -- bodies --------------------------------------------------------------------------------------


class Marker:
    """Unpickling this creates a file named marker in the directory given."""

    def __init__(self, directory: Path):
        self.path = str(directory / "marker")

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickled_npy(tmp: Path) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([Marker(tmp)] * 27, dtype=object).reshape(3, 3, 3), allow_pickle=True)
    return buf.getvalue()


def pickled_npz(tmp: Path) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{**arrays(), "conv1.w": np.array([Marker(tmp)], dtype=object)})
    return buf.getvalue()


def npy_header(shape: tuple, descr: str = "|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A ~12 KB greyscale PNG whose header claims width x height: a bomb's first 1200 rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    rows = zlib.compress(b"\0" * ((width + 1) * 1200), 9)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def npz_many_members(count: int = 32, member_bytes: int = 4 << 20) -> bytes:
    """An npz of count all-zero members, each under the per-member ratio floor (~600 KB)."""
    raw = npy_header((member_bytes - 128,)) + bytes(member_bytes - 128)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for i in range(count):
            zf.writestr(f"junk{i}.npy", raw)
    return buf.getvalue()


def blank_png(side: int) -> bytes:
    """A few KB of greyscale PNG that decodes to side x side pixels (x3 as RGB)."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def npz_member_claiming(shape: tuple) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("conv1.w.npy", npy_header(shape, "<f4"))
    return buf.getvalue()


def spec_renaming(old: str, new: str) -> dict:
    spec = copy.deepcopy(SPEC)
    for layer in spec["layers"]:
        if layer["name"] == old:
            layer["name"] = new
    return spec


def npz_single_bomb() -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays(), junk=np.zeros(64 << 20, np.uint8))
    return buf.getvalue()


def npz_lying_member() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("conv1.w.npy", npy_header((10**12,), "<f4") + b"\0" * 8)
    return buf.getvalue()


def onnx_pool_without_kernel_shape() -> bytes:
    """A well-formed ONNX graph whose MaxPool lacks its required kernel_shape attribute."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MaxPool", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    return helper.make_model(graph).SerializeToString()


def safetensors(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + payload


W = {"dtype": "F32", "shape": [4, 3, 3, 3]}


def multipart(*files: tuple[str, bytes], **form) -> dict:
    return {
        "content_type": "multipart/form-data",
        "data": {"images": [(io.BytesIO(data), name) for name, data in files], **form},
    }


def encoded_multipart(values: dict) -> dict:
    """A multipart body as bytes (the test client spools big form data to an unclosed file)."""
    boundary, body = encode_multipart(values)
    return {"data": body, "content_type": f"multipart/form-data; boundary={boundary}"}


def raw_json(body: bytes, **headers) -> dict:
    return {"data": body, "content_type": "application/json", "headers": headers}


def chunked(body: bytes, content_type: str = "application/json") -> dict:
    return {
        "input_stream": io.BytesIO(body),
        "content_type": content_type,
        "headers": {"Transfer-Encoding": "chunked"},
        "environ_overrides": {"wsgi.input_terminated": True},
    }


def upload(data: bytes, filename: str = "w.npz", spec: dict = SPEC) -> dict:
    return {"json": load_body(spec, filename=filename, data=data)}


def big_v2() -> bytes:
    """A well-formed V2 JSON request of ~110 KB (100 images of 9x9x3 as JSON numbers)."""
    return json.dumps(v2_json(images(100))).encode()


def binary_with(**changes) -> dict:
    body, headers = v2_binary(images(1))
    n = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:n])
    head["inputs"][0].update(changes)
    new = json.dumps(head).encode()
    return {
        "data": new + body[n:],
        "headers": {**headers, "Inference-Header-Content-Length": str(len(new))},
    }


def v2_with(**changes) -> dict:
    body = v2_json(images(1))
    body["inputs"][0].update(changes)
    return {"json": body}


# -- the table ------------------------------------------------------------------------------------

JOBS, INFER = "/v2/models/tiny/jobs", "/v2/models/tiny/infer"
LOAD = "/v2/repository/models/tiny/load"
HEADER_1_0 = {"Inference-Header-Content-Length": "1_0"}  # int() reads it as 10


@dataclass
class Case:
    """One bad request: what to send, and the status and error words it must get."""

    id: str
    path: str
    build: Callable[[Path], dict]
    status: int
    words: str = ""
    method: str = "post"
    extra: dict = field(default_factory=dict)  # JSON fields the error must carry


CASES = [
    # Bodies over the limit: by Content-Length, chunked, declared, and inflated by gzip.
    Case("body-content-length", JOBS, lambda t: raw_json(big_v2()), 413, "limit"),
    Case("body-content-length-infer", INFER, lambda t: raw_json(big_v2()), 413, "limit"),
    Case("body-chunked", JOBS, lambda t: chunked(big_v2()), 413, "limit"),
    Case(
        "body-declared-10GB",
        JOBS,
        lambda t: {
            "input_stream": io.BytesIO(b"{}"),
            "content_type": "application/json",
            "environ_overrides": {"CONTENT_LENGTH": str(10 << 30)},
        },
        413,
        "limit",
    ),
    Case(
        "body-gzip-bomb",
        JOBS,
        lambda t: raw_json(gzip.compress(b" " * (64 << 20)), **{"Content-Encoding": "gzip"}),
        413,
        "decompressed",
    ),
    Case(
        "body-bad-gzip",
        JOBS,
        lambda t: raw_json(b"\x1f\x8b not gzip", **{"Content-Encoding": "gzip"}),
        400,
        "gzip",
    ),
    Case(
        "body-unknown-encoding",
        JOBS,
        lambda t: raw_json(b"{}", **{"Content-Encoding": "br"}),
        415,
        "Content-Encoding",
    ),
    Case("upload-over-limit-json", LOAD, lambda t: upload(b"\0" * MAX_MODEL), 413, "limit"),
    Case(
        "upload-over-limit-multipart",
        LOAD,
        lambda t: encoded_multipart(
            {
                "spec": json.dumps(SPEC),
                "weights": FileStorage(io.BytesIO(b"\0" * MAX_MODEL), filename="w.npz"),
            }
        ),
        413,
    ),
    # Pictures: bombs, truncation, garbage, lies.
    Case(
        "png-12KB-claiming-10000x10000",
        JOBS,
        lambda t: multipart(("bomb.png", png_claiming(10000, 10000))),
        413,
        "10000x10000 is 100000000 pixels",
    ),
    Case(
        "png-12KB-claiming-30000x30000",
        JOBS,
        lambda t: multipart(("bomb.png", png_claiming(30000, 30000))),
        413,
        "bomb.png",
    ),
    Case(
        "png-truncated", JOBS, lambda t: multipart(("a.png", png(images(1)[0])[:60])), 400, "a.png"
    ),
    Case(
        "jpeg-truncated",
        JOBS,
        lambda t: multipart(("a.jpg", png(images(1)[0], "JPEG")[:200])),
        400,
        "a.jpg",
    ),
    Case(
        "garbage-file", JOBS, lambda t: multipart(("a.bin", b"\x00garbage" * 100)), 415, "not a PNG"
    ),
    Case(
        "gif-file", JOBS, lambda t: multipart(("a.gif", png(images(1)[0], "GIF"))), 415, "not a PNG"
    ),
    Case(
        "png-named-jpg",
        JOBS,
        lambda t: multipart(("a.jpg", png(images(1)[0]))),
        415,
        "name says JPEG",
    ),
    Case(
        "npy-named-png",
        JOBS,
        lambda t: multipart(("a.png", npy_bytes(images(1)[0]))),
        415,
        "name says PNG",
    ),
    Case("npy-pickle", JOBS, lambda t: multipart(("evil.npy", pickled_npy(t))), 400, "object"),
    Case(
        "npy-header-longer-than-data",
        JOBS,
        lambda t: multipart(("a.npy", npy_header((9, 9, 3)) + b"\0" * 10)),
        400,
        "bytes follow",
    ),
    Case(
        "npy-header-shorter-than-data",
        JOBS,
        lambda t: multipart(("a.npy", npy_header((2, 2, 3)) + b"\0" * 243)),
        400,
        "bytes follow",
    ),
    Case(
        "npy-header-claims-huge",
        JOBS,
        lambda t: multipart(("a.npy", npy_header((100000, 100000, 3)) + b"\0" * 10)),
        413,
        "pixels",
    ),
    Case(
        "npy-header-shape-wraps-int64",
        JOBS,
        lambda t: multipart(("a.npy", npy_header((2, 2, 2**62)))),
        400,
        "bytes follow",
    ),
    Case(
        "pngs-bigger-than-the-model-takes",
        JOBS,
        lambda t: multipart(("a.png", blank_png(3000)), ("b.png", blank_png(3000))),
        400,
        "takes 9x9",
    ),
    Case(
        "pngs-of-different-sizes-undecoded",
        JOBS,
        lambda t: multipart(("a.png", png(images(1)[0])), ("b.png", blank_png(3000))),
        400,
        "share",
    ),
    Case(
        "npy-float64",
        JOBS,
        lambda t: multipart(("a.npy", npy_bytes(np.zeros((9, 9, 3))))),
        400,
        "float64",
    ),
    Case(
        "npy-garbage-header",
        JOBS,
        lambda t: multipart(("a.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'}  ")),
        400,
        "not a valid .npy",
    ),
    Case(
        "multipart-no-images",
        JOBS,
        lambda t: {"content_type": "multipart/form-data", "data": {"outputs": "all"}},
        400,
        "images",
    ),
    Case(
        "multipart-unknown-field",
        JOBS,
        lambda t: multipart(("a.png", png(images(1)[0])), colour="red"),
        400,
        "colour",
    ),
    Case(
        "multipart-sizes-differ",
        JOBS,
        lambda t: multipart(("a.png", png(images(1)[0])), ("b.png", png(images(1, h=8)[0]))),
        400,
        "share",
    ),
    Case(
        "multipart-too-many-images",
        JOBS,
        lambda t: multipart(*[(f"{i}.png", png(images(1)[0])) for i in range(5)]),
        413,
        "limit",
    ),
    # V2 JSON: malformed, nested, unknown fields, shape and data disagreeing.
    Case("json-malformed", JOBS, lambda t: raw_json(b'{"inputs": ['), 400, "not valid JSON"),
    Case("json-malformed-infer", INFER, lambda t: raw_json(b"{"), 400, "not valid JSON"),
    Case("json-nested-100000", JOBS, lambda t: raw_json(b"[" * 20000 + b"]" * 20000), 400),
    Case("json-nested-in-object", JOBS, lambda t: raw_json(b'{"inputs": ' + b"[" * 20000), 400),
    Case("json-not-object", JOBS, lambda t: raw_json(b"[1, 2]"), 400, "JSON object"),
    Case(
        "json-nan",
        JOBS,
        lambda t: raw_json(
            b'{"inputs": [{"name": "input", "datatype": "FP32", '
            b'"shape": [1,9,9,3], "data": [NaN]}]}'
        ),
        400,
        "NaN",
    ),
    Case(
        "json-unknown-field",
        JOBS,
        lambda t: {"json": {**v2_json(images(1)), "colour": 1}},
        400,
        "colour",
    ),
    Case("json-unknown-input-field", JOBS, lambda t: v2_with(colour=1), 400, "colour"),
    Case("json-shape-vs-data", JOBS, lambda t: v2_with(shape=[2, 9, 9, 3]), 400, "values"),
    Case("json-shape-vs-data-infer", INFER, lambda t: v2_with(shape=[1, 9, 9, 4]), 400, "values"),
    Case("json-negative-shape", JOBS, lambda t: v2_with(shape=[-1, 9, 9, 3]), 400, "shape"),
    Case("json-datatype", JOBS, lambda t: v2_with(datatype="INT64"), 400, "datatype"),
    Case("json-datatype-list", JOBS, lambda t: v2_with(datatype=["UINT8"]), 400, "datatype"),
    Case("json-uint8-out-of-range", JOBS, lambda t: v2_with(data=[300] * 243), 400, "0..255"),
    Case(
        "json-strings-as-data",
        JOBS,
        lambda t: v2_with(datatype="FP32", data=["1"] * 243),
        400,
        "numbers only",
    ),
    Case("json-wrong-image-size", JOBS, lambda t: {"json": v2_json(images(1, h=10))}, 400, "9x9"),
    Case(
        "json-wrong-channels",
        JOBS,
        lambda t: {"json": v2_json(np.zeros((1, 9, 9, 1), np.uint8))},
        400,
        "channels",
    ),
    Case(
        "json-unknown-output", JOBS, lambda t: {"json": v2_json(images(1), ["conv9"])}, 400, "conv9"
    ),
    Case(
        "json-unknown-model",
        "/v2/models/nope/jobs",
        lambda t: {"json": v2_json(images(1))},
        404,
        "nope",
    ),
    Case(
        "json-unknown-model-infer",
        "/v2/models/nope/infer",
        lambda t: {"json": v2_json(images(1))},
        404,
        "nope",
    ),
    Case(
        "json-unknown-version-infer",
        "/v2/models/tiny/versions/7/infer",
        lambda t: {"json": v2_json(images(1))},
        404,
        "version",
    ),
    # V2 binary: sizes that disagree with the header.
    Case(
        "binary-body-short",
        JOBS,
        lambda t: {"data": v2_binary(images(1))[0][:-3], "headers": v2_binary(images(1))[1]},
        400,
        "binary",
    ),
    Case(
        "binary-body-long",
        INFER,
        lambda t: {"data": v2_binary(images(1))[0] + b"xyz", "headers": v2_binary(images(1))[1]},
        400,
        "binary",
    ),
    Case(
        "binary-size-vs-shape",
        JOBS,
        lambda t: binary_with(parameters={"binary_data_size": 100}),
        400,
        "binary_data_size",
    ),
    Case(
        "binary-header-length-past-body",
        JOBS,
        lambda t: {
            "data": v2_binary(images(1))[0],
            "headers": {**v2_binary(images(1))[1], "Inference-Header-Content-Length": "999999"},
        },
        400,
        "Inference-Header-Content-Length",
    ),
    Case(
        "binary-header-length-not-a-number",
        JOBS,
        lambda t: {
            "data": v2_binary(images(1))[0],
            "headers": {**v2_binary(images(1))[1], "Inference-Header-Content-Length": "12abc"},
        },
        400,
        "Inference-Header-Content-Length",
    ),
    # Wrong content types.
    Case("jobs-text-plain", JOBS, lambda t: {"data": "hi", "content_type": "text/plain"}, 415),
    Case("infer-xml", INFER, lambda t: {"data": "<a/>", "content_type": "application/xml"}, 415),
    Case("upload-text-plain", LOAD, lambda t: {"data": "hi", "content_type": "text/plain"}, 415),
    Case(
        "index-malformed", "/v2/repository/index", lambda t: raw_json(b"{"), 400, "not valid JSON"
    ),
    Case(
        "index-unknown-field",
        "/v2/repository/index",
        lambda t: {"json": {"colour": 1}},
        400,
        "colour",
    ),
    # Model uploads: weights files crafted to hurt, and malformed load requests.
    Case("npz-zip-bomb", LOAD, lambda t: upload(npz_single_bomb()), 400, "compresses"),
    Case("npz-many-member-bomb", LOAD, lambda t: upload(npz_many_members()), 400, "inflate"),
    Case("npz-pickle", LOAD, lambda t: upload(pickled_npz(t)), 400, "not a number type"),
    Case(
        "npz-member-header-lies", LOAD, lambda t: upload(npz_lying_member()), 400, "does not match"
    ),
    Case("npz-garbage", LOAD, lambda t: upload(b"PK\x03\x04garbage"), 400, "zip"),
    Case(
        "npz-missing-arrays",
        LOAD,
        lambda t: upload(npz_bytes({"conv1.w": arrays()["conv1.w"]})),
        400,
        "missing",
    ),
    Case(
        "npz-wrong-shape",
        LOAD,
        lambda t: upload(npz_bytes({**arrays(), "fc.w": np.zeros((5, 4, 4, 3), np.float32)})),
        400,
        "fc",
    ),
    Case(
        "npz-non-finite",
        LOAD,
        lambda t: upload(npz_bytes({**arrays(), "fc.b": np.full(5, np.inf, np.float32)})),
        400,
        "fc",
    ),
    Case(
        "safetensors-huge-header",
        LOAD,
        lambda t: upload((1 << 40).to_bytes(8, "little") + b"{}", "w.safetensors"),
        400,
        "header",
    ),
    Case(
        "safetensors-offsets-past-end",
        LOAD,
        lambda t: upload(
            safetensors({"conv1.w": {**W, "data_offsets": [0, 1 << 30]}}, b"\0" * 432),
            "w.safetensors",
        ),
        400,
    ),
    Case(
        "safetensors-offsets-overlap",
        LOAD,
        lambda t: upload(
            safetensors(
                {
                    "conv1.w": {**W, "data_offsets": [0, 432]},
                    "conv1.b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                },
                b"\0" * 432,
            ),
            "w.safetensors",
        ),
        400,
    ),
    Case(
        "safetensors-offsets-reversed",
        LOAD,
        lambda t: upload(
            safetensors({"conv1.w": {**W, "data_offsets": [8, 4]}}, b"\0" * 432), "w.safetensors"
        ),
        400,
    ),
    Case(
        "safetensors-object-dtype",
        LOAD,
        lambda t: upload(
            safetensors({"conv1.w": {**W, "dtype": "O", "data_offsets": [0, 432]}}, b"\0" * 432),
            "w.safetensors",
        ),
        400,
        "dtype",
    ),
    Case("safetensors-truncated", LOAD, lambda t: upload(b"\x05\x00\x00", "w.safetensors"), 400),
    Case("onnx-garbage", LOAD, lambda t: upload(b"\x08\x07garbage", "m.onnx"), 400),
    Case(
        "onnx-pool-without-kernel-shape",
        LOAD,
        lambda t: upload(onnx_pool_without_kernel_shape(), "m.onnx"),
        400,
        "kernel_shape",
    ),
    Case("weights-suffix", LOAD, lambda t: upload(npz_bytes(arrays()), "w.pkl"), 415, ".npz"),
    Case(
        "load-config-malformed",
        LOAD,
        lambda t: {"json": {"parameters": {"config": "{", "file:w.npz": ""}}},
        400,
        "JSON",
    ),
    Case(
        "load-config-nested",
        LOAD,
        lambda t: {"json": {"parameters": {"config": "[" * 100000, "file:w.npz": ""}}},
        400,
    ),
    Case(
        "npz-member-shape-wraps-int64",
        LOAD,
        lambda t: upload(npz_member_claiming((2**32, 2**32))),
        400,
        "does not match",
    ),
    Case(
        "layer-name-with-trailing-newline",
        LOAD,
        lambda t: upload(
            npz_bytes({k.replace("conv1", "conv1\n"): v for k, v in arrays().items()}),
            spec=spec_renaming("conv1", "conv1\n"),
        ),
        400,
        "name",
        extra={"field": "name"},
    ),
    Case(
        "binary-header-length-with-underscore",
        JOBS,
        lambda t: {**binary_with(), "headers": {**binary_with()["headers"], **HEADER_1_0}},
        400,
        "Inference-Header-Content-Length",
    ),
    Case(
        "load-bad-base64",
        LOAD,
        lambda t: {"json": {"parameters": {"config": json.dumps(SPEC), "file:w.npz": "!!!"}}},
        400,
        "base64",
    ),
    Case(
        "load-two-files",
        LOAD,
        lambda t: {
            "json": {"parameters": {"config": json.dumps(SPEC), "file:a.npz": "", "file:b.npz": ""}}
        },
        400,
        "exactly one",
    ),
    Case(
        "load-unknown-field",
        LOAD,
        lambda t: {"json": {"parameters": {}, "colour": 1}},
        400,
        "colour",
    ),
    Case(
        "load-bad-name",
        "/v2/repository/models/-x/load",
        lambda t: upload(npz_bytes(arrays())),
        400,
        "name",
    ),
    # Results and status of jobs that do not exist.
    Case("job-unknown", "/v2/jobs/" + "0" * 32, lambda t: {}, 404, "not found", method="get"),
    Case("job-path-traversal", "/v2/jobs/..%2F..%2Fetc", lambda t: {}, 404, method="get"),
    Case("result-unknown", "/v2/jobs/" + "0" * 32 + "/result", lambda t: {}, 404, method="get"),
    Case("cancel-unknown", "/v2/jobs/" + "0" * 32, lambda t: {}, 404, method="delete"),
]

# Every kind of invalid spec the engine knows, uploaded with weights that fit the valid one.
BASE_ARRAYS = {
    "conv1.w": np.zeros((4, 3, 3, 3), np.float32),
    "conv1.b": np.zeros(4, np.float32),
    "fc.w": np.zeros((1, 1, 2, 2, 4, 4), np.float32),
}
for _i, (_change, _layer, _field, _fragment) in enumerate(BAD_SPECS):
    if (_layer, _field) == (None, "name"):
        continue  # an upload's model name comes from its URL, whatever the spec says
    _spec = spec_with(_change)
    _extra = {"field": _field} if _field is not None else {}
    if _layer is not None:
        _extra["layer"] = _layer
    if "NaN" in json.dumps(_spec):
        _extra = {}  # JSON cannot carry NaN: refused as malformed JSON before the spec check
    CASES.append(
        Case(
            f"spec-{_i}-{_field}-{_fragment[:12]}",
            "/v2/repository/models/spec/load",
            lambda t, s=_spec: {
                "json": {
                    "parameters": {
                        "config": json.dumps(s),
                        "file:w.npz": base64.b64encode(npz_bytes(BASE_ARRAYS)).decode(),
                    }
                }
            },
            400,
            "",
            extra=_extra,
        )
    )


@pytest.fixture(scope="module")
def api(module_blob_dir):
    api = Api(
        blob_dir=module_blob_dir,
        MAX_CONTENT_LENGTH=MAX_BODY,
        MAX_MODEL_BYTES=MAX_MODEL,
        MAX_IMAGES=4,
    )
    assert api.load().status_code == 200
    return api


def snapshot(redis) -> dict:
    """Return every key with its serialized value (type, contents, no TTL)."""
    return {key: redis.dump(key) for key in redis.keys("*")}


def _status_kb() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def send(api, case: Case, tmp: Path):
    """Send case; return (response, seconds, bytes the peak RSS rose above the RSS before)."""
    kwargs = case.build(tmp)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb()["VmRSS"]
    began = time.perf_counter()
    rv = getattr(api.client, case.method)(case.path, **kwargs)
    seconds = time.perf_counter() - began
    return rv, seconds, _status_kb()["VmHWM"] - before


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_a_quick_4xx_that_stores_nothing(api, case, tmp_path):
    files = api.blob_files()
    send(api, case, tmp_path)  # once to warm caches (imports, compiled regexes) of that path
    before = snapshot(api.redis)
    rv, seconds, growth = send(api, case, tmp_path)
    assert rv.status_code == case.status, (rv.status_code, rv.data[:500])
    assert rv.is_json and isinstance(rv.json.get("error"), str) and rv.json["error"], rv.data
    assert case.words in rv.json["error"], rv.json
    for key, value in case.extra.items():
        assert rv.json.get(key) == value, rv.json
    assert snapshot(api.redis) == before  # nothing queued, stored or replaced
    assert api.blob_files() == files  # no input file, whole or partial
    assert api.queue_keys() == 0
    assert not any(tmp_path.iterdir())  # no pickled payload ran
    assert seconds < ANSWER_SECONDS, seconds
    assert growth < PEAK_GROWTH, f"peak RSS rose {growth / 2**20:.1f} MiB"


def test_the_spec_rows_fail_only_for_their_one_change(api):
    # The control: the unchanged spec with the same weights loads, so each row's 400 comes
    # from its one bad field.
    body = {
        "parameters": {
            "config": json.dumps(copy.deepcopy(SPEC_BASE)),
            "file:w.npz": base64.b64encode(npz_bytes(BASE_ARRAYS)).decode(),
        }
    }
    rv = api.client.post("/v2/repository/models/control/load", json=body)
    assert rv.status_code == 200, rv.json
    assert api.client.post("/v2/repository/models/control/unload").status_code == 200


def test_a_refused_replacement_keeps_the_model_as_it_was(api):
    info = api.client.get("/v2/models/tiny").json
    rv = api.client.post(LOAD, **upload(npz_many_members()))
    assert rv.status_code == 400
    assert api.client.get("/v2/models/tiny").json == info


# -- fuzzing the upload decoders: weights files and specs ------------------------------------------
# 120 uploads each through the API: `make test` runs them, `make test-fast` leaves them out.

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
WEIGHT_SEEDS = [
    ("w.npz", npz_bytes(arrays())),
    ("w.safetensors", reference_model().to_safetensors()),
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


def _refused_or_loaded(api, body: dict) -> None:
    before = snapshot(api.redis)
    rv = api.client.post("/v2/repository/models/fuzz/load", json=body)
    assert rv.status_code in (200, 400, 413, 415), (rv.status_code, rv.data[:300])
    assert rv.is_json and (rv.status_code == 200 or rv.json["error"])
    if rv.status_code == 200:  # a mutation the checks cannot tell from a real model
        assert api.client.post("/v2/repository/models/fuzz/unload").status_code == 200
    else:
        assert snapshot(api.redis) == before


@pytest.mark.slow
@FUZZ
@given(
    st.sampled_from(WEIGHT_SEEDS),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8),
    st.integers(0, 4000),
)
def test_mutated_weight_files_are_4xx_or_load(api, seed, flips, cut):
    filename, data = seed
    data = bytearray(data)
    for pos, value in flips:
        data[pos % len(data)] = value
    data = bytes(data[:cut] if cut < len(data) else data)
    _refused_or_loaded(api, load_body(filename=filename, data=data))


@pytest.mark.slow
@FUZZ
@given(
    st.integers(0, 3),
    st.sampled_from(
        [
            "type",
            "filters",
            "size",
            "stride",
            "pad",
            "dilation",
            "weights",
            "bias",
            "name",
            "count_pad",
        ]
    ),
    json_values,
)
def test_specs_with_random_field_values_are_4xx_or_load(api, layer, key, value):
    spec = copy.deepcopy(SPEC)
    spec["layers"][layer][key] = value
    _refused_or_loaded(api, load_body(spec))


@pytest.mark.slow
@FUZZ
@given(
    st.sampled_from(["name", "input", "preprocess", "fit", "layout", "layers", "extra"]),
    json_values,
)
def test_specs_with_random_model_values_are_4xx_or_load(api, key, value):
    _refused_or_loaded(api, load_body({**SPEC, key: value}))


def test_another_keys_jobs_results_and_models_are_404_in_every_form(blob_dir):
    api = Api(blob_dir=blob_dir, API_KEYS="key-a-0123456789ab,key-b-0123456789ab")
    a, b = (
        {"Authorization": "Bearer key-a-0123456789ab"},
        {"Authorization": "Bearer key-b-0123456789ab"},
    )
    assert api.load(headers=a).status_code == 200
    job_id = api.client.post(JOBS, json=v2_json(images(1)), headers=a).json["id"]
    api.burst()
    before, files = snapshot(api.redis), api.blob_files()
    for method, path in [
        ("get", f"/v2/jobs/{job_id}"),
        ("delete", f"/v2/jobs/{job_id}"),
        *[
            ("get", f"/v2/jobs/{job_id}/result{q}")
            for q in (
                "",
                "?format=json",
                "?format=npy&output=fc",
                "?format=png&output=conv1&image=0",
            )
        ],
        ("get", "/v2/models/tiny"),
        ("get", "/v2/models/tiny/versions/1"),
        ("get", "/v2/models/tiny/ready"),
        ("post", "/v2/repository/models/tiny/unload"),
    ]:
        rv = getattr(api.client, method)(path, headers=b)
        assert rv.status_code == 404 and rv.json["error"], (method, path, rv.json)
    for path in (JOBS, INFER):
        rv = api.client.post(path, json=v2_json(images(1)), headers=b)
        assert rv.status_code == 404, (path, rv.json)
    assert api.client.post("/v2/repository/index", headers=b).json == []
    assert snapshot(api.redis) == before and api.queue_keys() == 0
    assert api.blob_files() == files
    # B's upload of the same name lands in B's own namespace; A's model is untouched.
    assert api.client.post(LOAD, json=load_body(seed=5), headers=b).status_code == 200
    assert api.client.get("/v2/models/tiny", headers=a).json["versions"] == ["1"]
    assert (
        api.client.get(f"/v2/jobs/{job_id}/result?format=npy&output=fc", headers=a).status_code
        == 200
    )
