"""Parse and check a model spec (DESIGN.md "The model format") into normalised layer objects.

Pure Python: no arrays are needed, so `convq summary spec.json` and the API can size a model
without its weights. Every error is a ModelError (or ShapeError) naming the layer and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from . import sizing
from .errors import ModelError
from .files import read_capped
from .geometry import FITS, Window

LAYER_TYPES = ("conv", "relu", "maxpool", "avgpool", "local")
WINDOWED = ("conv", "local", "maxpool", "avgpool")
WEIGHTED = ("conv", "local")
LAYOUTS = ("OHWI", "OIHW")
_WINDOW_KEYS = {"size", "stride", "pad", "dilation"}
LAYER_KEYS = {
    "conv": {"name", "type", "filters", "weights", "bias"} | _WINDOW_KEYS,
    "local": {"name", "type", "filters", "weights", "bias"} | _WINDOW_KEYS,
    "maxpool": {"name", "type"} | _WINDOW_KEYS,
    "avgpool": {"name", "type", "size", "stride", "pad", "count_pad"},
    "relu": {"name", "type"},
}
MODEL_KEYS = {"name", "input", "preprocess", "fit", "layout", "layers"}
MAX_LAYERS = 256
MAX_DIM = 1 << 16  # caps every size, stride, pad, filter count and input side: keeps sizes sane
# The spec field behind each Window attribute, by its first letter (fh, sw, dh, top, left, ...).
_SPEC_FIELD = dict(f="size", s="stride", d="dilation", t="pad", l="pad", b="pad", r="pad")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}")


def _fail(message: str, layer: str | None = None, field: str | None = None) -> ModelError:
    return ModelError(message, layer=layer, field=field)


def check_name(value, *, what: str, layer: str | None = None, field: str = "name") -> str:
    """Return value if it is a usable name: 1-128 of letters, digits, _ . : - ."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise _fail(
            f"{what} must be 1-128 characters of letters, digits, '_', '.', ':' or '-' "
            f"(not starting with punctuation), got {value!r}",
            layer,
            field,
        )
    return value


def _int(value, *, layer, field, minimum=1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{layer}: {field} must be an integer, got {value!r}", layer, field)
    if not minimum <= value <= MAX_DIM:
        raise _fail(
            f"{layer}: {field} must be between {minimum} and {MAX_DIM}, got {value}", layer, field
        )
    return value


@dataclass(frozen=True)
class Layer:
    """One normalised layer; `window` is None for relu, `filters` None for pools and relu."""

    name: str
    type: str
    window: Window | None = None
    filters: int | None = None
    weights: str | None = None
    bias: str | None = None
    count_pad: bool = False

    def to_dict(self) -> dict:
        """Return the layer in its normalised JSON form (every default spelled out)."""
        out: dict = {"name": self.name, "type": self.type}
        if self.filters is not None:
            out["filters"] = self.filters
        if self.window is not None:
            w = self.window
            out["size"] = [w.fh, w.fw]
            out["stride"] = [w.sh, w.sw]
            out["pad"] = list(w.pad)
            if self.type != "avgpool":
                out["dilation"] = [w.dh, w.dw]
        if self.type in WEIGHTED:
            out["weights"] = self.weights
            out["bias"] = self.bias
        if self.type == "avgpool":
            out["count_pad"] = self.count_pad
        return out


@dataclass(frozen=True)
class Preprocess:
    """((x * scale) - mean) / std per channel, applied to uint8 images."""

    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)


