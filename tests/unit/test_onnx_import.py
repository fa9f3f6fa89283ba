"""ONNX import: graphs built with onnx.helper run through onnxruntime and through Model.run."""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from engine import Model, ModelError
from engine.onnx_cli import main
from engine.onnx_import import convert

RNG = np.random.default_rng(3)


def tensor(name, shape, scale=0.5):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def graph_bytes(nodes, inits, in_shape=("N", 3, 10, 10), opset=17, out="y", name="g") -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, name, [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def onnxruntime_run(data: bytes, x_nchw: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x_nchw})[0]


def assert_same_as_onnxruntime(data: bytes, in_shape=(2, 3, 10, 10)):
    x = RNG.standard_normal(in_shape).astype(np.float32)
    want = onnxruntime_run(data, x)
    spec, arrays = convert(data)
    got = Model.from_arrays(spec, arrays).run(x.transpose(0, 2, 3, 1).copy())
    (out,) = got.values()
    if want.ndim == 2:  # (N, K) from a Gemm: ours is (N, 1, 1, K)
        want = want[:, None, None, :]
    else:
        want = want.transpose(0, 2, 3, 1)
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)
    return spec


def conv(inp, out, w, b=None, **attrs):
    return helper.make_node("Conv", [inp, w] + ([b] if b else []), [out], name=out, **attrs)


