"""convq submit saves only inside its output folder, whatever names the server sends."""

from __future__ import annotations

import io

import numpy as np
import pytest

from service.client import ClientError, save


class FakeApi:
    """Answers every result request with one small array (npy) or a few PNG bytes."""

    def __init__(self):
        self.calls = 0

    def call(self, method, path, params=None, **kw):
        self.calls += 1
        buf = io.BytesIO()
        np.save(buf, np.ones((1, 2, 2, 1), np.float32))
        body = buf.getvalue() if params["format"] == "npy" else b"\x89PNG fake"
        return type("Answer", (), {"content": body})()


@pytest.mark.parametrize(
    "job, name",
    [
        ("../../escaped", "conv1"),
        ("/tmp/abs", "conv1"),
        ("job", "../../../escaped"),
        ("job", "a/../../b"),
        ("job", ".hidden"),
        ("..", "conv1"),
        ("job", ""),
        ("job", "x" * 200),
        (7, "conv1"),
    ],
)
def test_unsafe_server_names_are_refused_before_anything_is_written(tmp_path, job, name):
    out = tmp_path / "out"
    api = FakeApi()
    with pytest.raises(ClientError, match="unsafe"):
        save(api, job, [name], [tmp_path / "a.png"], out, png=True)
    assert api.calls == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == []


def test_safe_names_land_inside_the_folder_and_any_name_is_a_member(tmp_path):
    out = tmp_path / "out"
    names = ["conv1", "file", "allow_pickle", "block.1:relu"]
    saved = save(FakeApi(), "0a1b-c2", names, [tmp_path / "cat.png"], out, png=True)
    assert saved[0] == out / "0a1b-c2.npz"
    assert all(p.resolve().is_relative_to(out.resolve()) for p in saved)
    with np.load(saved[0], allow_pickle=False) as npz:
        assert sorted(npz.files) == sorted(names)
        assert npz["file"].shape == (1, 2, 2, 1)
    assert (out / "0a1b-c2" / "block.1:relu" / "000-cat.png").read_bytes() == b"\x89PNG fake"
