"""`convq submit` against a live in-process server: real HTTP, embedded worker threads."""

from __future__ import annotations

import io
import json
import threading

import fakeredis
import numpy as np
import pytest
from PIL import Image
from werkzeug.serving import make_server

from engine import Model
from service import client
from service.app import create_app
from service.demo import demo_images, demo_model
from worker.contract.config import Settings
from worker.embedded import start_workers


@pytest.fixture(scope="module")
def server():
    """A convq API on a free port with one embedded worker, sharing one fakeredis."""
    redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    settings = Settings(threads=1, poll=0.1, callback_allow="127.0.0.1/32")
    app = create_app(
        {"REDIS": redis, "SETTINGS": settings, "API_KEYS": "k1-0123456789abcd,k2-0123456789abcd"}
    )
    http = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    workers = start_workers(redis, settings, 1)
    yield f"http://127.0.0.1:{http.server_port}"
    workers.stop(timeout=10)
    http.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """spec.json + weights.npz of the demo model, and a folder with two sample pictures."""
    root = tmp_path_factory.mktemp("demo")
    spec, arrays = demo_model()
    (root / "spec.json").write_text(json.dumps(spec))
    np.savez(root / "weights.npz", **arrays)
    pics = root / "pics"
    pics.mkdir()
    for name, data in demo_images()[:2]:
        (pics / name).write_bytes(data)
    (pics / "notes.txt").write_text("not an image: skipped")
    return root


def test_uploads_runs_and_saves_npz_and_png_grids(server, demo_files, tmp_path, capsys):
    out = tmp_path / "out"
    status = client.main(
        [
            "--url",
            server,
            "--api-key",
            "k1-0123456789abcd",
            "--spec",
            str(demo_files / "spec.json"),
            "--weights",
            str(demo_files / "weights.npz"),
            "--outputs",
            "all",
            "--out",
            str(out),
            str(demo_files / "pics"),
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    npz_path = out / captured.out.strip().rsplit("/", 1)[-1]
    assert npz_path.suffix == ".npz" and npz_path.exists()
    job = npz_path.stem
    assert "uploaded demo version 1" in captured.err
    assert "3/3" in captured.err  # the bar reached the last of the demo's three layers

    with np.load(npz_path, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["conv1", "pool1", "relu1"]
        assert saved["conv1"].shape == (2, 55, 55, 96)
        assert saved["pool1"].shape == (2, 27, 27, 96)
        pool1 = saved["pool1"]
    # The activations are the model's: recompute them with the engine directly.
    pictures = sorted(demo_images()[:2])  # the folder is read in sorted order
    batch = np.stack([np.asarray(Image.open(io.BytesIO(data))) for _, data in pictures])
    expected = Model.from_arrays(*demo_model()).run(batch, outputs=["pool1"])["pool1"]
    np.testing.assert_allclose(pool1, expected, rtol=1e-4, atol=1e-4)

    grids = sorted(p.relative_to(out / job).as_posix() for p in (out / job).rglob("*.png"))
    assert grids == [
        f"{layer}/{i:03d}-{name[:-4]}.png"
        for layer in ("conv1", "pool1", "relu1")
        for i, (name, _) in enumerate(pictures)
    ]
    with Image.open(out / job / "pool1" / "000-scene.png") as grid:
        assert grid.format == "PNG"


def test_existing_model_selected_outputs_and_no_png(server, demo_files, tmp_path, capsys):
    spec, arrays = demo_model()
    client.main(
        [
            "--url",
            server,
            "--api-key",
            "k2-0123456789abcd",
            "--model",
            "mine",
            "--spec",
            str(demo_files / "spec.json"),
            "--weights",
            str(demo_files / "weights.npz"),
            "--no-png",
            "--out",
            str(tmp_path),
            str(demo_files / "pics" / "stripes.png"),
        ]
    )
    capsys.readouterr()
    status = client.main(
        [
            "--url",
            server,
            "--api-key",
            "k2-0123456789abcd",
            "--model",
            "mine",
            "--outputs",
            "relu1",
            "--no-png",
            "--out",
            str(tmp_path),
            str(demo_files / "pics" / "stripes.png"),
        ]
    )
    captured = capsys.readouterr()
    assert status == 0, captured.err
    with np.load(captured.out.strip(), allow_pickle=False) as saved:
        assert saved.files == ["relu1"]
        assert saved["relu1"].min() >= 0
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "nope"], "nope"),  # unknown model: the server's 404 message
        (["--outputs", "conv9"], "conv9"),  # unknown layer: the server's 400 message
        (["--api-key", "wrong"], "401"),
    ],
)
def test_server_refusals_end_with_status_1_and_the_reason(
    server, demo_files, capsys, extra, message
):
    argv = ["--url", server, "--api-key", "k1-0123456789abcd", *extra, str(demo_files / "pics")]
    assert client.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_local_mistakes_need_no_server(tmp_path, capsys):
    assert client.main(["--url", "http://127.0.0.1:9", str(tmp_path / "missing.png")]) == 1
    assert "no such file" in capsys.readouterr().err
    assert client.main(["--url", "http://127.0.0.1:9", str(tmp_path)]) == 1
    assert "no images found" in capsys.readouterr().err
    assert client.main(["--spec", "s.json", str(tmp_path)]) == 2  # --weights missing
    img = tmp_path / "a.png"
    img.write_bytes(demo_images()[0][1])
    assert client.main(["--url", "http://127.0.0.1:9", str(img)]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_explain_saves_overlays_and_maps(server, demo_files, tmp_path, capsys):
    spec, arrays = demo_model()
    last = spec["layers"][-1]["name"]
    args = ["--url", server, "--api-key", "k1-0123456789abcd", "--model", "explained"]
    args += ["--spec", str(demo_files / "spec.json"), "--weights", str(demo_files / "weights.npz")]
    args += ["--outputs", last, "--explain", "saliency", "--layer", last, "--channel", "top"]
    status = client.main([*args, "--out", str(tmp_path), str(demo_files / "pics")])
    assert status == 0, capsys.readouterr().err
    npz_path = capsys.readouterr().out.strip()
    saved = np.load(npz_path)
    assert set(saved.files) == {last, "explain:map", "explain:overlay", "explain:channel"}
    pics = sorted((demo_files / "pics").glob("*.png"))
    want = Model.from_arrays(spec, arrays).gradients(
        np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pics]),
        {"layer": last, "channel": "top"},
    )["input"]
    np.testing.assert_allclose(saved["explain:map"], np.abs(want).max(axis=3), rtol=1e-4, atol=1e-6)
    overlays = sorted((tmp_path / npz_path.split("/")[-1][:-4] / "explain:overlay").iterdir())
    assert len(overlays) == len(pics)
    picture = np.asarray(Image.open(overlays[0]))
    assert picture.shape == (*want.shape[1:3], 3)