@dataclass(frozen=True)
class Spec:
    """A checked model spec; `height`/`width` are None when the spec declares no input size."""

    name: str
    height: int | None
    width: int | None
    channels: int
    preprocess: Preprocess
    fit: str
    layout: str
    layers: tuple[Layer, ...]

    def to_dict(self) -> dict:
        """Return the normalised spec as a JSON-ready dict."""
        inp: dict = {"channels": self.channels}
        if self.height is not None:
            inp = {"height": self.height, "width": self.width, "channels": self.channels}
        p = self.preprocess
        return {
            "name": self.name,
            "input": inp,
            "preprocess": {"scale": p.scale, "mean": list(p.mean), "std": list(p.std)},
            "fit": self.fit,
            "layout": self.layout,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def channels_in(self) -> list[int]:
        """Return each layer's input depth C."""
        out, c = [], self.channels
        for layer in self.layers:
            out.append(c)
            if layer.filters is not None:
                c = layer.filters
        return out

    def shapes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """Return each layer's (Hout, Wout, K) for an h x w input; ShapeError where it misfits."""
        return sizing.layer_shapes(self, h, w)

    def fitting_inputs(self, n: int, axis: str) -> list[int]:
        """Return the nearest input sizes below and above n for which the whole network fits."""
        return sizing.fitting_inputs(self, n, axis)


def _layer(raw, index: int, seen: set[str], arrays: set[str]) -> Layer:
    where = f"layer {index}"
    if not isinstance(raw, dict):
        raise _fail(f"{where}: must be an object, got {type(raw).__name__}", where)
    name = check_name(raw.get("name"), what=f"{where}: name", layer=where)
    if name in seen:
        raise _fail(f"{name}: duplicate layer name (layer {index})", name, "name")
    seen.add(name)
    kind = raw.get("type")
    if kind not in LAYER_TYPES:
        raise _fail(
            f"{name}: unknown type {kind!r}; use one of {', '.join(LAYER_TYPES)}", name, "type"
        )
    extra = sorted(set(raw) - LAYER_KEYS[kind])
    if extra:
        raise _fail(
            f"{name}: unknown key {extra[0]!r} for a {kind} layer; allowed: "
            f"{', '.join(sorted(LAYER_KEYS[kind]))}",
            name,
            extra[0],
        )
    if kind == "relu":
        return Layer(name, kind)
    if "size" not in raw:
        raise _fail(f"{name}: size is required for a {kind} layer", name, "size")
    pooled = kind in ("maxpool", "avgpool")
    window = Window.make(
        raw["size"],
        raw.get("stride", raw["size"] if pooled else 1),
        raw.get("pad", 0),
        raw.get("dilation", 1),
        layer=name,
    )
    for attr, value in vars(window).items():
        if value > MAX_DIM:
            field = _SPEC_FIELD[attr[0]]
            message = f"{name}: {field} must be between 0 and {MAX_DIM}, got {value}"
            raise _fail(message, name, field)
    if pooled:
        count_pad = raw.get("count_pad", False)
        if not isinstance(count_pad, bool):
            raise _fail(
                f"{name}: count_pad must be true or false, got {count_pad!r}", name, "count_pad"
            )
        return Layer(name, kind, window, count_pad=count_pad)
    if "filters" not in raw:
        raise _fail(f"{name}: filters is required for a {kind} layer", name, "filters")
    filters = _int(raw["filters"], layer=name, field="filters")
    keys = {}
    for field, default in (("weights", f"{name}.w"), ("bias", f"{name}.b")):
        key = raw.get(field, default)
        if key is None and field == "bias":
            keys[field] = None
            continue
        key = check_name(key, what=f"{name}: {field}", layer=name, field=field)
        if key in arrays:
            raise _fail(
                f"{name}: {field} array {key!r} is already used by another layer", name, field
            )
        arrays.add(key)
        keys[field] = key
    return Layer(name, kind, window, filters, keys["weights"], keys["bias"])


def _floats(value, *, n: int, field: str, positive: bool) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if len(items) not in (1, n):
        raise _fail(
            f"preprocess: {field} must be a number or a list of {n} (one per channel), "
            f"got {len(items)} values",
            "preprocess",
            field,
        )
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(
                f"preprocess: {field} must hold finite numbers, got {v!r}", "preprocess", field
            )
        if positive and v <= 0:
            raise _fail(f"preprocess: {field} must be > 0, got {v}", "preprocess", field)
        out.append(float(v))
    return tuple(out * n if len(out) == 1 else out)


def _preprocess(raw, channels: int) -> Preprocess:
    if raw is None:
        return Preprocess(1.0, (0.0,) * channels, (1.0,) * channels)
    if not isinstance(raw, dict):
        raise _fail(
            "preprocess must be an object with scale, mean, std", "preprocess", "preprocess"
        )
    extra = sorted(set(raw) - {"scale", "mean", "std"})
    if extra:
        raise _fail(
            f"preprocess: unknown key {extra[0]!r}; allowed: scale, mean, std",
            "preprocess",
            extra[0],
        )
    (scale,) = _floats(raw.get("scale", 1.0), n=1, field="scale", positive=True)
    mean = _floats(raw.get("mean", 0.0), n=channels, field="mean", positive=False)
    std = _floats(raw.get("std", 1.0), n=channels, field="std", positive=True)
    # Pixels 0 and 255 bound what uint8 images become; they must stay finite in float32.
    for pixel in (0, 255):
        for m, sd in zip(mean, std, strict=True):
            value = (pixel * scale - m) / sd
            if not abs(value) < 3e38:
                raise _fail(
                    f"preprocess: pixel {pixel} becomes {value:g}, beyond float32's range",
                    "preprocess",
                    "std",
                )
    return Preprocess(scale, mean, std)


def _input(raw) -> tuple[int | None, int | None, int]:
    if raw is None:
        return None, None, 3
    if not isinstance(raw, dict):
        raise _fail("input must be an object with height, width, channels", "input", "input")
    extra = sorted(set(raw) - {"height", "width", "channels"})
    if extra:
        raise _fail(
            f"input: unknown key {extra[0]!r}; allowed: height, width, channels", "input", extra[0]
        )
    if ("height" in raw) != ("width" in raw):
        raise _fail("input: give both height and width, or neither", "input", "height")
    c = _int(raw.get("channels", 3), layer="input", field="channels")
    if "height" not in raw:
        return None, None, c
    return (
        _int(raw["height"], layer="input", field="height"),
        _int(raw["width"], layer="input", field="width"),
        c,
    )


MAX_SPEC_BYTES = 1 << 20
"""Largest spec JSON accepted (bytes)."""


def parse_spec_json(data) -> dict:
    """Return the spec dict from JSON bytes/str (a dict as is); ModelError when not JSON."""
    if isinstance(data, dict):
        return data
    if isinstance(data, (bytes, bytearray)):
        if len(data) > MAX_SPEC_BYTES:
            raise ModelError(
                f"spec is {len(data)} bytes, over the {MAX_SPEC_BYTES}-byte limit", field="spec"
            )
        data = bytes(data).decode("utf-8", errors="replace")
    if not isinstance(data, str):
        raise ModelError(
            f"spec must be JSON text or an object, got {type(data).__name__}", field="spec"
        )
    if len(data) > MAX_SPEC_BYTES:
        raise ModelError(f"spec is over the {MAX_SPEC_BYTES}-byte limit", field="spec")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ModelError(f"spec is not valid JSON: {err}", field="spec") from None


def load_spec(path) -> Spec:
    """Read and check spec.json from disk (size-checked before it is read)."""
    return parse_spec(parse_spec_json(read_capped(path, MAX_SPEC_BYTES, "spec", ModelError)))


def parse_spec(raw) -> Spec:
    """Check a spec dict (parsed JSON) and return it normalised; ModelError names layer, field."""
    if not isinstance(raw, dict):
        raise _fail(f"a spec must be a JSON object, got {type(raw).__name__}", None, None)
    extra = sorted(set(raw) - MODEL_KEYS)
    if extra:
        raise _fail(
            f"unknown model key {extra[0]!r}; allowed: {', '.join(sorted(MODEL_KEYS))}",
            None,
            extra[0],
        )
    name = check_name(raw.get("name", "model"), what="model name")
    height, width, channels = _input(raw.get("input"))
    fit = raw.get("fit", "strict")
    if fit not in FITS:
        raise _fail(f"fit must be one of {', '.join(FITS)}, got {fit!r}", None, "fit")
    layout = raw.get("layout", "OHWI")
    if layout not in LAYOUTS:
        raise _fail(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", None, "layout")
    layers = raw.get("layers")
    if not isinstance(layers, list) or not layers:
        raise _fail("layers must be a non-empty list", None, "layers")
    if len(layers) > MAX_LAYERS:
        raise _fail(f"too many layers: {len(layers)} > {MAX_LAYERS}", None, "layers")
    seen: set[str] = set()
    arrays: set[str] = set()
    parsed = tuple(_layer(item, i, seen, arrays) for i, item in enumerate(layers))
    spec = Spec(
        name,
        height,
        width,
        channels,
        _preprocess(raw.get("preprocess"), channels),
        fit,
        layout,
        parsed,
    )
    if height is not None:
        spec.shapes(height, width)
    return spec
