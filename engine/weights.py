"""Read and write weight files safely: .npz (no pickles, no zip bombs) and .safetensors.

Everything read here comes from a client, so sizes are checked before anything is inflated or
allocated, and every failure is a WeightsError.
"""

from __future__ import annotations

import io
import json
import math
import os
import zipfile
import zlib

import numpy as np
import safetensors
import safetensors.numpy

from .errors import WeightsError
from .files import read_capped
from .npy import read_header

MAX_WEIGHT_BYTES = 1 << 30
"""Default cap on the uncompressed bytes of all arrays in one file (bytes)."""
MAX_ARRAYS = 1024
"""Most arrays one file may hold (a spec has at most 256 layers, two arrays each)."""
MAX_RATIO = 100
"""Largest compression ratio accepted for an npz member bigger than RATIO_FLOOR."""
RATIO_FLOOR = 4 << 20
"""Bytes an npz (and each member) may inflate to whatever its compression ratio (zeros in tests)."""
MAX_HEADER = 16 << 20
"""Largest safetensors JSON header accepted (bytes)."""
_SAFE_DTYPES = {"F16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL"}
_FORMATS = (".npz", ".safetensors")


def load_weights(path, *, max_bytes: int = MAX_WEIGHT_BYTES) -> dict[str, np.ndarray]:
    """Read a .npz or .safetensors file into {name: array}."""
    # the file may exceed the arrays' byte budget by its container's headers
    data = read_capped(path, max_bytes + (1 << 20), "weights", WeightsError)
    return read_weights(data, os.fspath(path), max_bytes=max_bytes)


def read_weights(
    data: bytes, filename: str = "weights.npz", *, max_bytes: int = MAX_WEIGHT_BYTES
) -> dict[str, np.ndarray]:
    """Read weight file bytes into {name: array}; the format comes from filename or the bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WeightsError(f"weights must be bytes, got {type(data).__name__}", field="weights")
    data = bytes(data)
    suffix = os.path.splitext(filename or "")[1].lower()
    if suffix not in _FORMATS:
        suffix = ".npz" if data[:4] == b"PK\x03\x04" else ".safetensors"
    if suffix == ".npz":
        return _read_npz(data, max_bytes)
    return _read_safetensors(data, max_bytes)


def _read_npz(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as err:
        raise WeightsError(
            f"weights are not a readable .npz (zip) file: {err}", field="weights"
        ) from None
    if len(infos) > MAX_ARRAYS:
        raise WeightsError(
            f"weights hold {len(infos)} members, more than {MAX_ARRAYS}", field="weights"
        )
    total = 0
    for info in infos:
        # Check what every member declares before inflating any of them (zip bombs).
        if info.is_dir() or not info.filename.endswith(".npy"):
            raise WeightsError(f"npz member {info.filename!r} is not a .npy array", field="weights")
        total += info.file_size
        if total > max_bytes:
            raise WeightsError(
                f"npz arrays inflate to more than the {max_bytes}-byte limit", field="weights"
            )
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(info.compress_size, 1):
            raise WeightsError(
                f"npz member {info.filename!r} compresses "
                f"{info.file_size / max(info.compress_size, 1):.0f}:1, "
                f"over the {MAX_RATIO}:1 limit",
                field="weights",
            )
    # Per member is not enough: many members just under the floor (or entries sharing one
    # deflate stream) still inflate ~1000:1. The file's own length cannot be faked.
    if total > RATIO_FLOOR and total > MAX_RATIO * len(data):
        raise WeightsError(
            f"npz arrays inflate to {total} bytes from a {len(data)}-byte file, "
            f"over the {MAX_RATIO}:1 limit",
            field="weights",
        )
    arrays = {}
    for info in infos:
        try:
            with zf.open(info) as f:
                raw = f.read(
                    info.file_size + 1
                )  # never more than declared, whatever the stream says
        except (
            zipfile.BadZipFile,
            zlib.error,
            OSError,
            EOFError,
            NotImplementedError,
            RuntimeError,
            ValueError,  # a directory whose offsets point before the file: a negative seek
        ) as err:
            raise WeightsError(
                f"npz member {info.filename!r} is corrupt: {err}", field="weights"
            ) from None
        if len(raw) != info.file_size:
            raise WeightsError(
                f"npz member {info.filename!r} is not the size it declares", field="weights"
            )
        name = info.filename[: -len(".npy")]
        if name in arrays:
            raise WeightsError(f"npz holds {name!r} twice", field="weights")
        arrays[name] = _read_npy(raw, info.filename)
    return arrays


def _read_npy(raw: bytes, member: str) -> np.ndarray:
    """Parse one .npy without pickles, checking the header's shape against the bytes first."""
    f = io.BytesIO(raw)
    try:
        shape, fortran, dtype = read_header(f)
    except (ValueError, SyntaxError, TypeError, EOFError) as err:
        raise WeightsError(
            f"npz member {member!r} is not a valid .npy: {err}", field="weights"
        ) from None
    if dtype.hasobject or dtype.kind not in "fiub" or dtype.fields is not None:
        raise WeightsError(
            f"npz member {member!r} has dtype {dtype}, not a number type", field="weights"
        )
    # Python ints: a header shape like (2**32, 2**32) must not wrap around to a small count.
    count = math.prod(shape)
    if any(d < 0 for d in shape) or count * dtype.itemsize != len(raw) - f.tell():
        raise WeightsError(
            f"npz member {member!r}: header shape {shape} does not match its data", field="weights"
        )
    flat = np.frombuffer(raw, dtype=dtype, count=count, offset=f.tell())
    return flat.reshape(shape, order="F" if fortran else "C")


