"""Lean results: per output, keep only the channels, crop, precision or summary a client asked for.

A job's lean options map an output (a layer name) to {channels, crop, dtype, stats, png}:
- channels: a list of channel indices, or a range "start:stop" (stop excluded; "a:" = to the end);
- crop: [top, left, height, width] of the map (after channels);
- dtype: "float32" (default), "float16", or "uint8" with, per image n and channel c, scale and
  offset arrays stored beside it as "<output>:scale" and "<output>:offset" (both float32 (N, K)):
      x[n, y, x, c] ~= scale[n, c] * q[n, y, x, c] + offset[n, c]   (error <= scale[n, c] / 2)
  offset is the map's minimum and scale (max - min) / 255 (0 for a constant map: q is 0);
- stats: true: a float32 (N, K, 5) array of each image's per-channel min, max, mean, std and
  fraction of zeros (STATS), in place of the maps;
- png: true: one PNG grid of the maps per image (N PNG byte strings; an object array), in place of
  the maps.
stats and png exclude each other and any dtype but float32. The service checks the options
against the model at submit (check); the worker applies them right before storing (lean_results).
Everything here is pure, numpy in, numpy out; the float16, stats and uint8 arithmetic is the
engine's (engine.lean_ops, Numba kernels beside their numpy references).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from engine import get_threads, lean_ops

from .pictures import grid_png

KEYS = ("channels", "crop", "dtype", "stats", "png")
DTYPES = ("float32", "float16", "uint8")
STATS = lean_ops.STATS
ALL = "*"
"""The key of a lean mapping whose options apply to every requested output."""


class LeanError(ValueError):
    """Lean options that cannot apply to an output; names the output and the field."""

    def __init__(self, output: str, field: str, message: str):
        super().__init__(f"output {output!r}: {field}: {message}")
        self.output = output
        self.field = field


def extras(name: str, options: dict) -> list[str]:
    """Return the names of the arrays stored beside output name (uint8: its scale and offset)."""
    return [f"{name}:scale", f"{name}:offset"] if options.get("dtype") == "uint8" else []


def _channels(name: str, value, k: int) -> list[int] | str:
    if isinstance(value, str):
        start, sep, stop = value.partition(":")
        parts = [start.strip() or "0", stop.strip() or str(k)]
        if not sep or not all(p.isascii() and p.isdigit() and len(p) < 10 for p in parts):
            raise LeanError(name, "channels", f'a range is "start:stop", not {value[:40]!r}')
        a, b = (int(p) for p in parts)
        if not 0 <= a < b <= k:
            raise LeanError(
                name, "channels", f"range {a}:{b} is not within {name}'s {k} channels (0:{k})"
            )
        return f"{a}:{b}"
    if not isinstance(value, list) or not value:
        raise LeanError(name, "channels", 'give a non-empty list of channels or a range "a:b"')
    for c in value:
        if type(c) is not int:
            raise LeanError(name, "channels", f"{str(c)[:20]!r} is not a channel index")
        if not 0 <= c < k:
            raise LeanError(
                name, "channels", f"channel {c} is unknown: {name} has {k} (0..{k - 1})"
            )
    if len(set(value)) != len(value):
        raise LeanError(name, "channels", "a channel is listed twice")
    return list(value)


def _crop(name: str, value, h: int, w: int) -> list[int]:
    if (
        not isinstance(value, list)
        or len(value) != 4
        or not all(type(v) is int and 0 <= v < 1 << 31 for v in value)
    ):
        raise LeanError(name, "crop", "give [top, left, height, width] as non-negative integers")
    top, left, height, width = value
    if height < 1 or width < 1 or top + height > h or left + width > w:
        raise LeanError(
            name,
            "crop",
            f"[{top}, {left}, {height}, {width}] is outside the {h}x{w} map (rows "
            f"{top}..{top + height - 1}, columns {left}..{left + width - 1})",
        )
    return list(value)


def check(name: str, raw, shape: tuple[int, int, int]) -> dict:
    """Return output name's options checked against its (H, W, K) map, defaults dropped.

    LeanError names the output and the field at fault.
    """
    if not isinstance(raw, dict):
        raise LeanError(name, "parameters", "lean options must be an object")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise LeanError(name, unknown[0], f"unknown option; lean options are {', '.join(KEYS)}")
    h, w, k = shape
    out: dict = {}
    if raw.get("channels") is not None:
        out["channels"] = _channels(name, raw["channels"], k)
    if raw.get("crop") is not None:
        out["crop"] = _crop(name, raw["crop"], h, w)
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise LeanError(name, "dtype", f"{str(dtype)[:20]!r} is not one of {', '.join(DTYPES)}")
    if dtype != "float32":
        out["dtype"] = dtype
    for flag in ("stats", "png"):
        if not isinstance(raw.get(flag, False), bool):
            raise LeanError(name, flag, "must be true or false")
        if raw.get(flag):
            out[flag] = True
    if out.get("stats") and out.get("png"):
        raise LeanError(name, "png", "stats and png exclude each other")
    if (out.get("stats") or out.get("png")) and "dtype" in out:
        what = "stats" if out.get("stats") else "png"
        raise LeanError(name, "dtype", f"{what} replaces the maps; dtype applies to maps only")
    return out


def check_all(
    requested: dict, outputs: list[str], shapes: dict[str, tuple[int, int, int]]
) -> dict[str, dict]:
    """Return {output: checked options} for the outputs that have any.

    requested maps an output name, or ALL for every layer output, to its options (an output's
    own options replace ALL's); shapes gives each layer's (H, W, K). LeanError names what is wrong.
    """
    if not isinstance(requested, dict):
        raise LeanError(ALL, "lean", "lean options must be an object {output: {options}}")
    for name in requested:
        if name != ALL and name not in outputs:
            raise LeanError(name, "outputs", f"not a requested output ({', '.join(outputs)})")
    common = requested.get(ALL) or {}
    if not isinstance(common, dict):
        raise LeanError(ALL, "parameters", "lean options must be an object")
    checked: dict[str, dict] = {}
    for name in outputs:
        own = requested.get(name)
        if own is None and (not common or name not in shapes):
            continue  # "*" applies to layer outputs, not an explanation's arrays
        if name not in shapes:
            raise LeanError(name, "outputs", "lean options apply to layer outputs only")
        if not isinstance(own, dict | None):
            raise LeanError(name, "parameters", "lean options must be an object")
        opts = check(name, common if own is None else own, shapes[name])
        if opts:
            checked[name] = opts
    for name, opts in checked.items():
        taken = [extra for extra in extras(name, opts) if extra in outputs]
        if taken:
            raise LeanError(name, "dtype", f"uint8 stores {taken[0]!r}, a requested output too")
    return checked


def parameters(name: str, options: dict) -> dict:
    """Return the V2 response parameters (scalars) that tell a client how to read output name."""
    if options.get("stats"):
        return {"stats": ",".join(STATS)}
    if options.get("png"):
        return {"content_type": "image/png"}
    if options.get("dtype") == "uint8":
        scale, offset = extras(name, options)
        return {"scale": scale, "offset": offset}
    return {}


def lean_shape(shape: tuple[int, int, int], options: dict) -> tuple[int, int, int]:
    """Return the (H, W, K) of the maps options keep out of shape."""
    h, w, k = shape
    channels = options.get("channels")
    if isinstance(channels, str):
        a, b = (int(p) for p in channels.split(":"))
        k = b - a
    elif channels is not None:
        k = len(channels)
    if "crop" in options:
        h, w = options["crop"][2], options["crop"][3]
    return h, w, k


def png_bound(h: int, w: int, k: int) -> int:
    """Return an upper bound of one image's PNG grid bytes (zlib's worst case on raw rows)."""
    cols = int(np.ceil(np.sqrt(k)))
    rows = -(-k // cols)
    height, width = rows * (h + 1) - 1, cols * (w + 1) - 1
    raw = height * (width + 1)  # a filter byte per row
    return raw + raw // 1000 + 5 * (raw // 16000 + 1) + 1024  # deflate blocks, chunks, header


def stored_bytes(n: int, shape: tuple[int, int, int], options: dict) -> int:
    """Return the bytes stored for n images' output of (H, W, K) maps under options."""
    h, w, k = lean_shape(shape, options)
    if options.get("stats"):
        return n * k * len(STATS) * 4
    if options.get("png"):
        return n * (4 + png_bound(h, w, k))
    itemsize = {"float32": 4, "float16": 2, "uint8": 1}[options.get("dtype", "float32")]
    return n * h * w * k * itemsize + (2 * n * k * 4 if options.get("dtype") == "uint8" else 0)


