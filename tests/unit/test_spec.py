"""Spec parsing: normalisation, and every bad field rejected with its layer and field named."""

from __future__ import annotations

import copy
import json

import pytest

from engine.errors import ModelError, ShapeError
from engine.spec import MAX_LAYERS, parse_spec, parse_spec_json

BASE = {
    "name": "tiny",
    "input": {"height": 8, "width": 8, "channels": 3},
    "preprocess": {"scale": 0.5, "mean": [1, 2, 3], "std": 2},
    "layers": [
        {"name": "conv1", "type": "conv", "filters": 4, "size": 3, "pad": 1},
        {"name": "relu1", "type": "relu"},
        {"name": "pool1", "type": "maxpool", "size": 2},
        {"name": "avg", "type": "avgpool", "size": [2, 1], "stride": [2, 1], "count_pad": True},
        {"name": "fc", "type": "local", "filters": 2, "size": [2, 4], "bias": None},
    ],
}


def spec_with(change) -> dict:
    spec = copy.deepcopy(BASE)
    change(spec)
    return spec


def test_normalised_form_spells_out_defaults():
    spec = parse_spec(BASE)
    out = spec.to_dict()
    assert out["fit"] == "strict" and out["layout"] == "OHWI"
    assert out["preprocess"] == {"scale": 0.5, "mean": [1.0, 2.0, 3.0], "std": [2.0, 2.0, 2.0]}
    conv, _, pool, avg, fc = out["layers"]
    assert conv == {
        "name": "conv1",
        "type": "conv",
        "filters": 4,
        "size": [3, 3],
        "stride": [1, 1],
        "pad": [1, 1, 1, 1],
        "dilation": [1, 1],
        "weights": "conv1.w",
        "bias": "conv1.b",
    }
    assert pool["stride"] == [2, 2]  # pools default their stride to their size
    assert avg["count_pad"] is True and "dilation" not in avg
    assert fc["bias"] is None
    # parsing the normalised form again gives the same spec
    assert parse_spec(out) == spec


def test_shapes_and_channels_follow_the_layers():
    spec = parse_spec(BASE)
    assert spec.shapes(8, 8) == [(8, 8, 4), (8, 8, 4), (4, 4, 4), (2, 4, 4), (1, 1, 2)]
    assert spec.channels_in() == [3, 4, 4, 4, 4]


def test_defaults_without_input_or_preprocess():
    spec = parse_spec({"layers": [{"name": "r", "type": "relu"}]})
    assert (spec.name, spec.height, spec.width, spec.channels) == ("model", None, None, 3)
    assert spec.preprocess.mean == (0.0, 0.0, 0.0) and spec.preprocess.scale == 1.0


def _set(path, value):
    def change(spec):
        target = spec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _delete(path):
    def change(spec):
        target = spec
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return change


BAD = [
    # (change, layer named, field named, message fragment)
    (_set(["layers", 0, "type"], "deconv"), "conv1", "type", "unknown type"),
    (_set(["layers", 0, "kernel"], 3), "conv1", "kernel", "unknown key"),
    (_set(["colour"], "red"), None, "colour", "unknown model key"),
    (_set(["layers", 1, "name"], "conv1"), "conv1", "name", "duplicate"),
    (_set(["layers"], []), None, "layers", "non-empty"),
    (_set(["layers", 0, "stride"], 0), "conv1", "stride", ">= 1"),
    (_set(["layers", 0, "dilation"], 0), "conv1", "dilation", ">= 1"),
    (_set(["layers", 0, "pad"], -1), "conv1", "pad", ">= 0"),
    (_set(["layers", 0, "pad"], [1, 1, 1]), "conv1", "pad", "[top, left, bottom, right]"),
    (_set(["layers", 0, "filters"], 0), "conv1", "filters", "between 1"),
    (_set(["layers", 0, "filters"], 2.5), "conv1", "filters", "integer"),
    (_delete(["layers", 0, "filters"]), "conv1", "filters", "required"),
    (_delete(["layers", 2, "size"]), "pool1", "size", "required"),
    (_set(["layers", 0, "size"], 10**9), "conv1", "size", "between"),
    (_set(["layers", 3, "count_pad"], "yes"), "avg", "count_pad", "true or false"),
    (_set(["layers", 3, "dilation"], 2), "avg", "dilation", "unknown key"),
    (_set(["layers", 1, "size"], 3), "relu1", "size", "unknown key"),
    (_set(["layers", 0, "name"], ""), "layer 0", "name", "name"),
    (_set(["layers", 0, "name"], "a/b"), "layer 0", "name", "name"),
    (_set(["layers", 0, "weights"], "fc.w"), "fc", "weights", "already used"),
    (_set(["layers", 4, "weights"], "conv1.w"), "fc", "weights", "already used"),
    (_set(["layers", 0], "conv"), "layer 0", None, "object"),
    (_set(["preprocess", "mean"], [1, 2]), "preprocess", "mean", "list of 3"),
    (_set(["preprocess", "std"], [1, 0, 1]), "preprocess", "std", "> 0"),
    (_set(["preprocess", "std"], float("nan")), "preprocess", "std", "finite"),
    (_set(["preprocess", "std"], 1e-300), "preprocess", "std", "beyond float32's range"),
    (_set(["preprocess", "scale"], "1/255"), "preprocess", "scale", "finite numbers"),
    (_set(["preprocess", "shift"], 1), "preprocess", "shift", "unknown key"),
    (_set(["input", "depth"], 3), "input", "depth", "unknown key"),
    (_delete(["input", "width"]), "input", "height", "both"),
    (_set(["input", "channels"], 0), "input", "channels", "between"),
    (_set(["fit"], "ceil"), None, "fit", "strict, floor"),
    (_set(["layout"], "NCHW"), None, "layout", "OHWI, OIHW"),
    (_set(["name"], 5), None, "name", "model name"),
]


