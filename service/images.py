"""Decode uploaded images (PNG, JPEG, .npy uint8/float32) safely into one (N, H, W, C) batch.

The format comes from the bytes' magic number; a file name that claims another format is
refused rather than guessed at. Pixel counts are checked from
the header before anything is decoded (decompression bombs); .npy headers are checked against the
bytes that follow and loaded with allow_pickle=False.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable

import numpy as np
from PIL import Image

from engine.npy import read_header

from .errors import ApiError, BadRequest, TooLarge, UnsupportedMediaType

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
_NPY = b"\x93NUMPY"
_NPY_DTYPES = (np.dtype(np.uint8), np.dtype("<f4"))


def sniff(data: bytes) -> str | None:
    """Return "png", "jpeg", "npy" or None from the leading bytes."""
    for kind, magic in (("png", _PNG), ("jpeg", _JPEG), ("npy", _NPY)):
        if data.startswith(magic):
            return kind
    return None


def _check_pixels(h: int, w: int, max_pixels: int, name: str) -> None:
    if h * w > max_pixels:
        raise TooLarge(
            f"{name}: {w}x{h} is {h * w} pixels; the limit is {max_pixels} per image",
            field="images",
        )


_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # Pillow's mode for a picture of that many channels


def _decode_picture(data: bytes, name: str, channels: int, max_pixels: int) -> np.ndarray:
    """Decode PNG/JPEG bytes to (H, W, channels) uint8; channels 1 is grey, 3 RGB."""
    try:
        # Pillow warns past its own cap and raises past twice it. Our cap (checked next, from
        # the header alone) decides; silencing the warning makes production (where it is only
        # logged) and the tests (where warnings are errors) take the same path.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
        with im:
            w, h = im.size
            _check_pixels(h, w, max_pixels, name)
            im.load()
            mode = _MODES.get(channels)
            if mode is None:
                raise BadRequest(
                    f"{name}: the model takes {channels} channels; send .npy "
                    "arrays, pictures carry 1, 3 or 4",
                    field="images",
                )
            array = np.asarray(im.convert(mode), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise TooLarge(f"{name}: {e}", field="images") from None
    except ApiError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow fails on crafted files in many ways
        raise BadRequest(
            f"{name}: not a readable PNG/JPEG image ({type(e).__name__}: {e})", field="images"
        ) from None
    return array.reshape(array.shape[0], array.shape[1], -1)


def _check_npy(shape: tuple, dtype: np.dtype, name: str, max_pixels: int) -> None:
    if dtype.hasobject or dtype.newbyteorder("<") not in _NPY_DTYPES:
        raise BadRequest(
            f"{name}: .npy dtype {dtype} is not accepted; use uint8 or float32", field="images"
        )
    if len(shape) not in (2, 3) or any(d < 1 for d in shape):
        raise BadRequest(f"{name}: .npy shape {shape} is not (H, W) or (H, W, C)", field="images")
    _check_pixels(shape[0], shape[1], max_pixels, name)


def _decode_npy(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Decode .npy bytes holding (H, W) or (H, W, C) uint8 or float32 to (H, W, C)."""
    (h, w, _), dtype = _probe_npy(data, name, max_pixels)
    array = np.load(io.BytesIO(data), allow_pickle=False)
    array = np.ascontiguousarray(array, dtype=dtype)
    return array.reshape(h, w, -1)


_SUFFIXES = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".npy": "npy"}


def decode_image(data: bytes, name: str, *, channels: int, max_pixels: int) -> np.ndarray:
    """Decode one uploaded file into (H, W, C) uint8 or float32."""
    kind = sniff(data)
    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    claimed = _SUFFIXES.get(suffix)
    if kind is not None and claimed is not None and claimed != kind:
        # A mislabelled file is more likely a mistake than a wish; say what it really is.
        raise UnsupportedMediaType(
            f"{name}: the name says {claimed.upper()} but the bytes are "
            f"{kind.upper()}; rename it or re-export it",
            field="images",
        )
    if kind == "npy":
        return _decode_npy(data, name, max_pixels)
    if kind in ("png", "jpeg"):
        return _decode_picture(data, name, channels, max_pixels)
    raise _unsupported(name)


