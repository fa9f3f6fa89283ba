"""A small residual net and an inception block, uploaded over HTTP as .onnx, run with
outputs=all: every layer the job returns equals ONNX Runtime's tensor for it."""

from __future__ import annotations

import io
import os
import sys
import warnings

import numpy as np
import pytest

from engine.onnx_import import convert_graph
from tests.integration.apikit import Api, parse_v2
from tests.onnx_check import assert_every_layer_matches

torch = pytest.importorskip("torch")
sys.path.append(os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
torch_nets = pytest.importorskip("torch_nets")
nn = torch.nn


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.block = torch_nets.BasicBlock(8, 8, 1)
        self.down = torch_nets.BasicBlock(8, 12, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.down(self.block(self.stem(x)))
        return torch.softmax(self.fc(torch.flatten(self.pool(x), 1)), dim=1)


class InceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6())
        self.inception = torch_nets.Inception(8, 4, 4, 6, 2, 3, 3)
        self.norm = torch_nets.LRN(3, 1e-3, 0.75, 1.0)

    def forward(self, x):
        return torch.sigmoid(self.norm(self.inception(self.stem(x))))


class InceptionStockLRN(InceptionNet):
    """The same with nn.LocalResponseNorm, which PyTorch exports as its decomposition."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LocalResponseNorm(3, 1e-3, 0.75, 1.0)


def exported(net: nn.Module, side: int) -> bytes:
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch_nets.to_onnx(net.eval(), side)


@pytest.fixture(scope="module")
def api():
    return Api()


@pytest.mark.parametrize(
    ("net", "side", "types"),
    [
        (Residual, 16, {"conv", "relu", "add", "avgpool", "softmax"}),
        (InceptionNet, 11, {"conv", "clip", "relu", "maxpool", "concat", "lrn", "sigmoid"}),
        (InceptionStockLRN, 11, {"conv", "clip", "relu", "maxpool", "concat", "lrn", "sigmoid"}),
    ],
)
def test_uploaded_graph_runs_with_every_layer_equal_to_onnxruntime(api, net, side, types):
    torch.manual_seed(1)
    data = exported(net(), side)
    name = net.__name__.lower()
    rv = api.client.post(
        f"/v2/repository/models/{name}/load",
        content_type="multipart/form-data",
        data={"weights": (io.BytesIO(data), f"{name}.onnx")},
    )
    assert rv.status_code == 200, rv.json
    x = np.random.default_rng(2).standard_normal((2, side, side, 3)).astype(np.float32)
    files = []
    for i in range(2):
        buf = io.BytesIO()
        np.save(buf, x[i])
        files.append((io.BytesIO(buf.getvalue()), f"{i}.npy"))
    rv = api.client.post(
        f"/v2/models/{name}/jobs",
        content_type="multipart/form-data",
        data={"images": files, "outputs": "all"},
    )
    assert rv.status_code in (200, 202), rv.json
    job = rv.json["id"]
    api.burst()
    status = api.client.get(f"/v2/jobs/{job}").json
    assert status["status"] == "finished", status
    rv = api.client.get(f"/v2/jobs/{job}/result")
    got = parse_v2(rv.data, rv.headers["Inference-Header-Content-Length"])
    spec, _, tensors = convert_graph(data)
    assert list(got) == [layer["name"] for layer in spec["layers"]]
    assert {layer["type"] for layer in spec["layers"]} == types
    assert_every_layer_matches(data, x.transpose(0, 3, 1, 2).copy(), got, tensors)
    last = spec["layers"][-1]["name"]
    rv = api.client.get(f"/v2/jobs/{job}/result?output={last}&format=json&top=3")
    assert rv.status_code == 200, rv.json
    (out,) = rv.json["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 3]
    scores = got[last].reshape(2, -1)
    for i, row in enumerate(np.reshape(out["data"], (2, 3))):
        assert [int(s.split(":")[1]) for s in row] == list(np.argsort(-scores[i])[:3])
    rv = api.client.get(f"/v2/jobs/{job}/result?output={last}&format=npy&top=3")
    assert rv.status_code == 400 and rv.json["field"] == "top"


def test_onnx_upload_with_a_spec_part_adds_labels_for_classification(api):
    import json

    data = exported(Residual(), 16)
    labels = ["ant", "bee", "cat", "dog", "eel"]
    rv = api.client.post(
        "/v2/repository/models/labeled/load",
        content_type="multipart/form-data",
        data={
            "spec": (io.BytesIO(json.dumps({"labels": labels}).encode()), "spec.json"),
            "weights": (io.BytesIO(data), "residual.onnx"),
        },
    )
    assert rv.status_code == 200, rv.json
    assert api.client.get("/v2/models/labeled").json["labels"] == labels
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(3).standard_normal((16, 16, 3)).astype(np.float32))
    rv = api.client.post(
        "/v2/models/labeled/jobs",
        content_type="multipart/form-data",
        data={"images": [(io.BytesIO(buf.getvalue()), "a.npy")], "outputs": "all"},
    )
    job = rv.json["id"]
    api.burst()
    rv = api.client.get(f"/v2/jobs/{job}/result?format=json&top=5&output=softmax")
    assert rv.status_code == 200, rv.json
    (row,) = np.reshape(rv.json["outputs"][0]["data"], (1, 5))
    assert sorted(s.split(":")[2] for s in row) == sorted(labels)
    assert all(labels[int(s.split(":")[1])] == s.split(":")[2] for s in row)
    scores = [float(s.split(":")[0]) for s in row]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-5)
