"""Parse and check a model spec (docs/model-format.md) into a normalised Spec.

Pure Python: no arrays are needed, so `convq summary spec.json` and the API can size a model
without its weights. Every error is a ModelError (or ShapeError) naming the layer and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from . import graph, sizing
from .errors import ModelError
from .files import read_capped
from .geometry import FITS
from .layer_spec import Layer, check_int, check_name, fail, parse_layer

LAYOUTS = ("OHWI", "OIHW")
MODEL_KEYS = {"name", "input", "preprocess", "fit", "layout", "layers", "labels"}
MAX_LABEL_CHARS = 256
MAX_LAYERS = 4096


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
    labels: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        """Return the normalised spec as a JSON-ready dict."""
        names = [layer.name for layer in self.layers]
        inp: dict = {"channels": self.channels}
        if self.height is not None:
            inp = {"height": self.height, "width": self.width, "channels": self.channels}
        p = self.preprocess
        labels = {} if self.labels is None else {"labels": list(self.labels)}
        return labels | {
            "name": self.name,
            "input": inp,
            "preprocess": {"scale": p.scale, "mean": list(p.mean), "std": list(p.std)},
            "fit": self.fit,
            "layout": self.layout,
            "layers": [
                layer.to_dict(graph.default_inputs(names, i)) for i, layer in enumerate(self.layers)
            ],
        }

    def depths(self) -> dict[str, int]:
        """Return {layer (and IMAGE): output depth K}."""
        return graph.channels(self.layers, self.channels)

    def channels_in(self) -> list[int]:
        """Return each layer's input depth C (its first input's; a concat's summed)."""
        depth = self.depths()
        return [
            sum(depth[s] for s in layer.inputs)
            if layer.type == "concat"
            else depth[layer.inputs[0]]
            for layer in self.layers
        ]

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) the spec declares, or None when it leaves the input size open."""
        if self.height is None or self.width is None:
            return None
        return self.height, self.width

    def shapes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """Return each layer's (Hout, Wout, K) for an h x w input; ShapeError where it misfits."""
        return sizing.layer_shapes(self, h, w)

    def fitting_inputs(self, n: int, axis: str) -> list[int]:
        """Return the nearest input sizes below and above n for which the whole network fits."""
        return sizing.fitting_inputs(self, n, axis)


def _floats(value, *, n: int, field: str, positive: bool) -> tuple[float, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    if len(items) not in (1, n):
        raise fail(
            f"preprocess: {field} must be a number or a list of {n} (one per channel), "
            f"got {len(items)} values",
            "preprocess",
            field,
        )
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise fail(
                f"preprocess: {field} must hold finite numbers, got {v!r}", "preprocess", field
            )
        if positive and v <= 0:
            raise fail(f"preprocess: {field} must be > 0, got {v}", "preprocess", field)
        out.append(float(v))
    return tuple(out * n if len(out) == 1 else out)


def _preprocess(raw, channels: int) -> Preprocess:
    if raw is None:
        return Preprocess(1.0, (0.0,) * channels, (1.0,) * channels)
    if not isinstance(raw, dict):
        raise fail("preprocess must be an object with scale, mean, std", "preprocess", "preprocess")
    extra = sorted(set(raw) - {"scale", "mean", "std"})
    if extra:
        raise fail(
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
                raise fail(
                    f"preprocess: pixel {pixel} becomes {value:g}, beyond float32's range",
                    "preprocess",
                    "std",
                )
    return Preprocess(scale, mean, std)


def _input(raw) -> tuple[int | None, int | None, int]:
    if raw is None:
        return None, None, 3
    if not isinstance(raw, dict):
        raise fail("input must be an object with height, width, channels", "input", "input")
    extra = sorted(set(raw) - {"height", "width", "channels"})
    if extra:
        raise fail(
            f"input: unknown key {extra[0]!r}; allowed: height, width, channels", "input", extra[0]
        )
    if ("height" in raw) != ("width" in raw):
        raise fail("input: give both height and width, or neither", "input", "height")
    c = check_int(raw.get("channels", 3), layer="input", field="channels")
    if "height" not in raw:
        return None, None, c
    return (
        check_int(raw["height"], layer="input", field="height"),
        check_int(raw["width"], layer="input", field="width"),
        c,
    )


def _labels(raw, last: str, depth: int) -> tuple[str, ...] | None:
    """Check class labels: strings, one per channel of the last layer."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise fail("labels must be a list of strings", None, "labels")
    if len(raw) != depth:
        raise fail(
            f"labels: {len(raw)} given, but the last layer {last!r} has {depth} channels "
            "(one label per channel)",
            None,
            "labels",
        )
    long = next((v for v in raw if len(v) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise fail(f"labels: {long[:20]!r}... is over {MAX_LABEL_CHARS} characters", None, "labels")
    return tuple(raw)


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
        raise fail(f"a spec must be a JSON object, got {type(raw).__name__}", None, None)
    extra = sorted(set(raw) - MODEL_KEYS)
    if extra:
        raise fail(
            f"unknown model key {extra[0]!r}; allowed: {', '.join(sorted(MODEL_KEYS))}",
            None,
            extra[0],
        )
    name = check_name(raw.get("name", "model"), what="model name")
    height, width, channels = _input(raw.get("input"))
    fit = raw.get("fit", "strict")
    if fit not in FITS:
        raise fail(f"fit must be one of {', '.join(FITS)}, got {fit!r}", None, "fit")
    layout = raw.get("layout", "OHWI")
    if layout not in LAYOUTS:
        raise fail(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", None, "layout")
    layers = raw.get("layers")
    if not isinstance(layers, list) or not layers:
        raise fail("layers must be a non-empty list", None, "layers")
    if len(layers) > MAX_LAYERS:
        raise fail(f"too many layers: {len(layers)} > {MAX_LAYERS}", None, "layers")
    seen: dict[str, None] = {}
    arrays: set[str] = set()
    parsed = tuple(
        graph.topological([parse_layer(item, i, seen, arrays) for i, item in enumerate(layers)])
    )
    depth = graph.channels(parsed, channels)
    labels = _labels(raw.get("labels"), parsed[-1].name, depth[parsed[-1].name])
    spec = Spec(
        name,
        height,
        width,
        channels,
        _preprocess(raw.get("preprocess"), channels),
        fit,
        layout,
        parsed,
        labels,
    )
    if spec.input_size is not None:
        spec.shapes(*spec.input_size)
    return spec
