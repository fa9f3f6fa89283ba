"""Graph models: wiring checks, residual and inception blocks against hand-written reference runs,
fusion, freeing, memory, labels and the 2,000-layer load."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest

from engine import Model, ModelError, ShapeError, WeightsError, kernels
from engine import layers_reference as lref
from engine.plan import plan
from engine.reference import conv2d_reference, max_pool2d_reference, relu_reference
from engine.spec import MAX_LAYERS, parse_spec

RTOL, ATOL = 2e-4, 2e-5


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def bn(rng, name, c):
    return {
        f"{name}.scale": rand(rng, c),
        f"{name}.shift": rand(rng, c),
        f"{name}.mean": rand(rng, c),
        f"{name}.var": rng.uniform(0.2, 2.0, c).astype(np.float32),
    }


def bn_ref(x, a, name, eps=1e-5):
    return lref.batchnorm_reference(
        x, *(a[f"{name}.{k}"] for k in ("scale", "shift", "mean", "var")), eps
    )


def grouped_ref(x, w, b, groups, **kw):
    """Grouped convolution from its definition: group g convolves its own channel slice."""
    cg, kg = x.shape[3] // groups, w.shape[0] // groups
    parts = [
        conv2d_reference(
            x[..., g * cg : (g + 1) * cg], w[g * kg : (g + 1) * kg], b[g * kg : (g + 1) * kg], **kw
        )
        for g in range(groups)
    ]
    return np.concatenate(parts, axis=3)


RESIDUAL = {
    "name": "resblock",
    "input": {"height": 6, "width": 7, "channels": 4},
    "labels": ["a", "b", "c", "d"],
    "layers": [
        {"name": "c1", "type": "conv", "filters": 4, "size": 3, "pad": 1, "bias": None},
        {"name": "bn1", "type": "batchnorm"},
        {"name": "r1", "type": "relu"},
        {"name": "c2", "type": "conv", "filters": 4, "size": 3, "pad": 1, "groups": 2},
        {"name": "bn2", "type": "batchnorm", "eps": 1e-3},
        {"name": "sum", "type": "add", "inputs": ["bn2", "image"], "relu": True},
        {"name": "gap", "type": "globalavgpool"},
        {"name": "prob", "type": "softmax"},
    ],
}


def residual_arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "c1.w": rand(rng, 4, 3, 3, 4),
        "c2.w": rand(rng, 4, 3, 3, 2),
        "c2.b": rand(rng, 4),
        **bn(rng, "bn1", 4),
        **bn(rng, "bn2", 4),
    }


def residual_reference(x, a):
    out = {"c1": conv2d_reference(x, a["c1.w"], None, pad=1)}
    out["bn1"] = bn_ref(out["c1"], a, "bn1")
    out["r1"] = relu_reference(out["bn1"])
    out["c2"] = grouped_ref(out["r1"], a["c2.w"], a["c2.b"], 2, pad=1)
    out["bn2"] = bn_ref(out["c2"], a, "bn2", 1e-3)
    out["sum"] = lref.add_reference([out["bn2"], x], relu=True)
    out["gap"] = lref.global_avg_pool_reference(out["sum"])
    out["prob"] = lref.softmax_reference(out["gap"])
    return out


INCEPTION = {
    "name": "inception",
    "input": {"height": 8, "width": 8, "channels": 3},
    "fit": "floor",
    "layers": [
        {"name": "stem", "type": "conv", "filters": 6, "size": 3, "pad": 1},
        {"name": "stem_relu", "type": "relu"},
        {"name": "norm", "type": "lrn", "size": 5, "alpha": 1e-2},
        {"name": "b1", "type": "conv", "filters": 4, "size": 1, "input": "norm"},
        {"name": "b2_reduce", "type": "conv", "filters": 3, "size": 1, "input": "norm"},
        {"name": "b2", "type": "conv", "filters": 5, "size": 3, "pad": 1},
        {"name": "b3", "type": "conv", "filters": 2, "size": 5, "pad": 2, "input": "norm"},
        {"name": "b4_pool", "type": "maxpool", "size": 3, "stride": 1, "pad": 1, "input": "norm"},
        {"name": "b4", "type": "conv", "filters": 3, "size": 1},
        {"name": "b4_relu6", "type": "clip", "min": 0, "max": 6},
        {"name": "mixed", "type": "concat", "inputs": ["b1", "b2", "b3", "b4_relu6"]},
        {"name": "gmp", "type": "globalmaxpool"},
        {"name": "gate", "type": "sigmoid"},
        {"name": "squash", "type": "tanh", "input": "gmp"},
    ],
}


def inception_arrays(seed=1):
    rng = np.random.default_rng(seed)
    shapes = {"stem": (6, 3, 3, 3), "b1": (4, 1, 1, 6), "b2_reduce": (3, 1, 1, 6)}
    shapes |= {"b2": (5, 3, 3, 3), "b3": (2, 5, 5, 6), "b4": (3, 1, 1, 6)}
    out = {}
    for name, shape in shapes.items():
        out[f"{name}.w"], out[f"{name}.b"] = rand(rng, *shape), rand(rng, shape[0])
    return out


def inception_reference(x, a):
    def conv(name, src, **kw):
        return conv2d_reference(src, a[f"{name}.w"], a[f"{name}.b"], **kw)

    o = {"stem": conv("stem", x, pad=1)}
    o["stem_relu"] = relu_reference(o["stem"])
    o["norm"] = lref.lrn_reference(o["stem_relu"], 5, 1e-2)
    o["b1"] = conv("b1", o["norm"])
    o["b2_reduce"] = conv("b2_reduce", o["norm"])
    o["b2"] = conv("b2", o["b2_reduce"], pad=1)
    o["b3"] = conv("b3", o["norm"], pad=2)
    o["b4_pool"] = max_pool2d_reference(o["norm"], 3, 1, 1)
    o["b4"] = conv("b4", o["b4_pool"])
    o["b4_relu6"] = lref.clip_reference(o["b4"], 0.0, 6.0)
    o["mixed"] = lref.concat_reference([o["b1"], o["b2"], o["b3"], o["b4_relu6"]])
    o["gmp"] = lref.global_max_pool_reference(o["mixed"])
    o["gate"] = lref.sigmoid_reference(o["gmp"])
    o["squash"] = lref.tanh_reference(o["gmp"])
    return o


NETS = {
    "residual": (RESIDUAL, residual_arrays, residual_reference, (2, 6, 7, 4)),
    "inception": (INCEPTION, inception_arrays, inception_reference, (3, 8, 8, 3)),
}


@pytest.mark.parametrize("net", NETS.values(), ids=NETS.keys())
def test_outputs_all_match_the_reference_graph_run(net):
    spec, make, reference, shape = net
    arrays = make()
    model = Model.from_arrays(spec, arrays)
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    got, want = model.run(x, outputs="all"), reference(x, arrays)
    assert list(got) == model.layer_names and set(got) == set(want)
    for name, value in want.items():
        assert got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("net", NETS.values(), ids=NETS.keys())
def test_each_layer_asked_alone_returns_its_own_values(net):
    spec, make, reference, shape = net
    arrays = make()
    model = Model.from_arrays(spec, arrays)
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    want = reference(x, arrays)
    for name in model.layer_names:
        got = model.run(x, outputs=name)[name]
        np.testing.assert_allclose(got, want[name], rtol=RTOL, atol=ATOL, err_msg=name)


def test_fused_and_unfused_runs_agree():
    model = Model.from_arrays(RESIDUAL, residual_arrays())
    steps = plan(parse_spec(RESIDUAL).layers, ["prob"])
    fused = [[lay.name for lay in step.layers] for step in steps]
    # the residual add (and its relu) goes into c2's store: nothing else reads bn2
    assert ["c1", "bn1", "r1"] in fused and ["c2", "bn2", "sum"] in fused
    x = np.random.default_rng(7).standard_normal((2, 6, 7, 4)).astype(np.float32)
    fast = model.run(x)["prob"]
    model.fuse = False
    assert all(len(step.layers) == 1 for step in model._steps(["prob"]))
    np.testing.assert_allclose(fast, model.run(x)["prob"], rtol=1e-5, atol=1e-6)


def test_a_requested_or_shared_layer_is_not_fused_away():
    layers = parse_spec(RESIDUAL).layers
    names = [[lay.name for lay in s.layers] for s in plan(layers, ["bn1", "prob"])]
    # bn1 is asked for: c1 may fold into it (the step yields bn1's values) but r1 may not
    assert ["c1", "bn1"] in names and ["r1"] in names
    shared = copy.deepcopy(RESIDUAL)
    shared["layers"][5]["inputs"] = ["bn2", "bn1"]  # bn1 read by r1 and sum
    names = [[lay.name for lay in s.layers] for s in plan(parse_spec(shared).layers, ["prob"])]
    assert ["c1", "bn1"] in names and ["r1"] in names


def test_values_are_freed_after_their_last_reader():
    layers = parse_spec(INCEPTION).layers
    steps = plan(layers, ["gate"])
    freed_at = {src: i for i, s in enumerate(steps) for src in s.frees}
    made_at = {s.name: i for i, s in enumerate(steps)}
    assert freed_at["norm"] == made_at["b4_pool"]  # its last reader, listed after b1, b2, b3
    assert freed_at["b1"] == made_at["mixed"] and "squash" not in made_at
    asked = plan(layers, ["norm", "gate"])
    assert all("norm" not in s.frees for s in asked)


def test_elementwise_steps_overwrite_values_nobody_reads_later():
    steps = {s.name: s for s in plan(parse_spec(RESIDUAL).layers, ["prob"], fuse=False)}
    assert steps["sum"].in_place == "bn2"  # not "image": that may be the caller's array
    assert steps["prob"].in_place is None  # softmax makes a new array
    twice = copy.deepcopy(RESIDUAL)
    twice["layers"][5]["inputs"] = ["bn2", "image", "bn2"]
    assert {s.name: s for s in plan(parse_spec(twice).layers, ["sum"])}["sum"].in_place is None
    x = np.random.default_rng(9).standard_normal((1, 6, 7, 4)).astype(np.float32)
    ref = residual_reference(x, residual_arrays())
    want = lref.add_reference([ref["bn2"], x, ref["bn2"]], relu=True)
    got = Model.from_arrays(twice, residual_arrays()).run(x, outputs="sum")["sum"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    kept = {s.name: s for s in plan(parse_spec(RESIDUAL).layers, ["bn2", "prob"])}
    assert kept["sum"].in_place is None and len(kept["sum"].layers) == 1
    model = Model.from_arrays(RESIDUAL, residual_arrays())
    x = np.random.default_rng(8).standard_normal((1, 6, 7, 4)).astype(np.float32)
    before = x.copy()
    both = model.run(x, outputs=["bn2", "sum"])
    np.testing.assert_array_equal(x, before)
    np.testing.assert_allclose(both["sum"], model.run(x, outputs="sum")["sum"], rtol=1e-6)
    assert not np.shares_memory(both["bn2"], both["sum"])


def test_memory_is_the_live_set_not_the_sum():
    model = Model.from_arrays(INCEPTION, inception_arrays())
    shapes = model.output_shapes(8, 8)
    last = model.memory(4, 8, 8, "squash")
    everything = model.memory(4, 8, 8, "all")
    total = 4 * 4 * sum(int(np.prod(s)) for s in shapes.values())
    assert last < everything <= total + 4 * 4 * 8 * 8 * 3
    # b1, b2 and b3 are written straight into mixed's output, allocated by b1; the widest moment
    # is then b4_pool being made while norm and mixed are held (not the four branches + mixed)
    live = [shapes[n] for n in ("norm", "mixed", "b4_pool")]
    assert last == 4 * 4 * sum(int(np.prod(s)) for s in live)
    copied = [shapes[n] for n in ("b1", "b2", "b3", "b4_relu6", "mixed")]
    assert last < 4 * 4 * sum(int(np.prod(s)) for s in copied)


def test_on_layer_sees_every_layer_once_in_order():
    model = Model.from_arrays(RESIDUAL, residual_arrays())
    calls = []
    model.run(
        np.zeros((1, 6, 7, 4), np.float32), on_layer=lambda i, n, name: calls.append((i, n, name))
    )
    assert [c[2] for c in calls] == model.layer_names
    assert [c[0] for c in calls] == list(range(8)) and {c[1] for c in calls} == {8}


def test_labels_are_kept_and_checked():
    model = Model.from_arrays(RESIDUAL, residual_arrays())
    assert model.labels == ["a", "b", "c", "d"] and model.spec["labels"] == model.labels
    bad = copy.deepcopy(RESIDUAL) | {"labels": ["a", "b"]}
    with pytest.raises(ModelError, match="'prob' has 4 channels") as err:
        parse_spec(bad)
    assert err.value.field == "labels"
    with pytest.raises(ModelError, match="strings"):
        parse_spec(copy.deepcopy(RESIDUAL) | {"labels": [1, 2, 3, 4]})


def test_graph_spec_round_trips_even_listed_out_of_order():
    spec = copy.deepcopy(INCEPTION)
    spec["layers"].insert(0, spec["layers"].pop(10))  # mixed first: it reads layers listed later
    spec["layers"][1]["input"] = "image"
    spec["layers"][11]["input"] = "mixed"
    parsed = parse_spec(spec)
    names = [lay.name for lay in parsed.layers]
    assert names.index("mixed") > names.index("b4_relu6")
    again = parse_spec(parsed.to_dict())
    assert again == parsed
    original = parse_spec(INCEPTION)
    assert original.to_dict()["layers"][6] == {
        "name": "b3",
        "type": "conv",
        "input": "norm",
        "filters": 2,
        "size": [5, 5],
        "stride": [1, 1],
        "pad": [2, 2, 2, 2],
        "dilation": [1, 1],
        "weights": "b3.w",
        "bias": "b3.b",
    }
    assert "input" not in original.to_dict()["layers"][3]  # b1 reads norm, the layer before it
    assert "input" not in original.to_dict()["layers"][5]  # b2 reads the layer before it


def test_grouped_conv_in_oihw_layout():
    spec = {
        "input": {"height": 5, "width": 5, "channels": 6},
        "layout": "OIHW",
        "layers": [{"name": "dw", "type": "conv", "filters": 6, "size": 3, "groups": 6}],
    }
    rng = np.random.default_rng(3)
    w = rand(rng, 6, 1, 3, 3)
    b = rand(rng, 6)
    model = Model.from_arrays(spec, {"dw.w": w, "dw.b": b})
    x = rand(rng, 2, 5, 5, 6)
    want = grouped_ref(x, np.moveaxis(w, 1, -1), b, 6)
    np.testing.assert_allclose(model.run(x)["dw"], want, rtol=RTOL, atol=ATOL)
    with pytest.raises(WeightsError, match=r"\(6, 1, 3, 3\)"):
        Model.from_arrays(spec, {"dw.w": rand(rng, 6, 6, 3, 3), "dw.b": b})


def test_summary_follows_the_graph():
    model = Model.from_arrays(RESIDUAL, residual_arrays())
    rows = {r["name"]: r for r in model.summary(batch=3)}
    assert rows["sum"]["inputs"] == ["bn2", "image"]
    assert rows["c2"]["params"] == 4 * 3 * 3 * 2 + 4 and rows["bn1"]["params"] == 16
    assert rows["c2"]["flops"] == 2 * 6 * 7 * 4 * 9 * 2
    assert rows["bn1"]["param_bytes"] == 64
    assert rows["sum"]["batch_activation_bytes"] == 3 * 4 * 6 * 7 * 4
    assert rows["gap"]["output_shape"] == (1, 1, 4)
    assert rows["gap"]["receptive_field"] == (10, 11)  # 5x5 from two 3x3 convs, then all 6x7


def base():
    spec = copy.deepcopy(RESIDUAL)
    spec["layers"].append({"name": "gp", "type": "globalmaxpool", "input": "image"})
    return spec


def _set(index, **fields):
    def change(spec):
        spec["layers"][index].update(fields)

    return change


def _without(index, key):
    def change(spec):
        del spec["layers"][index][key]

    return change


BAD = [
    (_set(5, inputs=["bn2", "nope"]), "sum", "inputs", "unknown layer 'nope'"),
    (_set(1, input="gap"), "bn1", "input", "cycle"),
    (_set(2, input="r1"), "r1", "input", "cycle"),
    (_set(5, inputs=[]), "sum", "inputs", "must read something"),
    (_set(5, inputs=["bn2"]), "sum", "inputs", "at least 2"),
    (_set(2, inputs=["bn1", "c1"]), "r1", "inputs", "reads one input"),
    (_set(2, input="bn1", inputs=["bn1"]), "r1", "inputs", "not both"),
    (_set(0, name="image"), "image", "name", "reserved"),
    (_set(5, inputs=["bn2", "gp"]), "sum", "inputs", "equal shapes"),
    (_set(3, filters=6), "sum", "inputs", "equal depth"),
    (_set(3, groups=3), "c2", "groups", "must divide both"),
    (_set(3, groups=0), "c2", "groups", "between 1"),
    (_set(1, eps=0), "bn1", "eps", "> 0"),
    (_set(1, weights="x"), "bn1", "weights", "unknown key"),
    (_set(1, scale="c1.w"), "bn1", "scale", "already used"),
    (_set(5, relu="yes"), "sum", "relu", "true or false"),
]


@pytest.mark.parametrize(("change", "layer", "field", "fragment"), BAD)
def test_bad_graphs_name_layer_and_field(change, layer, field, fragment):
    spec = base()
    change(spec)
    with pytest.raises(ModelError) as err:
        parse_spec(spec)
    assert (err.value.layer, err.value.field) == (layer, field)
    assert fragment in err.value.message


def test_concat_of_unequal_height_width_and_other_layer_fields():
    spec = copy.deepcopy(INCEPTION)
    spec["layers"][7]["stride"] = 2  # b4_pool halves its branch
    with pytest.raises(ShapeError, match="heights x widths") as err:
        parse_spec(spec)
    assert (err.value.layer, err.value.field) == ("mixed", "inputs")
    cases = [
        ({"type": "lrn"}, "size", "required"),
        ({"type": "lrn", "size": 3, "bias": 0}, "bias", "> 0"),
        ({"type": "lrn", "size": 3, "alpha": -1}, "alpha", ">= 0"),
        ({"type": "clip", "min": 2, "max": 1}, "min", "above max"),
        ({"type": "clip", "max": "6"}, "max", "finite number"),
        ({"type": "softmax", "axis": 1}, "axis", "unknown key"),
    ]
    for fields, field, fragment in cases:
        spec = {"layers": [{"name": "x"} | fields]}
        with pytest.raises(ModelError, match=fragment) as err:
            parse_spec(spec)
        assert (err.value.layer, err.value.field) == ("x", field)


def test_two_thousand_layer_graph_loads():
    # a residual tower listed backwards: every layer names its input, so ordering does the work
    n = 2000
    layers = [{"name": "r0", "type": "relu", "input": "image"}]
    for i in range(1, n):
        kind = {"type": "add", "inputs": [f"r{i - 1}", "image"]} if i % 2 else {"type": "relu"}
        layers.append({"name": f"r{i}", "input": f"r{i - 1}"} | kind)
        if i % 2:
            del layers[-1]["input"]
    spec = parse_spec({"input": {"height": 4, "width": 4, "channels": 2}, "layers": layers[::-1]})
    assert [lay.name for lay in spec.layers] == [f"r{i}" for i in range(n)]
    assert len(spec.shapes(4, 4)) == n and MAX_LAYERS >= 4096
    model = Model.from_arrays(spec, {})
    assert model.memory(1, 4, 4) <= 3 * 4 * 4 * 4 * 2  # image, the running value, the new one
    x = np.ones((1, 4, 4, 2), np.float32)
    np.testing.assert_array_equal(model.run(x)[f"r{n - 1}"], x * (1 + n // 2))


def test_summary_cli_prints_batch_bytes_and_the_live_set_peak(tmp_path, capsys):
    import json

    from engine.summary import main, peak_bytes

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(INCEPTION))
    assert main([str(path), "--batch", "4"]) == 0
    out = capsys.readouterr().out
    model = Model.from_arrays(INCEPTION, inception_arrays())
    last, every = model.memory(4, 8, 8), model.memory(4, 8, 8, "all")
    assert peak_bytes(parse_spec(INCEPTION), 8, 8, 4) == last
    assert f"{last:,} B asking for the last layer, {every:,} B asking for all" in out
    assert "per batch (B)" in out and "b1,b2,b3,b4_relu6" in out


def _conv_arrays(spec: dict, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    parsed = parse_spec(spec)
    out = {}
    for layer, c in zip(parsed.layers, parsed.channels_in(), strict=True):
        if layer.type == "conv":
            win = layer.window
            fan = win.fh * win.fw * c
            out[layer.weights] = rand(rng, layer.filters, win.fh, win.fw, c) / np.sqrt(fan)
            if layer.bias is not None:
                out[layer.bias] = rand(rng, layer.filters)
        elif layer.type == "batchnorm":
            out |= bn(rng, layer.name, c)
    return out


def _peak_traced(model: Model, x: np.ndarray, outputs) -> int:
    import tracemalloc

    model.run(x, outputs=outputs)  # warm: kernels compiled, filters packed, scratch grown
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    model.run(x, outputs=outputs)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak


def test_conv_branches_write_straight_into_their_concat_slice():
    steps = {s.name: s for s in plan(parse_spec(INCEPTION).layers, ["gate"], depth=None)}
    assert all(s.into is None for s in steps.values())  # no depths given: no slices
    spec = parse_spec(INCEPTION)
    steps = {s.name: s for s in plan(spec.layers, ["gate"], depth=spec.depths())}
    assert steps["b1"].into == ("mixed", 0, 4) and steps["b2"].into == ("mixed", 4, 9)
    assert steps["b3"].into == ("mixed", 9, 11)
    assert steps["b4_relu6"].into is None  # a clip step is copied in by the concat
    assert steps["mixed"].filled == ("b1", "b2", "b3")
    asked = {s.name: s for s in plan(spec.layers, ["b2", "gate"], depth=spec.depths())}
    assert asked["b2"].into is None  # requested: it keeps its own array
    # Two 1x1 branches of 32 filters each over a 32x32 image, concatenated: made in place, the
    # run allocates the concat's output only; with the copy, both branches as well.
    two = {
        "input": {"height": 32, "width": 32, "channels": 8},
        "layers": [
            {"name": "a", "type": "conv", "filters": 32, "size": 1, "input": "image"},
            {"name": "b", "type": "conv", "filters": 32, "size": 3, "pad": 1, "input": "image"},
            {"name": "cat", "type": "concat", "inputs": ["a", "b"]},
        ],
    }
    model = Model.from_arrays(two, _conv_arrays(two, 3))
    x = np.random.default_rng(4).standard_normal((4, 32, 32, 8)).astype(np.float32)
    cat_bytes = 4 * 4 * 32 * 32 * 64
    direct = _peak_traced(model, x, "cat")
    got = model.run(x)["cat"]
    model.fuse = False
    copied = _peak_traced(model, x, "cat")
    np.testing.assert_array_equal(got, model.run(x)["cat"])
    assert direct < 1.2 * cat_bytes and copied >= 1.9 * cat_bytes, (direct, copied)


RESNET_BLOCK = {
    "input": {"height": 9, "width": 11, "channels": 32},
    "layers": [
        {"name": "stem", "type": "conv", "filters": 32, "size": 1},
        {"name": "stem_relu", "type": "relu"},
        {"name": "c1", "type": "conv", "filters": 32, "size": 3, "pad": 1, "bias": None},
        {"name": "bn1", "type": "batchnorm"},
        {"name": "r1", "type": "relu"},
        {"name": "c2", "type": "conv", "filters": 32, "size": 3, "pad": 1},
        {"name": "bn2", "type": "batchnorm"},
        {"name": "sum", "type": "add", "inputs": ["bn2", "stem_relu"]},
        {"name": "out", "type": "relu"},
        {"name": "down", "type": "conv", "filters": 16, "size": 1, "stride": 2},
        {"name": "proj", "type": "conv", "filters": 16, "size": 1, "stride": 2, "input": "out"},
        {"name": "sum2", "type": "add", "inputs": ["proj", "down"], "relu": True},
    ],
}


def test_residual_add_and_relu_fuse_into_the_conv_store():
    spec = parse_spec(RESNET_BLOCK)
    steps = {s.name: s for s in plan(spec.layers, ["sum2"], depth=spec.depths())}
    assert [lay.name for lay in steps["out"].layers] == ["c2", "bn2", "sum", "out"]
    # the block input is read last by the add: the conv adds itself onto it, in place
    assert steps["out"].residuals == ("stem_relu",) and steps["out"].in_place == "stem_relu"
    # `down` (listed first) takes the add; the step runs where the add sits, after proj
    order = list(steps)
    assert order.index("proj") < order.index("sum2")
    assert steps["sum2"].layers[0].name == "down" and steps["sum2"].residuals == ("proj",)
    model = Model.from_arrays(RESNET_BLOCK, _conv_arrays(RESNET_BLOCK, 5))
    x = np.random.default_rng(6).standard_normal((2, 9, 11, 32)).astype(np.float32)
    before = x.copy()
    fused = model.run(x, outputs=["sum2"])["sum2"]
    every = model.run(x, outputs="all")  # nothing fused: each layer its own values
    np.testing.assert_array_equal(x, before)
    model.fuse = False
    plain = model.run(x, outputs="all")
    np.testing.assert_allclose(fused, plain["sum2"], rtol=RTOL, atol=ATOL)
    for name, value in plain.items():
        np.testing.assert_allclose(every[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
    model.fuse = True
    for name in ("bn2", "sum", "out"):  # asked for alone, each still returns its own values
        got = model.run(x, outputs=name)[name]
        np.testing.assert_allclose(got, plain[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize(
    "inputs",
    [["c", "a", "b"], ["a", "c", "a"], ["c", "image"], ["c", "x1"]],
    ids=["three", "a-twice", "image", "conv-input"],
)
def test_fused_residual_add_of_any_inputs_equals_the_unfused_run(inputs):
    # the conv's add may take several residuals, one twice, the image (never overwritten), or
    # the very value the conv reads (which must not change under it)
    spec = {
        "input": {"height": 7, "width": 8, "channels": 4},
        "layers": [
            {"name": "x1", "type": "conv", "filters": 4, "size": 1},
            {"name": "a", "type": "conv", "filters": 4, "size": 1, "input": "image"},
            {"name": "b", "type": "relu", "input": "image"},
            {"name": "c", "type": "conv", "filters": 4, "size": 3, "pad": 1, "input": "x1"},
            {"name": "s", "type": "add", "inputs": inputs, "relu": True},
        ],
    }
    model = Model.from_arrays(spec, _conv_arrays(spec, 9))
    steps = {st.name: st for st in model._steps(["s"])}
    head, add = steps["s"].layers  # the first conv read only by the add takes it
    assert head.type == "conv" and add.name == "s"
    x = np.random.default_rng(10).standard_normal((2, 7, 8, 4)).astype(np.float32)
    before = x.copy()
    fused = model.run(x, "s")["s"]
    np.testing.assert_array_equal(x, before)
    model.fuse = False
    np.testing.assert_allclose(fused, model.run(x, "s")["s"], rtol=RTOL, atol=ATOL)


# Blocks whose convs meet the fused store: K (40, 24, 36, 12) no multiple of the block widths,
# the residual add (and its ReLU) in the stores of c2 (3x3), down (1x1 stride 2) and expand
# (1x1: pointwise), each inception branch into its concat slice.
RESNET_SEAM = {
    "input": {"height": 9, "width": 11, "channels": 40},
    "layers": [
        {"name": "stem", "type": "conv", "filters": 40, "size": 1},
        {"name": "stem_relu", "type": "relu"},
        {"name": "c1", "type": "conv", "filters": 40, "size": 3, "pad": 1, "bias": None},
        {"name": "bn1", "type": "batchnorm"},
        {"name": "r1", "type": "relu"},
        {"name": "c2", "type": "conv", "filters": 40, "size": 3, "pad": 1},
        {"name": "bn2", "type": "batchnorm"},
        {"name": "sum", "type": "add", "inputs": ["bn2", "stem_relu"]},
        {"name": "out", "type": "relu"},
        {"name": "down", "type": "conv", "filters": 24, "size": 1, "stride": 2},
        {"name": "proj", "type": "conv", "filters": 24, "size": 1, "stride": 2, "input": "out"},
        {"name": "sum2", "type": "add", "inputs": ["proj", "down"], "relu": True},
        {"name": "expand", "type": "conv", "filters": 24, "size": 1},
        {"name": "sum3", "type": "add", "inputs": ["expand", "sum2"], "relu": True},
    ],
}


def resnet_seam_reference(x, a):
    def conv(name, src, **kw):
        return conv2d_reference(src, a[f"{name}.w"], a.get(f"{name}.b"), **kw)

    o = {"stem": conv("stem", x)}
    o["stem_relu"] = relu_reference(o["stem"])
    o["c1"] = conv("c1", o["stem_relu"], pad=1)
    o["bn1"] = bn_ref(o["c1"], a, "bn1")
    o["r1"] = relu_reference(o["bn1"])
    o["c2"] = conv("c2", o["r1"], pad=1)
    o["bn2"] = bn_ref(o["c2"], a, "bn2")
    o["sum"] = lref.add_reference([o["bn2"], o["stem_relu"]])
    o["out"] = relu_reference(o["sum"])
    o["down"] = conv("down", o["out"], stride=2)
    o["proj"] = conv("proj", o["out"], stride=2)
    o["sum2"] = lref.add_reference([o["proj"], o["down"]], relu=True)
    o["expand"] = conv("expand", o["sum2"])
    o["sum3"] = lref.add_reference([o["expand"], o["sum2"]], relu=True)
    return o


INCEPTION_SEAM = {
    "input": {"height": 10, "width": 12, "channels": 8},
    "layers": [
        {"name": "stem", "type": "conv", "filters": 40, "size": 3, "pad": 1},
        {"name": "stem_relu", "type": "relu"},
        {"name": "b1", "type": "conv", "filters": 24, "size": 1, "input": "stem_relu"},
        {"name": "b2_reduce", "type": "conv", "filters": 36, "size": 1, "input": "stem_relu"},
        {"name": "b2", "type": "conv", "filters": 40, "size": 3, "pad": 1},
        {"name": "b3", "type": "conv", "filters": 12, "size": 5, "pad": 2, "input": "stem_relu"},
        {"name": "b4_pool", "type": "maxpool", "size": 3, "stride": 1, "pad": 1, "input": "stem"},
        {"name": "b4", "type": "conv", "filters": 8, "size": 1},
        {"name": "mixed", "type": "concat", "inputs": ["b1", "b2", "b3", "b4"]},
        {"name": "gap", "type": "globalavgpool"},
    ],
}


def inception_seam_reference(x, a):
    def conv(name, src, **kw):
        return conv2d_reference(src, a[f"{name}.w"], a[f"{name}.b"], **kw)

    o = {"stem": conv("stem", x, pad=1)}
    o["stem_relu"] = relu_reference(o["stem"])
    o["b1"] = conv("b1", o["stem_relu"])
    o["b2_reduce"] = conv("b2_reduce", o["stem_relu"])
    o["b2"] = conv("b2", o["b2_reduce"], pad=1)
    o["b3"] = conv("b3", o["stem_relu"], pad=2)
    o["b4_pool"] = max_pool2d_reference(o["stem"], 3, 1, 1)
    o["b4"] = conv("b4", o["b4_pool"])
    o["mixed"] = lref.concat_reference([o["b1"], o["b2"], o["b3"], o["b4"]])
    o["gap"] = lref.global_avg_pool_reference(o["mixed"])
    return o


SEAM_NETS = {  # spec, its reference run, input shape
    "resnet": (RESNET_SEAM, resnet_seam_reference, (2, 9, 11, 40)),
    "inception": (INCEPTION_SEAM, inception_seam_reference, (2, 10, 12, 8)),
}


@functools.cache
def _seam_run(net: str) -> tuple:
    """Return the model, its input and the reference graph run's every value."""
    spec, reference, shape = SEAM_NETS[net]
    arrays = _conv_arrays(spec, 17)
    x = np.random.default_rng(18).standard_normal(shape).astype(np.float32)
    return Model.from_arrays(spec, arrays), x, reference(x, arrays)


