"""Model.run(on_step=...): a long layer runs in steps (image groups, bands of output rows) that a
caller can stop between; the stepped results equal the unstepped ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from engine import Model, ShapeError, kernels
from engine import model as model_module
from engine.spec import parse_spec

small = st.integers(1, 3)


@st.composite
def layer(draw):
    kind = draw(st.sampled_from(["conv", "relu", "maxpool", "avgpool", "local"]))
    out = {"type": kind}
    if kind == "relu":
        return out
    out["size"] = [draw(small), draw(small)]
    out["stride"] = [draw(small), draw(small)]
    out["pad"] = [draw(st.integers(0, 5)) for _ in range(4)]  # bands of pad rows only, too
    if kind in ("conv", "local"):
        out["filters"] = draw(small)
    if kind in ("conv", "local", "maxpool"):
        out["dilation"] = [draw(st.integers(1, 2)), draw(st.integers(1, 2))]
    if kind == "avgpool":
        out["count_pad"] = draw(st.booleans())
    return out


def _model(raw, h, w, c, seed):
    for i, item in enumerate(raw):
        item["name"] = f"l{i}"
    spec_dict = {"input": {"height": h, "width": w, "channels": c}, "fit": "floor", "layers": raw}
    try:
        spec = parse_spec(spec_dict)
    except ShapeError:
        assume(False)
    rng = np.random.default_rng(seed)
    arrays = {}
    norm = spec.to_dict()
    for item, cin, shape in zip(norm["layers"], spec.channels_in(), spec.shapes(h, w), strict=True):
        if item["type"] not in ("conv", "local"):
            continue
        lead = () if item["type"] == "conv" else shape[:2]
        k, (fh, fw) = item["filters"], item["size"]
        arrays[item["weights"]] = rng.standard_normal((*lead, k, fh, fw, cin)).astype(np.float32)
        arrays[item["bias"]] = rng.standard_normal((*lead, k)).astype(np.float32)
    return Model.from_arrays(spec_dict, arrays)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    raw=st.lists(layer(), min_size=1, max_size=3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    c=small,
    n=st.integers(1, 3),
    step=st.sampled_from([1, 50, 400]),
    seed=st.integers(0, 2**16),
)
def test_stepped_run_equals_the_unstepped_run(raw, h, w, c, n, step, seed):
    model = _model(raw, h, w, c, seed)
    x = np.random.default_rng(seed).standard_normal((n, h, w, c)).astype(np.float32)
    whole = model.run(x, "all")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "STEP_MACS", step)
        stepped = model.run(x, "all", on_step=lambda: calls.append(1))
    assert len(calls) >= len(raw)
    for name, array in whole.items():
        assert stepped[name].shape == array.shape
        np.testing.assert_array_equal(stepped[name], array, err_msg=name)


def test_one_big_layer_of_one_image_is_stepped_by_rows_and_can_be_stopped(monkeypatch):
    spec = {
        "input": {"channels": 2},
        "fit": "floor",
        "layers": [{"name": "c", "type": "conv", "filters": 4, "size": 3, "pad": 40}],
    }
    rng = np.random.default_rng(0)
    arrays = {
        "c.w": rng.standard_normal((4, 3, 3, 2)).astype(np.float32),
        "c.b": rng.standard_normal(4).astype(np.float32),
    }
    model = Model.from_arrays(spec, arrays)
    x = rng.standard_normal((1, 5, 7, 2)).astype(np.float32)  # output 83 x 85, mostly pad
    monkeypatch.setattr(model_module, "STEP_MACS", 85 * 4 * 9 * 2 * 10)  # 10 rows a step
    calls = []
    stepped = model.run(x, "c", on_step=lambda: calls.append(1))["c"]
    assert len(calls) == 9  # ceil(83 / 10)
    np.testing.assert_array_equal(stepped, model.run(x, "c")["c"])

    class Stop(Exception):
        pass

    def stop_at_third():
        calls.append(1)
        if len(calls) == 3:
            raise Stop

    calls.clear()
    with pytest.raises(Stop):
        model.run(x, "c", on_step=stop_at_third)
    assert len(calls) == 3  # stopped inside the layer, 6 bands never computed


@pytest.mark.parametrize("step", [1, 600, 10000])
def test_stepped_branches_write_their_slice_of_a_concat(step):
    # A conv branch writes straight into its channel slice of the concat's output; stepped by
    # rows (1, 600) or by image groups (10000: two of the three images a step), it must fill
    # only that slice.
    rng = np.random.default_rng(4)
    spec = {
        "input": {"height": 6, "width": 7, "channels": 3},
        "layers": [
            {"name": "a", "type": "conv", "filters": 4, "size": 3, "pad": 1, "input": "image"},
            {"name": "b", "type": "conv", "filters": 5, "size": 1, "input": "image"},
            {"name": "cat", "type": "concat", "inputs": ["a", "b"]},
            {"name": "r", "type": "relu"},
        ],
    }
    arrays = {
        "a.w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "a.b": rng.standard_normal(4).astype(np.float32),
        "b.w": rng.standard_normal((5, 1, 1, 3)).astype(np.float32),
        "b.b": rng.standard_normal(5).astype(np.float32),
    }
    model = Model.from_arrays(spec, arrays)
    x = rng.standard_normal((3, 6, 7, 3)).astype(np.float32)
    whole = model.run(x, "all")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(model_module, "STEP_MACS", step)
        stepped = model.run(x, ["cat", "r"], on_step=lambda: calls.append(1))
    assert len(calls) > 4
    for name in ("cat", "r"):
        np.testing.assert_array_equal(stepped[name], whole[name], err_msg=name)


@pytest.mark.parametrize("kernel", [k for k in kernels.KERNELS if not k.startswith("grouped")])
@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 5, 7])
def test_stepped_rows_give_the_floats_of_the_unstepped_run(kernel, dilation, rows):
    # The worker runs long layers in bands of rows (so a job can stop mid-layer) and its
    # results are compared bit for bit with a whole run. Winograd computes rows y and y + D
    # together: a band starting between them would give those rows other floats; sgemm's
    # floats depend on a tile's size, which a band changes: BLAS kernels step by whole images.
    rng = np.random.default_rng(rows)
    c, k, h, w = 32, 16, 23, 19
    spec = {
        "input": {"channels": c},
        "layers": [
            {"name": "c", "type": "conv", "filters": k, "size": 3, "pad": dilation,
             "dilation": dilation},
        ],
    }  # fmt: skip
    arrays = {
        "c.w": rng.standard_normal((k, 3, 3, c)).astype(np.float32),
        "c.b": rng.standard_normal(k).astype(np.float32),
    }
    model = Model.from_arrays(spec, arrays)
    x = rng.standard_normal((1, h, w, c)).astype(np.float32)
    with kernels.forced([kernel, "im2col-blas"]):
        whole = model.run(x, "c")["c"]
        unstepped = []
        model.run(x, "c", on_step=lambda: unstepped.append(1))
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(model_module, "STEP_MACS", w * k * 9 * c * rows)  # `rows` rows a step
            stepped = model.run(x, "c", on_step=lambda: calls.append(1))["c"]
    if model.kernels["c"].endswith("-blas"):
        assert len(calls) == len(unstepped)
    else:
        assert len(calls) >= len(unstepped) + 2
    assert np.array_equal(stepped, whole)