@pytest.mark.parametrize(("change", "layer", "field", "fragment"), BAD)
def test_bad_specs_name_layer_and_field(change, layer, field, fragment):
    bad = spec_with(change)
    with pytest.raises(ModelError) as err:
        parse_spec(bad)
    assert err.value.layer == layer
    assert err.value.field == field
    assert fragment in err.value.message


def test_too_many_layers():
    layers = [{"name": f"r{i}", "type": "relu"} for i in range(MAX_LAYERS + 1)]
    with pytest.raises(ModelError, match="too many layers"):
        parse_spec({"layers": layers})


def test_window_larger_than_padded_input_at_parse_time():
    bad = spec_with(_set(["layers", 2, "size"], 9))
    with pytest.raises(ShapeError, match="larger than the padded input") as err:
        parse_spec(bad)
    assert err.value.layer == "pool1"


def test_deep_layer_misfit_suggests_whole_network_sizes():
    spec = spec_with(_set(["input"], {"height": 10, "width": 8, "channels": 3}))
    with pytest.raises(ShapeError) as err:
        parse_spec(spec)
    # 10 -> pool 5 -> avg (5-2)/2+1 = 2.5; the whole network fits heights 8 and 12
    assert err.value.layer == "avg"
    assert "2.5" in err.value.message
    assert "the whole network fits input height 8 or 12" in err.value.message


def test_floor_fit_accepts_what_strict_rejects():
    spec = parse_spec(spec_with(_set(["fit"], "floor")) | {"input": {"height": 9, "width": 9}})
    assert spec.shapes(9, 9)[2] == (4, 4, 4)


def test_parse_spec_json_errors_are_model_errors():
    with pytest.raises(ModelError, match="not valid JSON") as err:
        parse_spec_json(b"{nope")
    assert err.value.field == "spec"
    with pytest.raises(ModelError, match="over the"):
        parse_spec_json(b" " * (2 << 20))
    with pytest.raises(ModelError, match="not valid JSON"):
        parse_spec_json("[" * 100_000 + "]" * 100_000)
    assert parse_spec_json(json.dumps(BASE).encode()) == BASE
    with pytest.raises(ModelError, match="JSON object"):
        parse_spec([1, 2])


def test_pool_windows_holding_only_padding_are_refused():
    spec = {
        "input": {"height": 4, "width": 4, "channels": 1},
        "fit": "floor",
        "layers": [{"name": "p", "type": "maxpool", "size": 1, "stride": 1, "pad": [1, 0, 0, 0]}],
    }
    with pytest.raises(ShapeError, match="output height index 0 of 5 pools only padding") as err:
        parse_spec(spec)
    assert (err.value.layer, err.value.field) == ("p", "pad")
    # an average that counts its pads is defined (zero) there; one that does not is not
    spec["layers"][0] |= {"type": "avgpool", "count_pad": True}
    assert parse_spec(spec).shapes(4, 4) == [(5, 4, 1)]
    spec["layers"][0]["count_pad"] = False
    with pytest.raises(ShapeError, match="pools only padding"):
        parse_spec(spec)


def test_input_size_is_the_declared_size_or_none_when_open():
    assert parse_spec(BASE).input_size == (8, 8)
    open_size = parse_spec(spec_with(lambda s: s.update(input={"channels": 3})))
    assert open_size.input_size is None


def test_window_and_weights_accessors_name_a_layer_without_them():
    conv, relu, pool, _, fc = parse_spec(BASE).layers
    assert (conv.sliding_window().fh, pool.sliding_window().sh) == (3, 2)
    assert (conv.weights_key(), fc.weights_key()) == ("conv1.w", "fc.w")
    with pytest.raises(ModelError, match="relu1: a relu layer has no window"):
        relu.sliding_window()
    with pytest.raises(ModelError, match="pool1: a maxpool layer has no weights"):
        pool.weights_key()
