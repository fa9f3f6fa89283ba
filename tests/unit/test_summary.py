"""Model summary: per-layer numbers, the table, and `convq summary` without weights."""

from __future__ import annotations

import json

import numpy as np

from engine import Model
from engine.spec import parse_spec
from engine.summary import format_summary, main, summarize

VGGISH = {
    "name": "vggish",
    "input": {"height": 32, "width": 32, "channels": 3},
    "layers": [
        {"name": "conv1", "type": "conv", "filters": 8, "size": 3, "pad": 1},
        {"name": "relu1", "type": "relu"},
        {"name": "conv2", "type": "conv", "filters": 8, "size": 3, "pad": 1, "bias": None},
        {"name": "pool1", "type": "maxpool", "size": 2},
        {"name": "conv3", "type": "conv", "filters": 16, "size": 3, "pad": 2, "dilation": 2},
        {"name": "avg", "type": "avgpool", "size": 16},
    ],
}


def rows_by_name(rows):
    return {r["name"]: r for r in rows}


def test_rows_hold_shapes_params_flops_and_bytes():
    rows = rows_by_name(summarize(parse_spec(VGGISH)))
    assert rows["conv1"]["output_shape"] == (32, 32, 8)
    assert rows["conv1"]["params"] == 8 * 3 * 3 * 3 + 8
    assert rows["conv2"]["params"] == 8 * 3 * 3 * 8  # no bias
    assert rows["conv1"]["flops"] == 2 * 32 * 32 * 8 * 27
    assert rows["relu1"]["flops"] == 32 * 32 * 8
    assert rows["pool1"]["flops"] == 16 * 16 * 8 * 4
    assert rows["pool1"]["activation_bytes"] == 4 * 16 * 16 * 8
    assert rows["avg"]["output_shape"] == (1, 1, 16)
    assert rows["conv3"]["im2col"] == (72, 256)


def test_receptive_field_recurrence():
    rows = rows_by_name(summarize(parse_spec(VGGISH)))
    # two stacked 3x3 convs see 5x5; the pool adds 1, then a 3x3 conv
    # dilated by 2 after a stride-2 pool adds 2*2*2 = 8; the 16x16 pool adds 15*2
    assert rows["conv1"]["receptive_field"] == (3, 3)
    assert rows["conv2"]["receptive_field"] == (5, 5)
    assert rows["pool1"]["receptive_field"] == (6, 6)
    assert rows["conv3"]["receptive_field"] == (14, 14)
    assert rows["avg"]["receptive_field"] == (44, 44)


def test_without_a_size_only_size_free_fields_are_known():
    spec = dict(VGGISH)
    del spec["input"]
    rows = rows_by_name(summarize(parse_spec(spec)))
    assert rows["conv1"]["output_shape"] is None and rows["conv1"]["flops"] is None
    assert rows["conv1"]["params"] == 224
    assert rows["conv3"]["receptive_field"] == (14, 14)
    sized = rows_by_name(summarize(parse_spec(spec), 64, 64))
    assert sized["avg"]["output_shape"] == (2, 2, 16)


def test_table_has_totals():
    rows = summarize(parse_spec(VGGISH))
    table = format_summary(rows)
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["layer", "type"]
    total = [line for line in lines if line.startswith("total")][0]
    params = sum(r["params"] for r in rows)
    flops = sum(r["flops"] for r in rows)
    assert f"{params:,}" in total and f"{flops:,}" in total
    assert "32x32x8" in table and "14x14" in table
    assert "?" in format_summary(summarize(parse_spec({"layers": VGGISH["layers"]})))


def test_cli_with_the_spec_alone(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(VGGISH))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "conv3" in out and "total" in out
    assert main([str(path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["output_shape"] == [32, 32, 8]


def test_cli_sizes_a_sizeless_spec_and_reports_misfits(tmp_path, capsys):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"layers": VGGISH["layers"]}))
    assert main([str(path), "--height", "64", "--width", "64"]) == 0
    assert "32x32x16" in capsys.readouterr().out
    assert main([str(path), "--height", "34", "--width", "32"]) == 2
    err = capsys.readouterr().err
    assert "error: avg: height (17 - 16 + 2*0)/16 + 1 = 1.0625 is not an integer" in err
    assert "the whole network fits input height 32 or 64" in err
    assert main([str(tmp_path / "missing.json")]) == 2


def test_cli_with_weights_counts_local_params(tmp_path, capsys):
    spec = {
        "input": {"channels": 2},
        "layers": [{"name": "l", "type": "local", "filters": 3, "size": 2, "stride": 2}],
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    np.savez(
        tmp_path / "w.npz",
        **{"l.w": np.ones((4, 5, 3, 2, 2, 2), np.float32), "l.b": np.zeros((4, 5, 3), np.float32)},
    )
    assert main([str(tmp_path / "spec.json"), "--weights", str(tmp_path / "w.npz")]) == 0
    out = capsys.readouterr().out
    assert f"{4 * 5 * 3 * 9:,}" in out  # (Hout*Wout*K) * (FH*FW*C + 1)
    model = Model.load(tmp_path / "spec.json", tmp_path / "w.npz")
    assert model.summary(8, 10)[0]["output_shape"] == (4, 5, 3)
