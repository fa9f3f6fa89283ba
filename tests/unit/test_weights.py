"""Weight files: round trips, and every unsafe or broken file refused with a WeightsError."""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest

from engine.errors import WeightsError
from engine.weights import load_weights, read_weights, to_ohwi, to_safetensors

ARRAYS = {
    "conv1.w": np.arange(2 * 3 * 3 * 4, dtype=np.float32).reshape(2, 3, 3, 4),
    "conv1.b": np.array([0.5, -1.0], np.float32),
}


def npz_bytes(arrays, compressed=False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def zip_with(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def assert_same(got, want):
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == want[key].dtype


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_round_trip(compressed):
    assert_same(read_weights(npz_bytes(ARRAYS, compressed), "w.npz"), ARRAYS)


def test_fortran_order_npy_keeps_its_values():
    f = np.asfortranarray(ARRAYS["conv1.w"])
    got = read_weights(zip_with({"a.npy": npy_bytes(f)}), "w.npz")["a"]
    np.testing.assert_array_equal(got, ARRAYS["conv1.w"])


def test_safetensors_round_trip_and_sniffing(tmp_path):
    data = to_safetensors(ARRAYS)
    assert_same(read_weights(data, "w.safetensors"), ARRAYS)
    assert_same(read_weights(data, "upload.bin"), ARRAYS)  # format sniffed from the bytes
    assert_same(read_weights(npz_bytes(ARRAYS), "upload"), ARRAYS)
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    assert_same(load_weights(path), ARRAYS)


def test_pickled_object_arrays_are_refused():
    obj = np.array([{"a": 1}], dtype=object)
    buf = io.BytesIO()
    np.save(buf, obj, allow_pickle=True)
    with pytest.raises(WeightsError, match="not a number type"):
        read_weights(zip_with({"evil.npy": buf.getvalue()}), "w.npz")


def test_zip_bomb_refused_by_ratio_before_inflating():
    zeros = np.zeros(6 << 20, np.float32)  # 24 MiB that deflate about 1000:1
    data = npz_bytes({"z": zeros}, compressed=True)
    assert len(data) < 1 << 20
    with pytest.raises(WeightsError, match="compresses"):
        read_weights(data, "w.npz")


def test_declared_total_over_the_cap_is_refused():
    with pytest.raises(WeightsError, match="inflate to more than the 100-byte limit"):
        read_weights(npz_bytes(ARRAYS), "w.npz", max_bytes=100)


def test_npy_header_claiming_more_than_its_data_is_refused():
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
    )
    buf.write(b"\0" * 8)
    with pytest.raises(WeightsError, match="does not match its data"):
        read_weights(zip_with({"big.npy": buf.getvalue()}), "w.npz")


@pytest.mark.parametrize(
    ("members", "fragment"),
    [
        ({"notes.txt": b"hello"}, "not a .npy array"),
        ({"a.npy": b"\x93NUMPY garbage"}, "not a valid .npy"),
        ({"a.npy": npy_bytes(np.array(["text"]))}, "not a number type"),
    ],
)
def test_bad_members(members, fragment):
    with pytest.raises(WeightsError, match=fragment):
        read_weights(zip_with(members), "w.npz")


def test_corrupt_and_truncated_files():
    good = npz_bytes(ARRAYS)
    with pytest.raises(WeightsError):
        read_weights(good[: len(good) // 2], "w.npz")
    flipped = bytearray(zip_with({"a.npy": npy_bytes(np.ones(64, np.float32))}, zipfile.ZIP_STORED))
    flipped[100] ^= 0xFF  # inside the stored data: the CRC no longer matches
    with pytest.raises(WeightsError, match="corrupt"):
        read_weights(bytes(flipped), "w.npz")
    with pytest.raises(WeightsError, match="not a readable"):
        read_weights(b"PK\x03\x04 not really a zip", "w.npz")


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 1 << 60) + b"{}", "header claims"),
        (struct.pack("<Q", 4) + b"nope", "not a JSON object"),
        (
            _safetensors({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            "dtype 'BF16'",
        ),
        (
            _safetensors(
                {"a": {"dtype": "F32", "shape": [2000], "data_offsets": [0, 8000]}}, b"\0" * 8
            ),
            "not a valid .safetensors",
        ),
        (
            _safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 8),
            "not a valid .safetensors",
        ),
    ],
)
def test_bad_safetensors(data, fragment):
    with pytest.raises(WeightsError, match=fragment):
        read_weights(data, "w.safetensors")


def test_missing_file_and_non_bytes(tmp_path):
    with pytest.raises(WeightsError, match="cannot read weights"):
        load_weights(tmp_path / "nope.npz")
    with pytest.raises(WeightsError, match="must be bytes"):
        read_weights("a string", "w.npz")


def test_to_ohwi_moves_input_channels_last():
    oihw = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)  # K=2, C=3, FH=4, FW=5
    ohwi = to_ohwi(oihw, "conv")
    assert ohwi.shape == (2, 4, 5, 3)
    assert ohwi[1, 2, 3, 0] == oihw[1, 0, 2, 3]
    local = np.zeros((6, 7, 2, 3, 4, 5))
    assert to_ohwi(local, "local").shape == (6, 7, 2, 4, 5, 3)


def test_an_npz_whose_directory_points_before_the_file_is_a_weights_error():
    buf = io.BytesIO()
    np.savez(buf, w=np.zeros(3, np.float32))
    data = bytearray(buf.getvalue())
    end = data.rfind(b"PK\x05\x06")  # end of central directory: its offset is at +16
    offset = int.from_bytes(data[end + 16 : end + 20], "little")
    data[end + 16 : end + 20] = (offset + (1 << 24)).to_bytes(4, "little")
    with pytest.raises(WeightsError, match="npz member 'w.npy' is corrupt"):
        read_weights(bytes(data), "weights.npz")
