"""The whole stack over HTTP: redis-server, one `convq api` (gunicorn), two `convq worker`s."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from rq.job import Job

from engine import Model
from tests.system.models import HEAD, conv_stack, slow_images
from tests.system.procs import start_api, start_worker, worker_pids

pytestmark = [pytest.mark.system, pytest.mark.slow]

LAYERS = 24


@functools.cache
def slow_model() -> tuple[dict, dict]:
    """24 3x3 convs, 64 channels, a global pool: ~SLOW_SECONDS per job of slow_images()."""
    return conv_stack(LAYERS, seed=7)


def npz(arrays: dict) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture
def stack(redis_server_factory, tmp_path):
    server = redis_server_factory(aof=True)
    procs = []
    try:
        api, base = start_api(
            server.url,
            tmp_path,
            env={"CONVQ_API_WORKERS": "1", "CONVQ_MAX_CONTENT_LENGTH": "4000000"},
        )
        procs.append(api)
        for i in range(2):
            procs.append(start_worker(server.url, tmp_path, name=f"w{i}"))
        yield server, base, procs[1:]
    finally:
        for proc in procs:
            proc.close()


def upload(base: str, name: str, spec: dict, arrays: dict) -> None:
    rv = requests.post(
        f"{base}/v2/repository/models/{name}/load",
        timeout=60,
        files={"spec": ("spec.json", json.dumps(spec)), "weights": ("w.npz", npz(arrays))},
    )
    assert rv.status_code == 200, rv.text


def wait_status(base: str, job_id: str, predicate, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = requests.get(f"{base}/v2/jobs/{job_id}", timeout=10).json()
        if predicate(status):
            return status
        time.sleep(0.05)
    raise AssertionError(f"timed out: {status}")


def test_job_survives_its_worker_being_killed(stack):
    server, base, workers = stack
    spec, arrays = slow_model()
    upload(base, "slow", spec, arrays)
    images = slow_images(LAYERS, seed=1)
    files = [("images", (f"{i}.npy", _npy(img))) for i, img in enumerate(images)]
    rv = requests.post(
        f"{base}/v2/models/slow/jobs", files=files, data={"outputs": HEAD}, timeout=30
    )
    assert rv.status_code == 202, rv.text
    job_id = rv.json()["id"]
    wait_status(
        base,
        job_id,
        lambda s: s["status"] == "started" and s["progress"] and s["progress"]["layer"] >= 2,
        60,
    )
    busy = Job.fetch(job_id, connection=server.client()).worker_name
    pid = worker_pids(server.url)[busy]
    os.kill(pid, signal.SIGKILL)
    status = wait_status(base, job_id, lambda s: s["status"] in ("finished", "failed"), 120)
    assert status["status"] == "finished" and status["attempt"] >= 2, status
    rv = requests.get(f"{base}/v2/jobs/{job_id}/result?output={HEAD}&format=npy", timeout=30)
    got = np.load(io.BytesIO(rv.content), allow_pickle=False)
    expect = Model.from_arrays(spec, arrays).run(images, outputs=[HEAD])[HEAD]
    np.testing.assert_array_equal(got, expect)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def test_redis_outage_is_503_then_recovers(stack):
    server, base, _ = stack
    spec = {
        "name": "t",
        "input": {"height": 8, "width": 8, "channels": 1},
        "layers": [{"name": "c", "type": "conv", "filters": 2, "size": 3}],
    }
    arrays = {"c.w": np.ones((2, 3, 3, 1), np.float32), "c.b": np.zeros(2, np.float32)}
    upload(base, "t", spec, arrays)
    body = {
        "inputs": [
            {"name": "input", "datatype": "UINT8", "shape": [1, 8, 8, 1], "data": list(range(64))}
        ]
    }
    assert requests.post(f"{base}/v2/models/t/infer", json=body, timeout=30).status_code == 200
    for outage in ("pause", "kill"):
        getattr(server, outage)()
        for method, path in (
            ("get", "/v2/health/ready"),
            ("post", "/v2/models/t/jobs"),
            ("get", "/v2/models/t"),
        ):
            started = time.monotonic()
            rv = requests.request(method, base + path, json=body, timeout=30)
            took = time.monotonic() - started
            assert rv.status_code == 503, (outage, path, rv.text)
            assert int(rv.headers["Retry-After"]) > 0 and "error" in rv.json()
            assert took < 3.0, (outage, path, took)  # ~2 s (0.5 s socket waits) + slack
        assert requests.get(f"{base}/v2/health/live", timeout=5).status_code == 200
        if outage == "pause":
            server.resume()
        else:
            server.start()  # AOF kept the model
        deadline = time.monotonic() + 30
        while requests.get(f"{base}/v2/health/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "not ready again"
            time.sleep(0.2)
        rv = requests.post(f"{base}/v2/models/t/infer", json=body, timeout=60)
        assert rv.status_code == 200, rv.text
        assert rv.json()["outputs"][0]["shape"] == [1, 6, 6, 2]


def _post_chunked(base: str, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", path)
    conn.putheader("Transfer-Encoding", "chunked")
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    try:
        for i in range(0, len(body), 65536):
            part = body[i : i + 65536]
            conn.send(b"%x\r\n" % len(part) + part + b"\r\n")
        conn.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server may answer 413 and close before the whole body is sent
    response = conn.getresponse()
    out = response.status, json.loads(response.read())
    conn.close()
    return out


def test_chunked_bodies_are_bounded_never_truncated(stack):
    _, base, _ = stack
    spec = {
        "name": "g",
        "input": {"channels": 1},
        "layers": [{"name": "c", "type": "conv", "filters": 1, "size": 1}],
    }
    upload(
        base, "g", spec, {"c.w": np.ones((1, 1, 1, 1), np.float32), "c.b": np.zeros(1, np.float32)}
    )
    for side, status in ((100, 202), (2100, 413)):  # 10 KB fits; 4.4 MB is over 4,000,000
        images = np.zeros((1, side, side, 1), np.uint8)
        raw = images.tobytes()
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "UINT8",
                        "shape": list(images.shape),
                        "parameters": {"binary_data_size": len(raw)},
                    }
                ]
            }
        ).encode()
        code, doc = _post_chunked(
            base,
            "/v2/models/g/jobs",
            head + raw,
            {"Inference-Header-Content-Length": str(len(head))},
        )
        assert code == status, doc
        assert ("id" in doc) if status == 202 else ("error" in doc)


def test_tritonclient_against_real_processes(stack):
    _, base, _ = stack
    client = httpclient.InferenceServerClient(base.removeprefix("http://"), network_timeout=60)
    spec = {
        "name": "m",
        "input": {"height": 16, "width": 16, "channels": 3},
        "layers": [
            {"name": "conv", "type": "conv", "filters": 4, "size": 3, "pad": 1},
            {"name": "relu", "type": "relu"},
            {"name": "pool", "type": "avgpool", "size": 2},
        ],
    }
    rng = np.random.default_rng(3)
    arrays = {
        "conv.w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "conv.b": rng.standard_normal(4).astype(np.float32),
    }
    client.load_model("m", config=json.dumps(spec), files={"file:w.npz": npz(arrays)})
    assert client.is_server_ready() and client.is_model_ready("m")
    assert [o["name"] for o in client.get_model_metadata("m")["outputs"]] == [
        "conv",
        "relu",
        "pool",
    ]
    images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    expect = Model.from_arrays(spec, arrays).run(images, outputs="all")
    for binary in (True, False):
        tensor = httpclient.InferInput("input", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in expect]
        result = client.infer("m", [tensor], outputs=outputs)
        for name, array in expect.items():
            np.testing.assert_array_equal(result.as_numpy(name), array)
    # lean results, shaped by the worker processes before they store them
    lean = {
        "conv": {"dtype": "uint8", "channels": [3, 1]},
        "relu": {"stats": True, "crop": [2, 2, 8, 8]},
        "pool": {"png": True},
    }
    result = client.infer("m", [tensor], outputs=outputs, parameters={"lean": json.dumps(lean)})
    q, scale = result.as_numpy("conv"), result.as_numpy("conv:scale").astype(np.float64)
    back = scale[:, None, None, :] * q + result.as_numpy("conv:offset")[:, None, None, :]
    step = scale[:, None, None, :]
    assert np.all(np.abs(back - expect["conv"][..., [3, 1]]) <= step / 2 * (1 + 1e-9))
    relu = expect["relu"][:, 2:10, 2:10]
    np.testing.assert_array_equal(result.as_numpy("relu")[..., 1], relu.max(axis=(1, 2)))
    np.testing.assert_allclose(result.as_numpy("relu")[..., 4], (relu == 0).mean(axis=(1, 2)))
    assert [p[:4] for p in result.as_numpy("pool")] == [b"\x89PNG"] * 3
    client.close()


def test_full_redis_is_507_with_retry_after_never_500(redis_server_factory):
    from service.app import create_app

    server = redis_server_factory("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    app = create_app({"TESTING": True, "REDIS_URL": server.url})
    client = app.test_client()
    spec = {
        "name": "t",
        "input": {"channels": 1},
        "layers": [{"name": "c", "type": "conv", "filters": 1, "size": 1}],
    }
    rv = client.post(
        "/v2/repository/models/t/load",
        content_type="multipart/form-data",
        data={
            "spec": json.dumps(spec),
            "weights": (
                io.BytesIO(
                    npz({"c.w": np.ones((1, 1, 1, 1), np.float32), "c.b": np.zeros(1, np.float32)})
                ),
                "w.npz",
            ),
        },
    )
    assert rv.status_code == 200, rv.json
    image = _npy(np.zeros((700, 700), np.uint8))  # ~0.5 MB per job input
    codes = []
    for _ in range(20):
        rv = client.post(
            "/v2/models/t/jobs",
            content_type="multipart/form-data",
            data={"images": [(io.BytesIO(image), "a.npy")]},
        )
        codes.append(rv.status_code)
        if rv.status_code != 202:
            break
    assert codes[-1] == 507, codes
    assert int(rv.headers["Retry-After"]) > 0 and "full" in rv.json["error"]
    assert set(codes) <= {202, 507}


def test_convq_up_serves_the_demo_model_embedded(tmp_path):
    from service.demo import demo_model

    # An empty REDIS_URL counts as unset: `convq up` embeds its own in-process Redis.
    temp = tmp_path / "temp"
    temp.mkdir()
    proc, base = start_api(
        None,
        tmp_path,
        command="up",
        env={"REDIS_URL": "", "CONVQ_BLOB_DIR": "", "TMPDIR": str(temp)},
    )
    try:
        deadline = time.monotonic() + 60
        while requests.get(f"{base}/v2/health/ready", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, proc.log()
            time.sleep(0.2)
        log = proc.log()
        assert "curl" in log and "convq submit" in log and "/v2/models/demo/jobs" in log
        picture = [line for line in log.split() if line.startswith("images=@")][0][8:]
        rv = requests.post(
            f"{base}/v2/models/demo/jobs",
            timeout=30,
            data={"outputs": "all"},
            files={"images": ("a.png", Path(picture).read_bytes())},
        )
        assert rv.status_code == 202, rv.text
        job_id = rv.json()["id"]
        wait_status(base, job_id, lambda s: s["status"] == "finished", 60)
        rv = requests.get(f"{base}/v2/jobs/{job_id}/result?output=pool1&format=npy", timeout=30)
        got = np.load(io.BytesIO(rv.content), allow_pickle=False)
        from PIL import Image

        with Image.open(picture) as im:
            image = np.asarray(im.convert("RGB"))[None]
        spec, arrays = demo_model()
        expect = Model.from_arrays(spec, arrays).run(image, outputs=["pool1"])["pool1"]
        np.testing.assert_array_equal(got, expect)
        # The job's data lived in a temporary blob directory, gone once a SIGTERM stops it.
        (blobs,) = temp.glob("convq-blobs-*")
        assert any(p.name.startswith("result-") for p in blobs.iterdir())
        assert proc.stop(timeout=30) == 0, proc.log()
        assert not blobs.exists()
    finally:
        proc.close()