def _read_safetensors(data: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    if len(data) > max_bytes + MAX_HEADER + 8:
        raise WeightsError(f"weights are over the {max_bytes}-byte limit", field="weights")
    if len(data) < 8:
        raise WeightsError("weights are too short to be .safetensors or .npz", field="weights")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER or n > len(data) - 8:
        raise WeightsError(
            f"safetensors header claims {n} bytes; the file has {len(data) - 8}", field="weights"
        )
    try:
        header = json.loads(data[8 : 8 + n])
        dtypes = {k: v.get("dtype") for k, v in header.items() if k != "__metadata__"}
    except (ValueError, AttributeError, TypeError) as err:
        raise WeightsError(
            f"safetensors header is not a JSON object of tensors: {err}", field="weights"
        ) from None
    if len(dtypes) > MAX_ARRAYS:
        raise WeightsError(
            f"weights hold {len(dtypes)} tensors, more than {MAX_ARRAYS}", field="weights"
        )
    for key, dtype in dtypes.items():
        if dtype not in _SAFE_DTYPES:
            raise WeightsError(
                f"safetensors tensor {key!r} has dtype {dtype!r}; use F32 (or F16/F64)",
                field="weights",
            )
    try:
        return safetensors.numpy.load(data)
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError, OverflowError) as err:
        raise WeightsError(
            f"weights are not a valid .safetensors file: {err}", field="weights"
        ) from None


def to_safetensors(arrays: dict[str, np.ndarray]) -> bytes:
    """Return {name: array} as safetensors bytes (C-contiguous copies where needed)."""
    return safetensors.numpy.save({k: np.ascontiguousarray(v) for k, v in arrays.items()})


def to_ohwi(array: np.ndarray, kind: str) -> np.ndarray:
    """Move a PyTorch-layout weight to ours: conv (K,C,FH,FW) -> (K,FH,FW,C); local likewise on its
    last three axes ((Hout,Wout,K,C,FH,FW) -> (Hout,Wout,K,FH,FW,C))."""
    if array.ndim < 3:
        return array
    return np.moveaxis(array, -3, -1)
