"""ONNX import of graph networks: each op built with onnx.helper, every layer vs ONNX Runtime."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from engine import Model, ModelError
from engine.onnx_import import SUPPORTED, convert, convert_graph
from tests.onnx_check import assert_every_layer_matches, run_spec_torch

torch = pytest.importorskip("torch")
RNG = np.random.default_rng(13)


def tensor(name, shape, scale=0.5, low=None):
    a = RNG.standard_normal(shape) * scale if low is None else RNG.uniform(low, 2.0, shape)
    return numpy_helper.from_array(a.astype(np.float32), name)


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype), name)


def model_bytes(nodes, inits, in_shape=("N", 4, 9, 9), opset=17, out="y") -> bytes:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))
    y = helper.make_tensor_value_info(out, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model.SerializeToString()


def node(op, ins, out, name=None, **attrs):
    return helper.make_node(op, ins, [out], name=name or out, **attrs)


def conv(inp, out, w, b=None, **attrs):
    return node("Conv", [inp, w] + ([b] if b else []), out, **attrs)


def check(data, n=2, hw=(9, 9), c=4) -> dict:
    """Import data; assert every layer, by the engine and by torch, equals ONNX Runtime's."""
    x = RNG.standard_normal((n, c, *hw)).astype(np.float32)
    spec, arrays, tensors = convert_graph(data)
    x_nhwc = x.transpose(0, 2, 3, 1).copy()
    assert_every_layer_matches(data, x, run_spec_torch(spec, arrays, x_nhwc), tensors)
    model = Model.from_arrays(spec, arrays)
    assert_every_layer_matches(data, x, model.run(x_nhwc, model.layer_names), tensors)
    return spec