def test_top_k_prints_the_last_layers_best_classes_with_labels(
    server, demo_files, tmp_path, capsys
):
    spec, arrays = demo_model()
    spec = dict(spec, layers=[*spec["layers"], {"name": "gap", "type": "globalavgpool"}])
    model = Model.from_arrays(spec, arrays)
    last = model.layer_names[-1]
    k = model.output_shapes(35, 35)[last][2]
    labeled = dict(spec, labels=[f"class-{i}" for i in range(k)])
    (tmp_path / "spec.json").write_text(json.dumps(labeled))
    args = ["--url", server, "--api-key", "k1-0123456789abcd", "--model", "labeled", "--no-png"]
    args += ["--spec", str(tmp_path / "spec.json"), "--weights", str(demo_files / "weights.npz")]
    args += ["--outputs", model.layer_names[0], "--top", "2", "--out", str(tmp_path)]
    status = client.main([*args, str(demo_files / "pics")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    *tops, path = captured.out.strip().splitlines()
    with np.load(path, allow_pickle=False) as saved:
        assert set(saved.files) == {model.layer_names[0], last}
        scores = saved[last].reshape(len(tops), -1)
    assert len(tops) == 2
    for line, row in zip(tops, scores, strict=True):
        picture, ranked = line.split(": ", 1)
        assert picture.endswith(".png")
        best = np.argsort(-row, kind="stable")[:2]
        want = [f"{row[i]:f}:{i}:class-{i}" for i in best]
        assert ranked.split(", ") == want


def _lean_run(server, demo_files, tmp_path, capsys, *flags) -> tuple[int, str, str]:
    args = ["--url", server, "--api-key", "k1-0123456789abcd", "--model", "lean"]
    args += ["--spec", str(demo_files / "spec.json"), "--weights", str(demo_files / "weights.npz")]
    args += ["--outputs", "pool1", *flags, "--out", str(tmp_path), str(demo_files / "pics")]
    status = client.main(args)
    captured = capsys.readouterr()
    return status, captured.out.strip(), captured.err


def _demo_pool1() -> np.ndarray:
    pictures = sorted(demo_images()[:2])
    batch = np.stack([np.asarray(Image.open(io.BytesIO(data))) for _, data in pictures])
    return Model.from_arrays(*demo_model()).run(batch, outputs=["pool1"])["pool1"]


def test_lean_flags_uint8_channels_and_crop(server, demo_files, tmp_path, capsys):
    flags = ["--dtype", "uint8", "--channels", "8:24", "--crop", "2,3,20,10"]
    status, npz, err = _lean_run(server, demo_files, tmp_path, capsys, *flags)
    assert status == 0, err
    with np.load(npz, allow_pickle=False) as saved:
        assert sorted(saved.files) == ["pool1", "pool1:offset", "pool1:scale"]
        q, scale, offset = saved["pool1"], saved["pool1:scale"], saved["pool1:offset"]
    assert q.dtype == np.uint8 and q.shape == (2, 20, 10, 16)
    step = scale.astype(np.float64)[:, None, None, :]
    back = step * q + offset[:, None, None, :]
    want = _demo_pool1()[:, 2:22, 3:13, 8:24]
    assert np.all(np.abs(back - want) <= step / 2 + 1e-4 * np.abs(want).max())  # engine rounding
    grids = sorted(p.name for p in (tmp_path / npz.rsplit("/", 1)[-1][:-4]).rglob("*.png"))
    assert len(grids) == 2  # pool1's grids; none for the (N, K) scale and offset


def test_lean_flags_png_only_and_stats(server, demo_files, tmp_path, capsys):
    status, npz, err = _lean_run(server, demo_files, tmp_path / "png", capsys, "--png")
    assert status == 0, err
    with np.load(npz, allow_pickle=False) as saved:
        assert saved.files == []  # the pictures only
    grids = sorted((tmp_path / "png").rglob("*.png"))
    assert len(grids) == 2
    with Image.open(grids[0]) as picture:
        assert picture.format == "PNG"
    status, npz, err = _lean_run(server, demo_files, tmp_path / "stats", capsys, "--stats")
    assert status == 0, err
    with np.load(npz, allow_pickle=False) as saved:
        stats = saved["pool1"]
    want = _demo_pool1()
    assert stats.shape == (2, want.shape[3], 5)
    np.testing.assert_allclose(stats[..., 2], want.mean(axis=(1, 2)), rtol=1e-4, atol=1e-5)
    assert not list((tmp_path / "stats").rglob("*.png"))


@pytest.mark.parametrize(
    "flags",
    [
        ["--stats", "--png"],
        ["--png", "--dtype", "uint8"],
        ["--crop", "1,2"],
        ["--channels", "a,b"],
        ["--top", "3", "--stats"],
        ["--png", "--no-png"],
    ],
)
def test_lean_flag_mistakes_need_no_server(tmp_path, capsys, flags):
    assert client.main(["--url", "http://127.0.0.1:9", *flags, str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err


def test_lean_flags_the_server_refuses_end_with_status_1(server, demo_files, tmp_path, capsys):
    status, _, err = _lean_run(server, demo_files, tmp_path, capsys, "--channels", "0:999")
    assert status == 1 and "channels" in err and "pool1" in err


def test_callback_reaches_the_receiver_signed_and_a_refused_one_is_status_1(
    server, demo_files, tmp_path, capsys
):
    import requests

    from tests.integration.receiver import Receiver
    from worker.contract import webhooks

    key = "k2-0123456789abcd"
    args = ["--url", server, "--api-key", key, "--outputs", "pool1", "--no-png"]
    args += ["--spec", str(demo_files / "spec.json"), "--weights", str(demo_files / "weights.npz")]
    hook = Receiver()
    try:
        status = client.main(
            [*args, "--callback", hook.url, "--out", str(tmp_path), str(demo_files / "pics")]
        )
        captured = capsys.readouterr()
        assert status == 0, captured.err
        job = captured.out.strip().rsplit("/", 1)[-1].removesuffix(".npz")
        (call,) = hook.wait_calls(1)
        assert json.loads(call.body)["id"] == job
        secret = requests.get(
            f"{server}/v2/webhook-secret", headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).json()["secret"]
        assert webhooks.verify(secret, call.body, call.headers[webhooks.SIGNATURE_HEADER])
    finally:
        hook.close()
    status = client.main([*args, "--callback", "http://10.0.0.1/", str(demo_files / "pics")])
    assert status == 1 and "internal address" in capsys.readouterr().err