def _select(maps: np.ndarray, options: dict) -> np.ndarray:
    channels = options.get("channels")
    if isinstance(channels, str):
        a, b = (int(p) for p in channels.split(":"))
        maps = maps[..., a:b]
    elif channels is not None:
        maps = maps[..., np.asarray(channels, dtype=np.intp)]
    if "crop" in options:
        top, left, height, width = options["crop"]
        maps = maps[:, top : top + height, left : left + width, :]
    return maps


def stats(maps: np.ndarray) -> np.ndarray:
    """Return (N, K, 5) float32 per-channel min, max, mean, std, zero fraction of (N, H, W, K)."""
    return lean_ops.channel_stats(maps)


def quantize(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (q uint8, scale, offset float32 (N, K)) with maps ~= scale * q + offset per channel.

    Non-finite values are first clipped to float32's range (NaN to 0).
    """
    if not np.isfinite(maps).all():
        big = float(np.finfo(np.float32).max)
        maps = np.nan_to_num(maps, nan=0.0, posinf=big, neginf=-big)
    return lean_ops.quantize_uint8(maps)


def pictures(maps: np.ndarray) -> np.ndarray:
    """Return an object array of each image's PNG grid of (N, H, W, K) maps.

    The images are drawn on the engine's threads (zlib lets go of the GIL while it packs).
    """
    out = np.empty(maps.shape[0], dtype=object)
    draw = lambda i: grid_png(np.ascontiguousarray(maps[i], dtype=np.float32))  # noqa: E731
    threads = min(get_threads(), maps.shape[0])
    if threads > 1:
        with ThreadPoolExecutor(threads) as pool:
            out[:] = list(pool.map(draw, range(maps.shape[0])))
    else:
        out[:] = [draw(i) for i in range(maps.shape[0])]
    return out


def lean_results(results: dict[str, np.ndarray], options: dict[str, dict]) -> dict[str, np.ndarray]:
    """Return what a job stores: results with each output's checked options (check) applied.

    results maps output names to float32 (N, H, W, K) arrays; an output without options is kept
    as it is. uint8 outputs bring their "<name>:scale" and "<name>:offset" arrays after them.
    """
    out: dict[str, np.ndarray] = {}
    for name, array in results.items():
        opts = options.get(name) or {}
        if not opts:
            out[name] = array
            continue
        maps = _select(array, opts)
        if opts.get("stats"):
            out[name] = stats(maps)
        elif opts.get("png"):
            out[name] = pictures(maps)
        elif opts.get("dtype") == "float16":
            out[name] = lean_ops.to_float16(maps)
        elif opts.get("dtype") == "uint8":
            scale_name, offset_name = extras(name, opts)
            out[name], out[scale_name], out[offset_name] = quantize(maps)
        else:
            out[name] = np.ascontiguousarray(maps)
    return out
