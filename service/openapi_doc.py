"""The OpenAPI 3.1 document: every route, its bodies, and the one error shape."""

from __future__ import annotations

from functools import cache

REF = "#/components/schemas/"
JSON, BINARY, MULTIPART = "application/json", "application/octet-stream", "multipart/form-data"

ERRORS = {
    "400": "Malformed or invalid input (the message names the field, and the layer if any)",
    "401": "Missing or unknown bearer key (only when CONVQ_API_KEYS is set)",
    "404": "Unknown model, version or job, or one that belongs to another key",
    "409": "Conflict: result not ready, job failed, or a server model a key cannot unload",
    "413": (
        "Over a size limit (body, images, pixels, output bytes, run working memory, spec or "
        "model bytes)"
    ),
    "415": "Wrong content type, content encoding or file format",
    "429": "The key's budget is spent: jobs queued or bytes stored (see Retry-After)",
    "422": (
        "The job ran and failed, or a result asked for as JSON holds inf or NaN (JSON cannot "
        "carry them: fetch it in binary or .npy)"
    ),
    "503": "Redis unreachable, queue full, or no worker (see Retry-After)",
    "504": "infer waited past its deadline",
    "507": "Redis is out of memory (see Retry-After)",
}


def _ref(name: str) -> dict:
    return {"$ref": REF + name}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: str) -> dict:
    out = {code: {"$ref": f"#/components/responses/E{code}"} for code in codes}
    out["default"] = {"$ref": "#/components/responses/Error"}
    return out


def _op(
    summary: str,
    ok: dict,
    *codes: str,
    body: dict | None = None,
    params: list | None = None,
    secure: bool = True,
) -> dict:
    op: dict = {"summary": summary, "responses": {**ok, **_errors(*codes)}}
    if body is not None:
        op["requestBody"] = body
    if params:
        op["parameters"] = params
    if not secure:
        op["security"] = []
    return op


def _path(name: str, description: str, pattern: str | None = None) -> dict:
    schema: dict = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema,
    }


def _query(name: str, description: str, schema: dict) -> dict:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


MODEL = _path("model", "Model name", "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION = _path("version", "Model version (only the current one is kept)")
JOB = _path("job_id", "Job id returned by POST .../jobs")

STRING_BINARY = {"type": "string", "format": "binary"}
INFER_BODY: dict = {
    "required": True,
    "description": "A V2 InferRequest as JSON, or (binary tensor "
    "extension) its JSON of Inference-Header-Content-Length bytes then raw input bytes",
    "content": {JSON: {"schema": _ref("InferRequest")}, BINARY: {"schema": STRING_BINARY}},
}
LEAN_OPTIONS = {
    "channels": {
        "oneOf": [
            {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
            {"type": "string", "pattern": "^[0-9]*:[0-9]*$"},
        ],
        "description": 'Lean: keep these channels, a list or a range "start:stop" (stop '
        'excluded; "8:" to the end)',
    },
    "crop": {
        "type": "array",
        "items": {"type": "integer", "minimum": 0},
        "minItems": 4,
        "maxItems": 4,
        "description": "Lean: keep [top, left, height, width] of each map",
    },
    "dtype": {
        "enum": ["float32", "float16", "uint8"],
        "description": "Lean: the maps' type on the wire (FP32, FP16, UINT8). uint8 adds "
        "outputs <name>:scale and <name>:offset, FP32 (N, K): x[n, y, x, c] ~= "
        "scale[n, c] * q[n, y, x, c] + offset[n, c], within scale[n, c] / 2; offset is "
        "the map's min, scale (max - min) / 255",
    },
    "stats": {
        "type": "boolean",
        "description": "Lean: FP32 (N, K, 5) per image and channel: min, max, mean, std, "
        "fraction of zeros, instead of the maps",
    },
    "png": {
        "type": "boolean",
        "description": "Lean: BYTES (N,): each image's PNG grid of the maps, instead of the "
        "maps; always binary",
    },
}
JOB_BODY = {
    "required": True,
    "content": {
        **INFER_BODY["content"],
        MULTIPART: {
            "schema": {
                "type": "object",
                "required": ["images"],
                "properties": {
                    "images": {
                        "type": "array",
                        "items": STRING_BINARY,
                        "description": "PNG, JPEG or .npy (uint8 or float32) files of one size",
                    },
                    "outputs": {
                        "type": "string",
                        "description": "Comma-separated layer names, or all",
                    },
                    "explain": {
                        "type": "string",
                        "description": "An Explain object as JSON text, e.g. "
                        '{"method": "saliency", "layer": "fc", "channel": "top"}',
                    },
                    "lean": {
                        "type": "string",
                        "description": "A LeanMapping as JSON text, e.g. "
                        '{"*": {"dtype": "float16"}, "fc": {"stats": true}}',
                    },
                    "callback": {
                        "type": "string",
                        "description": "An http(s) URL POSTed a signed JobEnded body when the "
                        "job ends (see parameters.callback)",
                    },
                },
            }
        },
    },
}
CALLBACKS = {
    "jobEnded": {
        "{$request.body#/parameters/callback}": {
            "post": {
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref("JobEnded")}}},
                "responses": {
                    "2XX": {"description": "Delivered; anything else is tried again later"}
                },
            }
        }
    }
}
LOAD_BODY = {
    "required": False,
    "content": {
        JSON: {"schema": _ref("LoadRequest")},
        MULTIPART: {
            "schema": {
                "type": "object",
                "required": ["weights"],
                "properties": {
                    "spec": {"type": "string", "description": "spec.json (file or field)"},
                    "weights": {**STRING_BINARY, "description": ".npz, .safetensors or .onnx"},
                },
            }
        },
    },
}
V2_RESPONSE: dict = {
    "description": "V2 inference response; with binary outputs the JSON header "
    "(Inference-Header-Content-Length bytes) is followed by raw float32 data",
    "headers": {
        "Inference-Header-Content-Length": {
            "schema": {"type": "integer"},
            "description": "JSON header bytes",
        },
        "Server-Timing": {
            "schema": {"type": "string"},
            "description": "infer only: queue, compute, infer ms",
        },
    },
    "content": {JSON: {"schema": _ref("InferResponse")}, BINARY: {"schema": STRING_BINARY}},
}

SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "type": {"type": "string"},
            "layer": {"type": "string"},
            "field": {"type": "string"},
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            "summary": {
                "type": "array",
                "items": {"type": "object"},
                "description": "Per layer: shape, params, FLOPs, receptive field, bytes",
            },
            "labels": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Class names of the last layer's channels, when the spec has them",
            },
        },
    },
    "InferInput": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "additionalProperties": False,
        "properties": {
            "name": {"const": "input"},
            "datatype": {"enum": ["UINT8", "FP32"]},
            "shape": {
                "type": "array",
                "minItems": 3,
                "maxItems": 4,
                "items": {"type": "integer", "minimum": 1},
            },
            "data": {"type": "array", "description": "Row-major numbers (flat or nested)"},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
        },
    },
    "RequestedOutput": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {
                    "binary_data": {"type": "boolean"},
                    "classification": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "Classification extension (/infer only): return this "
                        "output's top-k per image as BYTES strings 'score:index:label' (label: "
                        "the model's labels for its last layer, else the index)",
                    },
                    **LEAN_OPTIONS,
                },
            },
        },
    },
    "InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _ref("InferInput")},
            "outputs": {"type": "array", "items": _ref("RequestedOutput")},
            "parameters": {
                "type": "object",
                "properties": {
                    "binary_data_output": {"type": "boolean"},
                    "explain": _ref("Explain"),
                    "lean": {
                        "oneOf": [_ref("LeanMapping"), {"type": "string"}],
                        "description": "Lean options per output (or as JSON text, for "
                        "clients that send scalar parameters only); an output's own "
                        "parameters are merged over its entry here",
                    },
                    "callback": {
                        "type": "string",
                        "maxLength": 2048,
                        "description": "Jobs only (400 on /infer): an http(s) URL that receives "
                        "a POST with a JobEnded body when the job finishes, fails or is "
                        "canceled, signed in X-Convq-Signature (see GET /v2/webhook-secret). "
                        "Loopback, private, link-local and other internal addresses are "
                        "refused (400) unless the server's CONVQ_CALLBACK_ALLOW lists them",
                    },
                },
            },
        },
    },
    "LeanMapping": {
        "type": "object",
        "description": 'Output name, or "*" for every requested layer output, to its lean '
        'options; an output\'s own entry replaces "*"',
        "additionalProperties": {
            "type": "object",
            "additionalProperties": False,
            "properties": LEAN_OPTIONS,
        },
    },
    "Explain": {
        "type": "object",
        "description": "Explain channel `channel` of layer `layer` (its sum over positions) "
        "over the input pixels. The result gains explain:map (N, H, W) float32 "
        "((N, H, W, C) for gradient), explain:overlay (N, H, W, 3) RGB 0..255 (format=png "
        "draws it) and explain:channel (N,), the channel explained per image.",
        "required": ["method"],
        "additionalProperties": False,
        "properties": {
            "method": {
                "enum": ["saliency", "gradcam", "gradient"],
                "description": "saliency: max over channels of |d score / d input|; gradcam: "
                "ReLU of the gradient-weighted channels of conv layer `at`, upsampled; "
                "gradient: d score / d input",
            },
            "layer": {"type": "string", "description": "the target layer (default: the last)"},
            "channel": {
                "oneOf": [{"type": "integer", "minimum": 0}, {"const": "top"}],
                "description": "a channel, or top: each image's highest-scoring one (default)",
            },
            "at": {
                "type": "string",
                "description": "gradcam only: the conv layer (default: the last at or before "
                "`layer`)",
            },
        },
    },
    "InferResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "datatype", "shape"],
                    "properties": {
                        "name": {"type": "string"},
                        "datatype": {"enum": ["FP32", "FP16", "UINT8", "BYTES"]},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "data": {
                            "type": "array",
                            "items": {"type": ["number", "string"]},
                            "description": "numbers; 'score:index:label' strings for BYTES",
                        },
                        "parameters": {
                            "type": "object",
                            "description": "binary_data_size; for lean outputs: scale and "
                            "offset (uint8: the names of its scale and offset outputs), "
                            "stats ('min,max,mean,std,zeros', the last axis), content_type "
                            "(png: image/png)",
                        },
                    },
                },
            },
        },
    },
    "LoadRequest": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "parameters": {
                "type": "object",
                "description": "config: the spec as a JSON string; "
                "file:<name>.npz|.safetensors|.onnx: the weights, base64",
                "properties": {"config": {"type": "string"}},
                "additionalProperties": {"type": "string"},
            }
        },
    },
    "ModelState": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "state": {"type": "string"},
            "reason": {"type": "string"},
        },
    },
    "JobAccepted": {
        "type": "object",
        "required": ["id", "status"],
        "properties": {
            "id": {"type": "string"},
            "status": {"const": "queued"},
            "model": {"type": "string"},
            "version": {"type": "integer"},
            "outputs": {"type": "array", "items": {"type": "string"}},
            "lean": {"type": "object", "description": "The checked lean options per output"},
        },
    },
    "JobStatus": {
        "type": "object",
        "required": ["id", "status"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["queued", "started", "finished", "failed", "canceled"]},
            "model": {"type": ["string", "null"]},
            "version": {"type": ["integer", "null"]},
            "outputs": {"type": ["array", "null"], "items": {"type": "string"}},
            "lean": {"type": "object", "description": "The checked lean options per output"},
            "progress": {
                "type": ["object", "null"],
                "description": "The layer the job has "
                "reached, 1-based, updated at most every 200 ms and at the end.",
                "properties": {
                    "layer": {"type": "integer"},
                    "of": {"type": "integer"},
                    "name": {"type": "string"},
                },
            },
            "timings": {"type": "object"},
            "error": {"type": ["string", "null"]},
            "attempt": {"type": "integer"},
            "batch": {
                "type": ["object", "null"],
                "description": "Set when the worker ran this job in one engine batch with "
                "other queued jobs of the same model, outputs and image size (dynamic "
                "batching): how many jobs and images that batch held. The job's results "
                "hold only its own images. null: it ran alone.",
                "properties": {
                    "jobs": {"type": "integer"},
                    "images": {"type": "integer"},
                },
            },
            "callback": {
                "type": "object",
                "description": "Only for a job with a callback: its delivery. state: waiting "
                "(the job has not ended), pending (due, or waiting for its next attempt), "
                "delivered (a 2xx answer), failed (given up)",
                "required": ["url", "state"],
                "properties": {
                    "url": {"type": "string"},
                    "state": {"enum": ["waiting", "pending", "delivered", "failed"]},
                    "attempts": {"type": "integer"},
                    "last_status": {"type": ["integer", "null"]},
                    "last_error": {"type": ["string", "null"]},
                    "next_attempt_at": {"type": ["string", "null"]},
                    "delivered_at": {"type": ["string", "null"]},
                },
            },
        },
    },
    "JobEnded": {
        "type": "object",
        "description": "The body POSTed to a job's callback (the same bytes on every attempt; "
        "X-Convq-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.' + body)>, "
        "X-Convq-Job: the job id, X-Convq-Attempt: 1, 2, ...)",
        "required": ["id", "status"],
        "properties": {
            "id": {"type": "string"},
            "status": {"enum": ["finished", "failed", "canceled"]},
            "model": {"type": ["string", "null"]},
            "version": {"type": ["integer", "null"]},
            "outputs": {"type": ["array", "null"], "items": {"type": "string"}},
            "error": {"type": ["string", "null"]},
            "timings": {"type": "object"},
        },
    },
    "WebhookSecret": {
        "type": "object",
        "required": ["secret", "algorithm", "header"],
        "properties": {
            "secret": {"type": "string", "description": "HMAC key (its UTF-8 bytes)"},
            "algorithm": {"const": "HMAC-SHA256"},
            "header": {"const": "X-Convq-Signature"},
            "signed": {"type": "string"},
        },
    },
    "JobList": {
        "type": "object",
        "required": ["jobs", "next"],
        "properties": {
            "jobs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "model", "status", "created"],
                    "properties": {
                        "id": {"type": "string"},
                        "model": {"type": ["string", "null"]},
                        "status": {"enum": ["queued", "started", "finished", "failed", "canceled"]},
                        "created": {"type": "string", "description": "Enqueue time, ISO 8601 UTC"},
                    },
                },
            },
            "next": {
                "type": ["string", "null"],
                "description": "Cursor of the next page (pass as cursor=); null on the last page",
            },
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["id", "status"],
        "properties": {"id": {"type": "string"}, "status": {"enum": ["canceled", "deleted"]}},
    },
}


