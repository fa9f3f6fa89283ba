"""Uploaded image decoding: PNG, JPEG, .npy; bombs, lies, garbage and pickles are refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from service.errors import BadRequest, TooLarge, UnsupportedMediaType
from service.images import decode_image, stack_images


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def lying_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 12000))
        + chunk(b"IEND", b"")
    )


RGB = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)


def test_png_round_trips_exactly():
    got = decode_image(png(RGB), "a.png", channels=3, max_pixels=100)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, RGB)


def test_png_converts_to_grey_for_one_channel_models():
    got = decode_image(png(RGB), "a.png", channels=1, max_pixels=100)
    assert got.shape == (6, 5, 1)
    expect = np.asarray(Image.fromarray(RGB).convert("L"))
    np.testing.assert_array_equal(got[..., 0], expect)


def test_jpeg_decodes_to_its_size():
    buf = io.BytesIO()
    Image.fromarray(RGB).save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), "a.jpg", channels=3, max_pixels=100).shape == (6, 5, 3)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_npy_keeps_dtype_and_adds_channel_axis(dtype):
    a = np.arange(20).reshape(4, 5).astype(dtype)
    got = decode_image(npy(a), "a.npy", channels=1, max_pixels=100)
    assert got.dtype == dtype and got.shape == (4, 5, 1)
    np.testing.assert_array_equal(got[..., 0], a)


def test_big_endian_float_npy_is_read_by_value():
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    got = decode_image(npy(a), "a.npy", channels=1, max_pixels=100)
    np.testing.assert_array_equal(got[..., 0], a.astype(np.float32))


def test_a_12kb_png_claiming_10000x10000_is_413_before_decoding():
    data = lying_png(10000, 10000)
    assert len(data) < 13000
    with pytest.raises(TooLarge):
        decode_image(data, "bomb.png", channels=3, max_pixels=4096 * 4096)


def test_pixels_over_our_cap_are_413():
    with pytest.raises(TooLarge, match="30 pixels"):
        decode_image(png(RGB), "a.png", channels=3, max_pixels=29)
    with pytest.raises(TooLarge):
        decode_image(npy(np.zeros((10, 10), np.uint8)), "a.npy", channels=1, max_pixels=99)


@pytest.mark.parametrize(
    "data,error",
    [
        (b"", UnsupportedMediaType),
        (b"GIF89a....", UnsupportedMediaType),
        (b"hello world", UnsupportedMediaType),
        (png(RGB)[:60], BadRequest),  # truncated PNG
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, BadRequest),  # PNG magic, garbage after
        (b"\xff\xd8\xff" + b"\0" * 40, BadRequest),  # JPEG magic, garbage after
        (npy(np.zeros((3, 3), np.uint8))[:-1], BadRequest),  # header says 9 bytes, 8 follow
        (npy(np.zeros((3, 3), np.uint8)) + b"\0", BadRequest),
        (npy(np.zeros((3, 3), np.int64)), BadRequest),
        (npy(np.zeros((3,), np.uint8)), BadRequest),
        (npy(np.zeros((1, 2, 2, 3), np.uint8)), BadRequest),
        (b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz'}  ", BadRequest),
    ],
)
def test_bad_files_are_4xx(data, error):
    with pytest.raises(error):
        decode_image(data, "f", channels=3, max_pixels=10000)


def test_a_pickle_npy_is_refused_without_running_its_payload(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    buf = io.BytesIO()
    np.save(buf, np.array([Evil(), Evil()], dtype=object).reshape(1, 2), allow_pickle=True)
    with pytest.raises(BadRequest, match="dtype object"):
        decode_image(buf.getvalue(), "evil.npy", channels=1, max_pixels=100)
    assert not marker.exists()


def test_stack_needs_one_size_and_dtype_and_a_count_cap():
    a, b = npy(np.zeros((4, 4, 3), np.uint8)), npy(np.zeros((4, 5, 3), np.uint8))
    assert stack_images([("a", a), ("b", a)], channels=3, max_pixels=100, max_images=2).shape == (
        2,
        4,
        4,
        3,
    )
    with pytest.raises(BadRequest, match="share size"):
        stack_images([("a", a), ("b", b)], channels=3, max_pixels=100, max_images=4)
    with pytest.raises(BadRequest, match="share size"):
        stack_images(
            [("a", a), ("c", npy(np.zeros((4, 4, 3), np.float32)))],
            channels=3,
            max_pixels=100,
            max_images=4,
        )
    with pytest.raises(TooLarge):
        stack_images([("a", a)] * 3, channels=3, max_pixels=100, max_images=2)
    with pytest.raises(BadRequest):
        stack_images([], channels=3, max_pixels=100, max_images=2)


@pytest.mark.parametrize("name", ["a.npy", "a.JPG", "photo.jpeg"])
def test_mislabelled_files_are_415(name):
    with pytest.raises(UnsupportedMediaType, match="name says"):
        decode_image(png(RGB), name, channels=3, max_pixels=100)


@pytest.mark.parametrize("name", ["a.png", "A.PNG", "blob", "image.bin", "x"])
def test_names_without_a_conflicting_suffix_decode(name):
    assert decode_image(png(RGB), name, channels=3, max_pixels=100).shape == (6, 5, 3)
