"""The four published network families, built in torch and exported: every layer vs ONNX Runtime."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np
import pytest

from engine import Model
from engine.onnx_import import convert_graph
from tests.onnx_check import as_nhwc, assert_every_layer_matches, run_spec_torch

torch = pytest.importorskip("torch")
sys.path.append(os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
torch_nets = pytest.importorskip("torch_nets")


@pytest.mark.parametrize(
    ("name", "side", "sizes", "types"),
    [
        ("resnet18", 64, {}, {"conv", "relu", "maxpool", "add", "avgpool"}),
        ("googlenet-3b", 64, {}, {"conv", "relu", "maxpool", "concat", "avgpool", "softmax"}),
        # Its fully connected layers 256 wide instead of 4096: the same layers, 1/60 the weights.
        ("vgg11-bn", 64, {"hidden": 256}, {"conv", "relu", "maxpool"}),
        ("alexnet-conv12", 67, {}, {"conv", "relu", "lrn", "maxpool", "batchnorm"}),
    ],
)
def test_exported_network_imports_and_every_layer_matches(name, side, sizes, types):
    net = torch_nets.build(name, **sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        data = torch_nets.to_onnx(net, side)
    spec, arrays, tensors = convert_graph(data)
    assert {layer["type"] for layer in spec["layers"]} == types
    x = np.random.default_rng(1).standard_normal((2, 3, side, side)).astype(np.float32)
    x_nhwc = x.transpose(0, 2, 3, 1).copy()
    assert_every_layer_matches(data, x, run_spec_torch(spec, arrays, x_nhwc), tensors)
    model = Model.from_arrays(spec, arrays)
    got = model.run(x_nhwc, model.layer_names)
    assert_every_layer_matches(data, x, got, tensors)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    last = got[spec["layers"][-1]["name"]]
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(last, as_nhwc(want), rtol=1e-3, atol=1e-4 * scale)