def _unsupported(name: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(f"{name}: not a PNG, JPEG or .npy file", field="images")


def _probe_picture(data: bytes, name: str, channels: int, max_pixels: int) -> tuple:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=["PNG", "JPEG"]) as im:
                w, h = im.size
    except Image.DecompressionBombError as e:  # past twice Pillow's own cap, from the header
        raise TooLarge(f"{name}: {e}", field="images") from None
    except Exception as e:  # noqa: BLE001 - Pillow fails on crafted headers in many ways
        raise BadRequest(
            f"{name}: not a readable PNG/JPEG image ({type(e).__name__}: {e})", field="images"
        ) from None
    _check_pixels(h, w, max_pixels, name)
    return (h, w, channels), np.dtype(np.uint8)


def _probe_npy(data: bytes, name: str, max_pixels: int) -> tuple:
    stream = io.BytesIO(data)
    try:
        shape, _, dtype = read_header(stream)
    except Exception as e:  # noqa: BLE001 - numpy's header parser has many failure types
        raise BadRequest(f"{name}: not a valid .npy file ({e})", field="images") from None
    _check_npy(shape, dtype, name, max_pixels)
    need = math.prod(shape) * dtype.itemsize  # Python ints: (2, 2, 2**62) does not wrap to 0
    have = len(data) - stream.tell()
    if have != need:
        raise BadRequest(
            f"{name}: .npy header says {shape} {dtype} ({need} bytes) but {have} bytes follow",
            field="images",
        )
    return (shape[0], shape[1], shape[2] if len(shape) == 3 else 1), dtype.newbyteorder("=")


def probe_image(data: bytes, name: str, *, channels: int, max_pixels: int) -> tuple:
    """Return ((H, W, C), dtype) one file would decode to, from its header alone."""
    kind = sniff(data)
    if kind == "npy":
        return _probe_npy(data, name, max_pixels)
    if kind in ("png", "jpeg"):
        return _probe_picture(data, name, channels, max_pixels)
    raise _unsupported(name)


Check = Callable[[int, int, int, int], None]
"""Called with (N, H, W, C) of a batch before any of its images is decoded; raises to refuse."""


def stack_images(
    files: list[tuple[str, bytes]],
    *,
    channels: int,
    max_pixels: int,
    max_images: int,
    check: Check | None = None,
) -> np.ndarray:
    """Decode every file and stack them into (N, H, W, C); all must share size and dtype.

    Every header is read first: sizes that differ, or a batch check refuses (the model's input
    size, the output and working-memory limits), cost no decoding at all.
    """
    if not files:
        raise BadRequest("send at least one file in the images field", field="images")
    if len(files) > max_images:
        raise TooLarge(f"{len(files)} images in one job; the limit is {max_images}", field="images")
    probed = [probe_image(d, name, channels=channels, max_pixels=max_pixels) for name, d in files]
    first_name, first = files[0][0], probed[0]
    for (name, _), (shape, dtype) in zip(files, probed, strict=True):
        if shape != first[0] or dtype != first[1]:
            raise BadRequest(
                f"images of one job must share size and dtype: {first_name} is "
                f"{first[0]} {first[1]}, {name} is {shape} {dtype}",
                field="images",
            )
    if check is not None:
        check(len(files), *first[0])
    out = None
    for i, (name, data) in enumerate(files):
        array = decode_image(data, name, channels=channels, max_pixels=max_pixels)
        if out is None:
            out = np.empty((len(files), *array.shape), array.dtype)
        if array.shape != out.shape[1:] or array.dtype != out.dtype:  # a header that lied
            raise BadRequest(
                f"images of one job must share size and dtype: {first_name} is "
                f"{out.shape[1:]} {out.dtype}, {name} is {array.shape} {array.dtype}",
                field="images",
            )
        out[i] = array
    assert out is not None
    return out
