"""Helpers for the API integration tests: an app over fakeredis, a small model, V2 bodies."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import fakeredis
import numpy as np

from engine import Model
from service.app import create_app
from tests.models import TINY_SPEC, tiny_arrays
from worker.contract.config import Settings
from worker.contract.store import from_bytes_tensor
from worker.runner import burst

SPEC = TINY_SPEC
arrays = tiny_arrays


def npz_bytes(arrs: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrs)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def reference_model(seed: int = 0) -> Model:
    return Model.from_arrays(SPEC, arrays(seed))


def load_body(
    spec: dict = SPEC, seed: int = 0, filename: str = "weights.npz", data: bytes | None = None
) -> dict:
    data = npz_bytes(arrays(seed)) if data is None else data
    return {
        "parameters": {
            "config": json.dumps(spec),
            f"file:{filename}": base64.b64encode(data).decode(),
        }
    }


def images(n: int = 2, seed: int = 1, h: int = 9, w: int = 9) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def v2_json(imgs: np.ndarray, outputs: list[str] | None = None, **params) -> dict:
    datatype = "UINT8" if imgs.dtype == np.uint8 else "FP32"
    body: dict = {
        "inputs": [
            {
                "name": "input",
                "datatype": datatype,
                "shape": list(imgs.shape),
                "data": imgs.ravel().tolist(),
            }
        ]
    }
    if outputs is not None:
        body["outputs"] = [{"name": o} for o in outputs]
    if params:
        body["parameters"] = params
    return body


def v2_binary(imgs: np.ndarray, outputs: list[str] | None = None) -> tuple[bytes, dict]:
    datatype = "UINT8" if imgs.dtype == np.uint8 else "FP32"
    raw = imgs.tobytes()
    header: dict = {
        "inputs": [
            {
                "name": "input",
                "datatype": datatype,
                "shape": list(imgs.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    if outputs is not None:
        header["outputs"] = [{"name": o, "parameters": {"binary_data": True}} for o in outputs]
    head = json.dumps(header).encode()
    return head + raw, {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }


V2_DTYPES = {"FP32": np.float32, "FP16": np.float16, "UINT8": np.uint8, "BYTES": object}


def parse_v2(data: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """Decode a V2 response (binary or JSON outputs) to {name: array}.

    FP32, FP16 and UINT8 outputs become arrays of that type; BYTES an object array of bytes.
    """
    n = len(data) if header_length is None else int(header_length)
    doc = json.loads(data[:n])
    out, offset = {}, n
    for o in doc["outputs"]:
        size = (o.get("parameters") or {}).get("binary_data_size")
        if size is None:
            out[o["name"]] = np.array(o["data"], V2_DTYPES[o["datatype"]]).reshape(o["shape"])
        elif o["datatype"] == "BYTES":
            out[o["name"]] = from_bytes_tensor(data[offset : offset + size], o["shape"])
            offset += size
        else:
            dtype = V2_DTYPES[o["datatype"]]
            out[o["name"]] = np.frombuffer(data[offset : offset + size], dtype).reshape(o["shape"])
            offset += size
    assert offset == len(data)
    return out


STORES = ["redis", "files"]
"""Where job inputs and results live: Redis values, or files in a blob directory."""


class Api:
    """A Flask test client over a fresh fakeredis, with a burst() worker at hand.

    With blob_dir, inputs and results are files there (CONVQ_BLOB_DIR), as for every worker.
    """

    def __init__(
        self,
        *,
        blob_dir: str | None = None,
        retries: int = 0,
        settings: dict | None = None,
        **config,
    ):
        self.redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        # poll: embedded workers started over this API notice a stop within 0.1 s, not 2 s
        settings = {"threads": 1, "poll": 0.1, **(settings or {})}
        self.settings = Settings(retries=retries, blob_dir=blob_dir, **settings)
        self.app = create_app(
            {"TESTING": True, "REDIS": self.redis, "SETTINGS": self.settings, **config}
        )
        self.client = self.app.test_client()

    def burst(self) -> None:
        burst(self.redis, self.settings)

    def load(self, name: str = "tiny", headers: dict | None = None, **kw):
        return self.client.post(
            f"/v2/repository/models/{name}/load", json=load_body(**kw), headers=headers or {}
        )

    def queue_keys(self) -> int:
        return self.redis.llen("rq:queue:convq")

    def blob_files(self) -> dict[str, bytes]:
        """Return every file in the blob directory (temporary ones too) with its bytes."""
        if self.settings.blob_dir is None:
            return {}
        return {p.name: p.read_bytes() for p in Path(self.settings.blob_dir).iterdir()}


class Live:
    """The app served by werkzeug on a free loopback port, with embedded worker threads."""

    def __init__(self, workers: int = 1, **config):
        import threading

        from werkzeug.serving import make_server

        from worker.embedded import start_workers

        self.api = Api(**config)
        self.handle = (
            start_workers(self.api.redis, self.api.settings, n=workers) if workers else None
        )
        self.server = make_server("127.0.0.1", 0, self.api.app, threaded=True)
        self.url = f"127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        if self.handle is not None:
            self.handle.stop()