def test_residual_add_reads_two_layers():
    data = model_bytes(
        [
            conv("x", "a", "w1", "b1", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            node("Relu", ["a"], "r"),
            conv("r", "c", "w2", None, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            node("Add", ["c", "x"], "s", name="/layer1/layer1.0/Add"),
            node("Relu", ["s"], "y"),
        ],
        [tensor("w1", (4, 4, 3, 3)), tensor("b1", (4,)), tensor("w2", (4, 4, 3, 3))],
    )
    spec = check(data)
    add = spec["layers"][3]
    assert add == {"name": "layer1.0", "type": "add", "inputs": ["c", "image"]}
    assert "input" not in spec["layers"][4]


def test_sum_of_three_and_concat_of_branches():
    data = model_bytes(
        [
            conv("x", "a", "wa", None, kernel_shape=[1, 1]),
            conv("x", "b", "wb", None, kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            node("MaxPool", ["x"], "p", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1]),
            node("Concat", ["a", "b", "p"], "cat", axis=1),
            conv("cat", "d", "wd", None, kernel_shape=[1, 1]),
            conv("cat", "e", "we", None, kernel_shape=[1, 1]),
            node("Sum", ["d", "e", "d"], "y"),
        ],
        [
            tensor("wa", (2, 4, 1, 1)),
            tensor("wb", (3, 4, 3, 3)),
            tensor("wd", (5, 9, 1, 1)),
            tensor("we", (5, 9, 1, 1)),
        ],
    )
    spec = check(data)
    by = {layer["name"]: layer for layer in spec["layers"]}
    assert by["cat"]["inputs"] == ["a", "b", "p"] and by["y"]["inputs"] == ["d", "e", "d"]
    assert by["b"]["input"] == "image" and by["e"]["input"] == "cat"


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_and_depthwise_conv(group):
    data = model_bytes(
        [conv("x", "y", "w", "b", kernel_shape=[3, 3], group=group, strides=[2, 1])],
        [tensor("w", (8, 4 // group, 3, 3)), tensor("b", (8,))],
    )
    assert check(data)["layers"][0]["groups"] == group


def test_batchnorm_lrn_and_elementwise_ops():
    data = model_bytes(
        [
            node("BatchNormalization", ["x", "s", "t", "m", "v"], "bn", epsilon=1e-3),
            node("LRN", ["bn"], "n", size=3, alpha=0.01, beta=0.6, bias=1.5),
            node("Sigmoid", ["n"], "sg"),
            node("Tanh", ["sg"], "th"),
            node("Clip", ["th", "lo", ""], "c1"),
            node("Clip", ["c1", "", "hi"], "y"),
        ],
        [
            tensor("s", (4,)),
            tensor("t", (4,)),
            tensor("m", (4,)),
            tensor("v", (4,), low=0.5),
            numpy_helper.from_array(np.float32(0.1), "lo"),
            numpy_helper.from_array(np.float32(0.5), "hi"),
        ],
    )
    spec = check(data)
    assert spec["layers"][0]["eps"] == pytest.approx(1e-3)
    assert spec["layers"][4] == {"name": "c1", "type": "clip", "min": pytest.approx(0.1)}
    assert spec["layers"][5] == {"name": "y", "type": "clip", "max": 0.5}


def test_clip_attributes_before_opset_11_and_relu6():
    data = model_bytes([node("Clip", ["x"], "y", min=0.0, max=6.0)], [], opset=10)
    assert check(data)["layers"][0] == {"name": "y", "type": "clip", "min": 0.0, "max": 6.0}


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_softmax_head_over_classes(opset):
    data = model_bytes(
        [
            node("GlobalAveragePool", ["x"], "g"),
            node("Flatten", ["g"], "f"),
            node("Gemm", ["f", "w", "b"], "logits", transB=1),
            node("Softmax", ["logits"], "y", axis=1),
        ],
        [tensor("w", (6, 4)), tensor("b", (6,))],
        opset=opset,
    )
    assert [layer["type"] for layer in check(data)["layers"]] == ["avgpool", "conv", "softmax"]


def test_softmax_over_channels_of_a_map_and_global_max_pool():
    data = model_bytes(
        [node("Softmax", ["x"], "s", axis=1), node("GlobalMaxPool", ["s"], "y")], [], opset=13
    )
    check(data)


@pytest.mark.parametrize("op", ["GlobalAveragePool", "GlobalMaxPool"])
def test_symbolic_size_global_pools_become_global_layers(op):
    data = model_bytes([node(op, ["x"], "y")], [], in_shape=(1, 4, "H", "W"))
    spec = check(data, n=1, hw=(5, 7))
    assert spec["layers"][0]["type"] == op.lower().replace("average", "avg")
    assert spec["input"] == {"channels": 4}


@pytest.mark.parametrize(
    ("consumer", "fill"),
    [("Conv", 0.0), ("AveragePool", 0.0), ("MaxPool", -np.inf), ("MaxPoolAfterRelu", 0.0)],
)
def test_constant_pad_folds_into_the_next_window(consumer, fill):
    nodes = [node("Pad", ["x", "pads", "fill"], "p", mode="constant")]
    inits = [
        const("pads", [0, 0, 1, 2, 0, 0, 2, 0]),
        numpy_helper.from_array(np.float32(fill), "fill"),
    ]
    if consumer == "Conv":
        nodes.append(conv("p", "y", "w", None, kernel_shape=[3, 3], pads=[1, 0, 0, 1]))
        inits.append(tensor("w", (3, 4, 3, 3)))
    elif consumer == "AveragePool":
        nodes.append(node("AveragePool", ["p"], "y", kernel_shape=[3, 3], strides=[2, 2]))
    else:
        if consumer == "MaxPoolAfterRelu":
            nodes.insert(0, node("Relu", ["x"], "r"))
            nodes[1] = node("Pad", ["r", "pads", "fill"], "p", mode="constant")
        nodes.append(node("MaxPool", ["p"], "y", kernel_shape=[3, 3], strides=[2, 2]))
    spec = check(model_bytes(nodes, inits))
    assert spec["layers"][-1]["pad"][:3] == [1 + (consumer == "Conv"), 2, 2]
    assert "Pad" not in {layer["type"] for layer in spec["layers"]}


def test_torch_padding_modules_export_as_pad_arithmetic_that_folds():
    import io
    import warnings

    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.ZeroPad2d((1, 2, 0, 1)),
        nn.Conv2d(4, 5, 3),
        nn.ReLU(),
        nn.ConstantPad2d(1, 0.0),
        nn.MaxPool2d(2),
    ).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(1, 4, 9, 9),),
            buf,
            input_names=["x"],
            dynamic_axes={"x": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
    spec = check(buf.getvalue())
    assert [(layer["type"], layer.get("pad")) for layer in spec["layers"]] == [
        ("conv", [0, 1, 1, 2]),
        ("relu", None),
        ("maxpool", [1, 1, 1, 1]),
    ]


def test_batch_dimension_fixed_or_symbolic():
    for in_shape in [(3, 4, 9, 9), ("batch", 4, 9, 9)]:
        data = model_bytes([node("Relu", ["x"], "y")], [], in_shape=in_shape)
        assert convert(data)[0]["input"] == {"height": 9, "width": 9, "channels": 4}
        check(data, n=3)


def test_node_names_are_made_valid_and_unique():
    data = model_bytes(
        [
            node("Relu", ["x"], "a", name="/features/features.0/Relu"),
            node("Relu", ["a"], "b", name="/features/features.0/Relu_1"),
            node("Sigmoid", ["b"], "c", name="/block/Sigmoid"),
            node("Tanh", ["c"], "d", name="/block/Tanh"),
            node("Relu", ["d"], "e", name="image"),
            node("Relu", ["e"], "f", name=" odd name!*"),
            node("Relu", ["f"], "g", name="relu"),
            node("Relu", ["g"], "y", name="/relu/Relu"),
        ],
        [],
    )
    names = [layer["name"] for layer in check(data)["layers"]]
    assert names == [
        "features.0.relu",
        "features.0.relu_1",
        "block.sigmoid",
        "block.tanh",
        "image_2",
        "odd_name_",
        "relu",
        "relu_2",
    ]


def test_labels_travel_with_the_spec():
    data = model_bytes([node("GlobalAveragePool", ["x"], "y")], [])
    spec, _ = convert(data, labels=["a", "b", "c", "d"])
    assert spec["labels"] == ["a", "b", "c", "d"]
    with pytest.raises(ModelError, match="3 labels for a last layer of 4 channels"):
        convert(data, labels=["a", "b", "c"])


@pytest.mark.parametrize(
    ("nodes", "inits", "fragment"),
    [
        ([node("Exp", ["x"], "y", name="sq")], [], "unsupported op Exp (node 'sq')"),
        ([node("Mul", ["x", "x"], "y", name="sq")], [], "Mul node 'sq': input 'x' must be a const"),
        ([node("Softmax", ["x"], "y", axis=-1)], [], "only a softmax over channels"),
        ([node("Concat", ["x", "x"], "y", axis=2)], [], "only a concat along channels"),
        ([node("LRN", ["x"], "y")], [], "LRN node 'y' has no size"),
        (
            [node("Pad", ["x", "pads"], "p", mode="reflect"), node("Relu", ["p"], "y")],
            [const("pads", [0, 0, 1, 1, 0, 0, 1, 1])],
            "only a constant pad",
        ),
        (
            [node("Pad", ["x", "pads"], "p"), node("Relu", ["p"], "y")],
            [const("pads", [0, 0, 1, 1, 0, 0, 1, 1])],
            "reads a Pad",
        ),
        (
            [node("Pad", ["x", "pads"], "p"), node("MaxPool", ["p"], "y", kernel_shape=[2, 2])],
            [const("pads", [0, 0, 1, 1, 0, 0, 1, 1])],
            "cannot be folded",
        ),
        (
            [node("BatchNormalization", ["x", "s", "s", "s", "s"], "y", training_mode=1)],
            [tensor("s", (4,))],
            "only inference mode",
        ),
        (
            [node("BatchNormalization", ["x", "s", "s", "s", "s"], "y")],
            [tensor("s", (3,))],
            "scale has shape (3,), expected (4,)",
        ),
        (
            [conv("x", "a", "w", None, kernel_shape=[2, 2]), node("Concat", ["a", "x"], "y")],
            [tensor("w", (4, 4, 2, 2))],
            "inputs differ in height x width",
        ),
    ],
)
def test_refused_graphs_name_node_and_reason(nodes, inits, fragment):
    with pytest.raises(ModelError) as err:
        convert(model_bytes(nodes, inits))
    assert fragment in err.value.message
    if "unsupported" in fragment:
        assert SUPPORTED in err.value.message


@settings(max_examples=int(os.environ.get("CONVQ_ONNX_EXAMPLES", "25")), deadline=None)
@given(
    k=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    pads=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    extra=st.lists(st.integers(0, 2), min_size=4, max_size=4),
    group=st.sampled_from([1, 2, 4]),
    pool=st.sampled_from(["MaxPool", "AveragePool", None]),
    ceil=st.booleans(),
    residual=st.booleans(),
)
def test_random_pad_conv_pool_graphs_match_onnxruntime(
    k, stride, dilation, pads, extra, group, pool, ceil, residual
):
    t, left, b, r = extra
    hout = (8 + t + b + pads[0] + pads[2] - dilation * (k - 1) - 1) // stride + 1
    wout = (7 + left + r + pads[1] + pads[3] - dilation * (k - 1) - 1) // stride + 1
    assume(pool is None or min(hout, wout) >= 2)  # a 2x2 pool needs a 2x2 map
    nodes = [
        node("Pad", ["x", "pads"], "p", mode="constant"),
        conv("p", "c", "w", "b", kernel_shape=[k, k], strides=[stride, stride],
             dilations=[dilation, dilation], pads=pads, group=group),
        node("Relu", ["c"], "r"),
    ]  # fmt: skip
    inits = [
        const("pads", [0, 0, t, left, 0, 0, b, r]),
        tensor("w", (4, 4 // group, k, k)),
        tensor("b", (4,)),
    ]
    last = "r"
    if pool:
        nodes.append(
            node(pool, ["r"], "q", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=int(ceil))
        )
        last = "q"
    if residual:
        nodes.append(conv(last, "d", "w2", None, kernel_shape=[1, 1]))
        nodes.append(node("Add", [last, "d"], "s"))
        last = "s"
    nodes.append(node("Sigmoid", [last], "y"))
    if residual:
        inits.append(tensor("w2", (4, 4, 1, 1)))
    check(model_bytes(nodes, inits, in_shape=("N", 4, 8, 7)), hw=(8, 7))


def test_reduce_over_height_and_width_is_a_global_pool():
    # the dynamo exporter writes AdaptiveAvgPool2d(1) as ReduceMean(axes=[-1, -2], keepdims=1)
    mean = model_bytes(
        [node("ReduceMean", ["x", "axes"], "y", keepdims=1)], [const("axes", [-1, -2])], opset=18
    )
    assert [lay["type"] for lay in check(mean)["layers"]] == ["avgpool"]
    most = model_bytes([node("ReduceMax", ["x"], "y", axes=[2, 3])], [], opset=13)
    assert [lay["type"] for lay in check(most)["layers"]] == ["maxpool"]
    # without keepdims the (N, C) result feeds a Gemm directly
    flat = model_bytes(
        [
            node("ReduceMean", ["x", "axes"], "m", keepdims=0),
            node("Gemm", ["m", "w", "b"], "y", transB=1),
        ],
        [const("axes", [2, 3]), tensor("w", (5, 4)), tensor("b", (5,))],
        opset=18,
    )
    assert [lay["type"] for lay in check(flat)["layers"]] == ["avgpool", "conv"]
    channels = model_bytes(
        [node("ReduceMean", ["x", "axes"], "y", name="rm")], [const("axes", [1])], opset=18
    )
    with pytest.raises(ModelError, match=r"'rm': only a reduction over height and width") as err:
        convert(channels)
    assert err.value.field == "axes"