def _paths() -> dict:
    obj = {"type": "object"}
    model_meta = _json(_ref("ModelMetadata"), "V2 model metadata plus a per-layer summary")
    ready = _json(obj, "The model is loaded")
    infer = _op(
        "Run an inference and wait for it (bounded; 504 past the deadline)",
        {"200": V2_RESPONSE},
        "400",
        "401",
        "404",
        "413",
        "415",
        "422",
        "429",
        "503",
        "504",
        "507",
        body=INFER_BODY,
    )
    return {
        "/v2/health/live": {"get": _op("Liveness", {"200": _json(obj, "Alive")}, secure=False)},
        "/v2/health/ready": {
            "get": _op(
                "Readiness: Redis reachable and a worker alive",
                {"200": _json(obj, "Ready")},
                "503",
                secure=False,
            )
        },
        "/v2": {
            "get": _op(
                "Server metadata", {"200": _json(_ref("ServerMetadata"), "Server")}, "401", "503"
            )
        },
        "/v2/repository/index": {
            "post": _op(
                "List models",
                {"200": _json({"type": "array", "items": _ref("ModelState")}, "Models")},
                "400",
                "401",
                "413",
                "503",
                body={
                    "required": False,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"ready": {"type": "boolean"}},
                            }
                        }
                    },
                },
            )
        },
        "/v2/repository/models/{model}/load": {
            "post": _op(
                "Upload or replace a model (Triton JSON or multipart); with keys, in the key's own "
                "namespace (another key's models of that name are neither seen nor touched)",
                {"200": _json(_ref("ModelState"), "Loaded")},
                "400",
                "401",
                "404",
                "413",
                "415",
                "503",
                "507",
                body=LOAD_BODY,
                params=[MODEL],
            )
        },
        "/v2/repository/models/{model}/unload": {
            "post": _op(
                "Remove a model",
                {"200": _json(_ref("ModelState"), "Unloaded")},
                "400",
                "401",
                "404",
                "409",
                "413",
                "503",
                params=[MODEL],
                body={"required": False, "content": {JSON: {"schema": obj}}},
            )
        },
        "/v2/models/{model}": {
            "get": _op(
                "Model metadata", {"200": model_meta}, "400", "401", "404", "503", params=[MODEL]
            )
        },
        "/v2/models/{model}/versions/{version}": {
            "get": _op(
                "Model metadata of a version",
                {"200": model_meta},
                "400",
                "401",
                "404",
                "503",
                params=[MODEL, VERSION],
            )
        },
        "/v2/models/{model}/ready": {
            "get": _op(
                "Model readiness", {"200": ready}, "400", "401", "404", "503", params=[MODEL]
            )
        },
        "/v2/models/{model}/versions/{version}/ready": {
            "get": _op(
                "Model readiness of a version",
                {"200": ready},
                "400",
                "401",
                "404",
                "503",
                params=[MODEL, VERSION],
            )
        },
        "/v2/models/{model}/infer": {"post": {**infer, "parameters": [MODEL]}},
        "/v2/models/{model}/versions/{version}/infer": {
            "post": {**infer, "parameters": [MODEL, VERSION]}
        },
        "/v2/models/{model}/jobs": {
            "post": _op(
                "Queue a job and return at once",
                {
                    "202": {
                        **_json(_ref("JobAccepted"), "Queued"),
                        "headers": {
                            "Location": {
                                "schema": {"type": "string"},
                                "description": "The job's status URL",
                            }
                        },
                    }
                },
                "400",
                "401",
                "404",
                "413",
                "415",
                "429",
                "503",
                "507",
                body=JOB_BODY,
                params=[MODEL],
            )
            | {"callbacks": CALLBACKS}
        },
        "/v2/webhook-secret": {
            "get": _op(
                "The secret signing the caller's job callbacks (one per API key)",
                {"200": _json(_ref("WebhookSecret"), "The secret")},
                "401",
                "503",
            )
        },
        "/v2/jobs": {
            "get": _op(
                "The caller's own jobs (every job when auth is off), newest first, paginated; "
                "jobs whose records expired or were deleted are left out",
                {"200": _json(_ref("JobList"), "One page")},
                "400",
                "401",
                "503",
                params=[
                    _query(
                        "status",
                        "Only jobs in this state",
                        {"enum": ["queued", "started", "finished", "failed", "canceled"]},
                    ),
                    _query("model", "Only jobs of this model name", {"type": "string"}),
                    _query(
                        "limit",
                        "Jobs per page (default 100)",
                        {"type": "integer", "minimum": 1, "maximum": 1000},
                    ),
                    _query(
                        "cursor",
                        "The previous page's next (opaque); pages never repeat or skip a job",
                        {"type": "string"},
                    ),
                ],
            )
        },
        "/v2/jobs/{job_id}": {
            "get": _op(
                "Job status, progress, timings, error",
                {"200": _json(_ref("JobStatus"), "Status")},
                "401",
                "404",
                "503",
                params=[JOB],
            ),
            "delete": _op(
                "Cancel a job or delete its result",
                {"200": _json(_ref("Deleted"), "Gone")},
                "401",
                "404",
                "503",
                params=[JOB],
            ),
        },
        "/v2/jobs/{job_id}/result": {
            "get": _op(
                "The job's outputs: V2 response (binary by default), one .npy, or a PNG grid",
                {
                    "200": {
                        **V2_RESPONSE,
                        "content": {
                            **V2_RESPONSE["content"],
                            "image/png": {"schema": STRING_BINARY},
                        },
                    }
                },
                "400",
                "401",
                "404",
                "409",
                "413",
                "422",
                "503",
                params=[
                    JOB,
                    _query(
                        "format",
                        "binary (default), json, npy or png",
                        {"enum": ["binary", "json", "npy", "png"]},
                    ),
                    _query(
                        "output",
                        "Layer name(s), comma-separated (the parameter is given once); npy and png "
                        "need exactly one",
                        {"type": "string"},
                    ),
                    _query(
                        "image", "Image index for format=png", {"type": "integer", "minimum": 0}
                    ),
                    _query(
                        "top",
                        "With format=json: each output as its top-K 'score:index:label' "
                        "strings per image (the classification extension)",
                        {"type": "integer", "minimum": 1},
                    ),
                ],
            )
        },
        "/openapi.json": {
            "get": _op("This document", {"200": _json(obj, "OpenAPI 3.1")}, secure=False)
        },
    }


@cache
def document() -> dict:
    """Return the OpenAPI 3.1 document as a dict."""
    error = _json(_ref("Error"), "Error")
    responses = {f"E{code}": _json(_ref("Error"), text) for code, text in ERRORS.items()}
    for code in ("503", "507"):
        responses[f"E{code}"]["headers"] = {
            "Retry-After": {"schema": {"type": "integer"}, "description": "Seconds"}
        }
    responses["E401"]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "convq",
            "version": "0.1.0",
            "description": "ConvNet batch inference over the Open Inference Protocol (V2) "
            "with a jobs extension. Every error is JSON {error, type}.",
        },
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}, {}],
        "paths": _paths(),
        "components": {
            "schemas": SCHEMAS,
            "responses": {**responses, "Error": {**error, "description": "Any other error"}},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