def test_the_seam_nets_last_output_uses_the_fused_residual_and_the_concat_slices():
    spec = parse_spec(RESNET_SEAM)
    steps = {s.name: s for s in plan(spec.layers, ["sum3"], depth=spec.depths())}
    assert steps["out"].residuals == ("stem_relu",) and steps["sum2"].residuals == ("proj",)
    assert steps["sum3"].layers[0].name == "expand" and steps["sum3"].residuals == ("sum2",)
    spec = parse_spec(INCEPTION_SEAM)
    steps = {s.name: s for s in plan(spec.layers, ["gap"], depth=spec.depths())}
    assert [steps[b].into for b in ("b1", "b2", "b3", "b4")] == [
        ("mixed", 0, 24),
        ("mixed", 24, 64),
        ("mixed", 64, 76),
        ("mixed", 76, 84),
    ]


@pytest.mark.parametrize("outputs", ["all", "last"])
@pytest.mark.parametrize("kernel", [k for k in kernels.KERNELS if kernels.split(k)[0] != "grouped"])
@pytest.mark.parametrize("net", SEAM_NETS)
def test_each_forced_kernel_runs_the_blocks_as_the_reference_graph(net, kernel, outputs):
    # the kernel runs every conv it applies to; the others run im2col of its family
    model, x, want = _seam_run(net)
    last = model.layer_names[-1]
    fallback = "im2col-" + kernels.split(kernel)[1]
    with kernels.forced([kernel, fallback]):
        got = model.run(x, outputs="all" if outputs == "all" else last)
    assert kernel in model.kernels.values(), model.kernels
    assert set(model.kernels.values()) <= {kernel, fallback}
    assert list(got) == (model.layer_names if outputs == "all" else [last])
    for name, value in got.items():
        assert value.shape == want[name].shape, name
        np.testing.assert_allclose(value, want[name], rtol=RTOL, atol=ATOL, err_msg=name)
