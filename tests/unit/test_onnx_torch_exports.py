"""What PyTorch's default (TorchScript) exporter writes for layers users meet, imported and run.

nn.LocalResponseNorm is exported as its decomposition (Mul, Reshape, Pad, AveragePool, If, Pow,
Div, ...), `x.view(x.size(0), -1)` with a dynamic batch as Shape -> Gather -> Unsqueeze ->
Concat -> Reshape, and torchvision's GoogLeNet transform_input as per-channel Gather, Unsqueeze,
Mul, Add and Concat on the image. Every layer is checked against ONNX Runtime (rtol 2e-4).
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest

from engine import Model, ModelError
from engine.onnx_import import convert_graph
from tests.onnx_check import assert_every_layer_matches

torch = pytest.importorskip("torch")
nn = torch.nn


def export(net, shape) -> bytes:
    """Export with dynamic batch by the TorchScript exporter (dynamo needs onnxscript)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.zeros(*shape),),
            buf,
            input_names=["image"],
            output_names=["out"],
            dynamic_axes={"image": {0: "N"}, "out": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
    return buf.getvalue()


def check_every_layer(data: bytes, shape, n=3) -> dict:
    """Import data, run every layer on n images and compare each with ONNX Runtime."""
    spec, arrays, tensors = convert_graph(data)
    x = np.random.default_rng(2).standard_normal((n, *shape[1:])).astype(np.float32)
    model = Model.from_arrays(spec, arrays)
    got = model.run(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), "all")
    assert_every_layer_matches(data, x, got, tensors)
    return spec


class LRNNet(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3)
        self.norm = nn.LocalResponseNorm(size, alpha=1e-2, beta=0.75, k=2.0)
        self.fc = nn.Linear(12 * 7 * 7, 10)

    def forward(self, x):
        x = self.norm(torch.relu(self.conv(x)))
        return self.fc(x.view(x.size(0), -1))  # the dynamic flatten


@pytest.mark.parametrize("size", [1, 3, 5])
def test_stock_local_response_norm_and_dynamic_flatten_import(size):
    torch.manual_seed(size)
    data = export(LRNNet(size), (1, 3, 9, 9))
    spec = check_every_layer(data, (1, 3, 9, 9))
    norm = next(layer for layer in spec["layers"] if layer["type"] == "lrn")
    assert norm["name"] == "norm" and norm["size"] == size
    assert norm["alpha"] == pytest.approx(1e-2) and norm["bias"] == pytest.approx(2.0)
    assert [layer["type"] for layer in spec["layers"]] == ["conv", "relu", "lrn", "conv"]


def test_even_size_local_response_norm_is_refused_by_name():
    # PyTorch pads an even window one channel more before, ONNX LRN after: not the same layer
    with pytest.raises(ModelError, match=r"'/norm/Div'.*even size \(4\)") as err:
        convert_graph(export(LRNNet(4), (1, 3, 9, 9)))
    assert err.value.field == "size"


class BatchArithmetic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y.reshape(y.size(0) * 4, -1)  # computes with the batch size


def test_arithmetic_on_the_batch_size_is_refused():
    with pytest.raises(ModelError, match="computes with the batch size"):
        convert_graph(export(BatchArithmetic(), (1, 3, 6, 6)))


class TransformInput(nn.Module):
    """torchvision GoogLeNet / Inception-v3 with transform_input=True (their pretrained case)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
        x1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
        x2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
        return torch.relu(self.conv(torch.cat((x0, x1, x2), 1)))


def test_torchvision_transform_input_imports_as_channel_picks():
    torch.manual_seed(0)
    spec = check_every_layer(export(TransformInput(), (1, 3, 8, 8)), (1, 3, 8, 8))
    kinds = [layer["type"] for layer in spec["layers"]]
    assert kinds == ["conv", "conv", "conv", "concat", "conv", "relu"]


class GatherTwo(nn.Module):
    def forward(self, x):
        return torch.relu(x[:, [2, 0]])


def test_gather_of_several_channels_and_its_errors():
    torch.manual_seed(0)
    spec = check_every_layer(export(GatherTwo(), (1, 3, 5, 5)), (1, 3, 5, 5))
    assert [layer["type"] for layer in spec["layers"]] == ["conv", "relu"]

    class Rows(nn.Module):
        def forward(self, x):
            return torch.relu(x[:, :, 1])

    with pytest.raises(ModelError, match="only picking channels"):
        convert_graph(export(Rows(), (1, 3, 5, 5)))

    class Lone(nn.Module):
        def forward(self, x):
            return torch.relu(x[:, 1])

    with pytest.raises(ModelError, match="reads a Gather of one channel"):
        convert_graph(export(Lone(), (1, 3, 5, 5)))


DYNAMO_LRN = os.path.join(os.path.dirname(__file__), "..", "data", "lrn_dynamo.onnx")


def regenerate_dynamo_lrn(path: str = DYNAMO_LRN) -> None:
    """Write tests/data/lrn_dynamo.onnx: LRNNet(5) by the dynamo exporter (needs onnxscript,
    which the test extra does not install; so the export is kept as a file)."""
    torch.manual_seed(5)
    program = torch.onnx.export(
        LRNNet(5).eval(),
        (torch.zeros(2, 3, 9, 9),),
        dynamo=True,
        opset_version=18,
        input_names=["image"],
        dynamic_shapes={"x": {0: torch.export.Dim("N")}},
    )
    program.save(path)


def test_the_dynamo_exporters_local_response_norm_imports():
    # dynamo=True writes a shorter decomposition: Mul, Reshape, Pad, AveragePool, Squeeze,
    # Mul, Add, Pow, Div, with constant shapes instead of Shape arithmetic
    with open(DYNAMO_LRN, "rb") as f:
        data = f.read()
    spec = check_every_layer(data, (1, 3, 9, 9))
    assert [layer["type"] for layer in spec["layers"]] == ["conv", "relu", "lrn", "conv"]
    assert spec["layers"][2]["size"] == 5


def test_alexnet_conv1_2_as_published_with_stock_lrn_every_layer_matches():
    # AlexNet conv1-2 (LRN after ReLU, conv2 in two groups, a lone BatchNorm) built with
    # nn.LocalResponseNorm, as a user writes it, and exported with a dynamic batch
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(3, 96, 11, 4),
        nn.ReLU(inplace=True),
        nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2),
        nn.ReLU(inplace=True),
        nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0),
        nn.MaxPool2d(3, 2),
        nn.BatchNorm2d(256),
    )
    bn = net[8]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    spec = check_every_layer(export(net, (1, 3, 67, 67)), (1, 3, 67, 67), n=2)
    kinds = [layer["type"] for layer in spec["layers"]]
    assert kinds == ["conv", "relu", "lrn", "maxpool"] * 2 + ["batchnorm"]