@pytest.mark.parametrize(
    "attrs",
    [
        {},
        {"pads": [1, 0, 2, 1], "strides": [2, 1]},
        {"dilations": [2, 2], "pads": [2, 2, 2, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER", "strides": [3, 2]},
        {"auto_pad": "VALID", "strides": [2, 2]},
    ],
)
def test_conv_attributes_match_onnxruntime(attrs):
    data = graph_bytes(
        [conv("x", "y", "w", "b", kernel_shape=[3, 2], **attrs)],
        [tensor("w", (4, 3, 3, 2)), tensor("b", (4,))],
    )
    spec = assert_same_as_onnxruntime(data)
    assert spec["fit"] == "floor" and spec["input"] == {"height": 10, "width": 10, "channels": 3}


@pytest.mark.parametrize(
    ("op", "attrs"),
    [
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
        (
            "MaxPool",
            {"kernel_shape": [2, 2], "pads": [1, 1, 1, 1], "strides": [3, 3], "ceil_mode": 1},
        ),
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
        # (onnxruntime ignores dilation when it sizes SAME pads for pools, against the ONNX
        # spec's ceil(in / stride); so dilation is checked with explicit pads)
        ("MaxPool", {"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 0, 1, 1]}),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        (
            "AveragePool",
            {
                "kernel_shape": [3, 3],
                "strides": [2, 2],
                "pads": [1, 1, 1, 1],
                "count_include_pad": 1,
            },
        ),
        ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ],
)
def test_pools_match_onnxruntime(op, attrs):
    data = graph_bytes(
        [
            conv("x", "c", "w", "b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node(op, ["r"], ["y"], **attrs),
        ],
        [tensor("w", (4, 3, 3, 3)), tensor("b", (4,))],
    )
    assert_same_as_onnxruntime(data)


def test_ceil_mode_with_counted_pads_is_refused_clearly():
    data = graph_bytes(
        [
            helper.make_node(
                "AveragePool",
                ["x"],
                ["y"],
                kernel_shape=[3, 3],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                count_include_pad=1,
                ceil_mode=1,
            )
        ],
        [],
        in_shape=("N", 3, 10, 10),
    )
    with pytest.raises(ModelError, match="ceil_mode with count_include_pad"):
        convert(data)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_flatten_gemm_becomes_a_conv_over_the_whole_extent(trans_b):
    k, features = 5, 4 * 4 * 4
    w = tensor("fc", (k, features) if trans_b else (features, k))
    data = graph_bytes(
        [
            conv("x", "c", "w", None, kernel_shape=[3, 3], strides=[2, 2]),
            helper.make_node("Flatten", ["c"], ["f"], axis=1),
            helper.make_node(
                "Gemm", ["f", "fc", "fcb"], ["y"], transB=trans_b, alpha=0.5, beta=2.0
            ),
        ],
        [tensor("w", (4, 3, 3, 3)), w, tensor("fcb", (k,))],
    )
    spec = assert_same_as_onnxruntime(data)
    fc = spec["layers"][-1]
    assert (fc["type"], fc["size"], fc["filters"]) == ("conv", [4, 4], 5)


def test_reshape_matmul_add_with_constants_and_identity():
    k = 3
    shape = numpy_helper.from_array(np.array([-1, 4 * 8 * 8], np.int64), "shape")
    nodes = [
        helper.make_node("Constant", [], ["wc"], value=tensor("wv", (4, 3, 3, 3))),
        helper.make_node("Identity", ["wc"], ["w"]),
        conv("x", "c", "w", None, kernel_shape=[3, 3]),
        helper.make_node("Add", ["cb", "c"], ["cplus"]),
        helper.make_node("Relu", ["cplus"], ["r"]),
        helper.make_node("Reshape", ["r", "shape"], ["f"]),
        helper.make_node("MatMul", ["f", "m"], ["mm"]),
        helper.make_node("Add", ["mm", "mb"], ["y"]),
    ]
    inits = [tensor("cb", (1, 4, 1, 1)), shape, tensor("m", (4 * 8 * 8, k)), tensor("mb", (k,))]
    spec = assert_same_as_onnxruntime(graph_bytes(nodes, inits))
    assert [layer["type"] for layer in spec["layers"]] == ["conv", "relu", "conv"]
    assert all(layer["bias"] for layer in spec["layers"] if layer["type"] == "conv")


def test_symbolic_spatial_size_leaves_input_open():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(
        [conv("x", "y", "w", None, kernel_shape=[3, 3])],
        "g",
        [x],
        [y],
        initializer=[tensor("w", (2, 3, 3, 3))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    spec, arrays = convert(model.SerializeToString())
    assert spec["input"] == {"channels": 3}
    out = Model.from_arrays(spec, arrays).run(np.zeros((1, 7, 9, 3), np.float32))
    assert out["y"].shape == (1, 5, 7, 2)


def _refused(nodes, inits, fragment, **kw):
    with pytest.raises(ModelError) as err:
        convert(graph_bytes(nodes, inits, **kw))
    assert fragment in err.value.message
    return err.value


def test_unsupported_ops_are_named():
    err = _refused([helper.make_node("Exp", ["x"], ["y"], name="sq")], [], "unsupported op Exp")
    assert "'sq'" in err.message and "Conv" in err.message and "LRN" in err.message


def test_grouped_conv_branches_and_bad_uploads_are_refused():
    _refused(
        [conv("x", "y", "w", None, kernel_shape=[3, 3], group=2)],
        [tensor("w", (4, 1, 3, 3))],
        "group=2 must divide the 3 input channels",
    )
    _refused(
        [
            conv("x", "a", "w", None, kernel_shape=[1, 1]),
            helper.make_node("Add", ["a", "x"], ["y"], name="res"),
        ],
        [tensor("w", (4, 3, 1, 1))],
        "'res': inputs differ in shape [(4, 10, 10), (3, 10, 10)]",
    )
    dead = [conv("x", "y", "w", None, kernel_shape=[1, 1]), helper.make_node("Relu", ["x"], ["r"])]
    spec, _ = convert(graph_bytes(dead, [tensor("w", (4, 3, 1, 1))]))
    assert [layer["name"] for layer in spec["layers"]] == ["y"]  # the dead branch is dropped
    _refused(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Flatten", ["r"], ["y"])],
        [],
        "ends in Flatten",
    )
    _refused(
        [helper.make_node("Relu", ["x"], ["y"])], [], "float32 (N, C, H, W)", in_shape=(1, 3, 4)
    )
    _refused([helper.make_node("MaxPool", ["x"], ["y"], name="mp")], [], "'mp' has no kernel_shape")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        convert(b"\x08\x07garbage that is not protobuf \xff\xff")


def test_external_data_is_never_followed(tmp_path):
    w = tensor("w", (2, 3, 1, 1))
    w.ClearField("raw_data")
    w.ClearField("float_data")
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="/etc/passwd")
    _refused([conv("x", "y", "w", None, kernel_shape=[1, 1])], [w], "external data")


def test_cli_writes_spec_and_safetensors(tmp_path, capsys):
    data = graph_bytes(
        [conv("x", "c", "w", "b", kernel_shape=[3, 3]), helper.make_node("Relu", ["c"], ["y"])],
        [tensor("w", (4, 3, 3, 3)), tensor("b", (4,))],
        name="tiny net",
    )
    (tmp_path / "m.onnx").write_bytes(data)
    assert main([str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out")]) == 0
    assert "\nc " in capsys.readouterr().out
    spec = json.loads((tmp_path / "out" / "spec.json").read_text())
    assert spec["name"] == "tiny-net"
    model = Model.load(tmp_path / "out" / "spec.json", tmp_path / "out" / "weights.safetensors")
    x = RNG.standard_normal((1, 3, 10, 10)).astype(np.float32)
    np.testing.assert_allclose(
        model.run(x.transpose(0, 2, 3, 1).copy())["relu1"],
        onnxruntime_run(data, x).transpose(0, 2, 3, 1),
        rtol=1e-4,
        atol=1e-4,
    )
    (tmp_path / "labels.txt").write_text("cat\ndog\n\neel\nfox\n")
    out = str(tmp_path / "labeled")
    assert (
        main([str(tmp_path / "m.onnx"), "-o", out, "--labels", str(tmp_path / "labels.txt")]) == 0
    )
    assert json.loads((tmp_path / "labeled" / "spec.json").read_text())["labels"] == [
        "cat",
        "dog",
        "eel",
        "fox",
    ]
    (tmp_path / "bad.onnx").write_bytes(b"nope")
    assert main([str(tmp_path / "bad.onnx"), "-o", str(tmp_path / "out2")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.reference
def test_torch_export_of_a_small_cnn_matches_torch():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, stride=2),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    ).eval()
    x = torch.randn(2, 3, 20, 20)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in torch 2.9+; the dynamo one needs onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x[:1],), buf, dynamo=False, input_names=["x"], output_names=["y"])
    spec, arrays = convert(buf.getvalue())
    assert [layer["type"] for layer in spec["layers"]] == [
        "conv",
        "relu",
        "maxpool",
        "conv",
        "relu",
        "avgpool",
        "conv",
    ]
    model = Model.from_arrays(spec, arrays)
    with torch.no_grad():
        want = net(x).numpy()
    got = model.run(x.numpy().transpose(0, 2, 3, 1).copy())
    np.testing.assert_allclose(got[model.layer_names[-1]][:, 0, 0, :], want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        features = net[:3](x).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(
        model.run(x.numpy().transpose(0, 2, 3, 1).copy(), "2")["2"],
        features,
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_global_pools_then_gemm(op):
    data = graph_bytes(
        [
            conv("x", "c", "w", "b", kernel_shape=[3, 3], strides=[2, 2]),
            helper.make_node(op, ["c"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1),
        ],
        [tensor("w", (4, 3, 3, 3)), tensor("b", (4,)), tensor("fc", (2, 4)), tensor("fcb", (2,))],
    )
    spec = assert_same_as_onnxruntime(data)
    assert spec["layers"][1]["size"] == [4, 4] and spec["layers"][2]["size"] == [1, 1]
