"""Parse and check a model spec (DESIGN.md "The model format") into normalised layer objects.

Pure Python: no arrays are needed, so `convq summary spec.json` and the API can size a model
without its weights. Every error is a ModelError (or ShapeError) naming the layer and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace

from . import graph, sizing
from .errors import ModelError
from .files import read_capped
from .geometry import FITS, Window
from .graph import IMAGE, MULTI_INPUT

LAYER_TYPES = (
    "conv",
    "relu",
    "maxpool",
    "avgpool",
    "local",
    "add",
    "concat",
    "batchnorm",
    "lrn",
    "globalavgpool",
    "globalmaxpool",
    "softmax",
    "sigmoid",
    "tanh",
    "clip",
)
WINDOWED = ("conv", "local", "maxpool", "avgpool")
WEIGHTED = ("conv", "local")
BATCHNORM_ARRAYS = ("scale", "shift", "mean", "var")
LAYOUTS = ("OHWI", "OIHW")
_WINDOW_KEYS = {"size", "stride", "pad", "dilation"}
_BASE_KEYS = {"name", "type", "input", "inputs"}
LAYER_KEYS = {
    "conv": _BASE_KEYS | {"filters", "weights", "bias", "groups"} | _WINDOW_KEYS,
    "local": _BASE_KEYS | {"filters", "weights", "bias"} | _WINDOW_KEYS,
    "maxpool": _BASE_KEYS | _WINDOW_KEYS,
    "avgpool": _BASE_KEYS | {"size", "stride", "pad", "count_pad"},
    "add": _BASE_KEYS | {"relu"},
    "batchnorm": _BASE_KEYS | {"eps", *BATCHNORM_ARRAYS},
    "lrn": _BASE_KEYS | {"size", "alpha", "beta", "bias"},
    "clip": _BASE_KEYS | {"min", "max"},
} | {kind: _BASE_KEYS for kind in ("relu", "concat", "globalavgpool", "globalmaxpool", "softmax")}
LAYER_KEYS |= {kind: _BASE_KEYS for kind in ("sigmoid", "tanh")}
MODEL_KEYS = {"name", "input", "preprocess", "fit", "layout", "layers", "labels"}
MAX_LABEL_CHARS = 256
MAX_LAYERS = 4096
MAX_DIM = 1 << 16  # caps every size, stride, pad, filter count and input side: keeps sizes sane
# The spec field behind each Window attribute, by its first letter (fh, sw, dh, top, left, ...).
_SPEC_FIELD = dict(f="size", s="stride", d="dilation", t="pad", l="pad", b="pad", r="pad")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}$")


def _fail(message: str, layer: str | None = None, field: str | None = None) -> ModelError:
    return ModelError(message, layer=layer, field=field)


def check_name(value, *, what: str, layer: str | None = None, field: str = "name") -> str:
    """Return value if it is a usable name: 1-128 of letters, digits, _ . : - ."""
    if not isinstance(value, str) or not _NAME.match(value):
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
    """One normalised layer; `window` is None but for WINDOWED types, `filters` but for WEIGHTED.

    inputs are the names it reads (IMAGE for the model input). lrn keeps its "bias" field as
    lrn_bias (bias names a weight array elsewhere); clip's min/max are lo/hi (None: unbounded);
    a batchnorm's arrays are `arrays` (scale, shift, mean, var keys).
    """

    name: str
    type: str
    window: Window | None = None
    filters: int | None = None
    weights: str | None = None
    bias: str | None = None
    count_pad: bool = False
    inputs: tuple[str, ...] = ()
    groups: int = 1
    relu: bool = False
    eps: float = 1e-5
    arrays: tuple[str, ...] = ()
    size: int | None = None
    alpha: float = 1e-4
    beta: float = 0.75
    lrn_bias: float = 1.0
    lo: float | None = None
    hi: float | None = None

    def array_keys(self) -> dict[str, str]:
        """Return {field: array key} of the weight arrays this layer reads."""
        if self.type in WEIGHTED and self.weights is not None:
            keys = {"weights": self.weights}
            return keys | ({"bias": self.bias} if self.bias is not None else {})
        return dict(zip(BATCHNORM_ARRAYS, self.arrays, strict=False))

    def to_dict(self, default_inputs: tuple[str, ...] | None = None) -> dict:
        """Return the layer in its normalised JSON form (every default spelled out).

        Its inputs are written unless they equal default_inputs (what it reads without them).
        """
        out: dict = {"name": self.name, "type": self.type}
        if self.inputs != default_inputs:
            if len(self.inputs) == 1 and self.type not in MULTI_INPUT:
                out["input"] = self.inputs[0]
            else:
                out["inputs"] = list(self.inputs)
        out.update(self._fields())
        return out

    def _fields(self) -> dict:
        out: dict = {}
        if self.type == "add":
            out["relu"] = self.relu
        elif self.type == "batchnorm":
            out |= dict(zip(BATCHNORM_ARRAYS, self.arrays, strict=True)) | {"eps": self.eps}
        elif self.type == "lrn":
            out |= {"size": self.size, "alpha": self.alpha, "beta": self.beta}
            out["bias"] = self.lrn_bias
        elif self.type == "clip":
            out |= {k: v for k, v in (("min", self.lo), ("max", self.hi)) if v is not None}
        if self.groups != 1:
            out["groups"] = self.groups
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

    def shapes(self, h: int, w: int) -> list[tuple[int, int, int]]:
        """Return each layer's (Hout, Wout, K) for an h x w input; ShapeError where it misfits."""
        return sizing.layer_shapes(self, h, w)

    def fitting_inputs(self, n: int, axis: str) -> list[int]:
        """Return the nearest input sizes below and above n for which the whole network fits."""
        return sizing.fitting_inputs(self, n, axis)


def _layer(raw, index: int, seen: dict[str, None], arrays: set[str]) -> Layer:
    where = f"layer {index}"
    if not isinstance(raw, dict):
        raise _fail(f"{where}: must be an object, got {type(raw).__name__}", where)
    name = check_name(raw.get("name"), what=f"{where}: name", layer=where)
    if name == IMAGE:
        raise _fail(
            f"layer {index}: the name {IMAGE!r} is reserved for the model input", name, "name"
        )
    if name in seen:
        raise _fail(f"{name}: duplicate layer name (layer {index})", name, "name")
    default = (next(reversed(seen)),) if seen else (IMAGE,)
    seen[name] = None
    layer = _layer_fields(raw, name, arrays)
    inputs = _inputs(raw, layer, default)
    return replace(layer, inputs=inputs)


def _inputs(raw: dict, layer: Layer, default: tuple[str, ...]) -> tuple[str, ...]:
    name, kind = layer.name, layer.type
    if "input" in raw and "inputs" in raw:
        raise _fail(f"{name}: give input or inputs, not both", name, "inputs")
    if "input" in raw:
        value = check_name(raw["input"], what=f"{name}: input", layer=name, field="input")
        inputs: tuple[str, ...] = (value,)
    elif "inputs" in raw:
        value = raw["inputs"]
        if not isinstance(value, list) or not value:
            raise _fail(
                f"{name}: inputs must be a non-empty list of layer names (a layer must read "
                f"something), got {value!r}",
                name,
                "inputs",
            )
        inputs = tuple(
            check_name(v, what=f"{name}: inputs", layer=name, field="inputs") for v in value
        )
    else:
        inputs = default
    if kind in MULTI_INPUT and len(inputs) < 2:
        raise _fail(
            f"{name}: {kind} needs inputs naming at least 2 layers, got {list(inputs)}",
            name,
            "inputs",
        )
    if kind not in MULTI_INPUT and len(inputs) != 1:
        raise _fail(
            f"{name}: a {kind} layer reads one input, got {len(inputs)}; use add or concat to "
            "join several",
            name,
            "inputs",
        )
    return inputs


def _float(raw: dict, key: str, default, *, layer: str, low=None, low_open=False):
    value = raw.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(f"{layer}: {key} must be a finite number, got {value!r}", layer, key)
    if low is not None and (value <= low if low_open else value < low):
        sign = ">" if low_open else ">="
        raise _fail(f"{layer}: {key} must be {sign} {low}, got {value}", layer, key)
    return float(value)


def _array_key(raw: dict, field: str, default: str, name: str, arrays: set[str]) -> str:
    key = check_name(raw.get(field, default), what=f"{name}: {field}", layer=name, field=field)
    if key in arrays:
        raise _fail(f"{name}: {field} array {key!r} is already used by another layer", name, field)
    arrays.add(key)
    return key


def _plain_layer(raw: dict, name: str, kind: str, arrays: set[str]) -> Layer:
    """Parse the windowless layer types (everything but conv, local and the pools)."""
    if kind == "add":
        relu = raw.get("relu", False)
        if not isinstance(relu, bool):
            raise _fail(f"{name}: relu must be true or false, got {relu!r}", name, "relu")
        return Layer(name, kind, relu=relu)
    if kind == "batchnorm":
        keys = tuple(_array_key(raw, f, f"{name}.{f}", name, arrays) for f in BATCHNORM_ARRAYS)
        eps = _float(raw, "eps", 1e-5, layer=name, low=0.0, low_open=True)
        return Layer(name, kind, arrays=keys, eps=eps)
    if kind == "lrn":
        if "size" not in raw:
            raise _fail(f"{name}: size is required for an lrn layer", name, "size")
        return Layer(
            name,
            kind,
            size=_int(raw["size"], layer=name, field="size"),
            alpha=_float(raw, "alpha", 1e-4, layer=name, low=0.0),
            beta=_float(raw, "beta", 0.75, layer=name),
            lrn_bias=_float(raw, "bias", 1.0, layer=name, low=0.0, low_open=True),
        )
    if kind == "clip":
        lo = _float(raw, "min", None, layer=name)
        hi = _float(raw, "max", None, layer=name)
        if lo is not None and hi is not None and lo > hi:
            raise _fail(f"{name}: min {lo} is above max {hi}", name, "min")
        return Layer(name, kind, lo=lo, hi=hi)
    return Layer(name, kind)


def _layer_fields(raw: dict, name: str, arrays: set[str]) -> Layer:
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
    if kind not in WINDOWED:
        return _plain_layer(raw, name, kind, arrays)
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
    groups = _int(raw.get("groups", 1), layer=name, field="groups")
    weights = _array_key(raw, "weights", f"{name}.w", name, arrays)
    bias = None
    if raw.get("bias", f"{name}.b") is not None:
        bias = _array_key(raw, "bias", f"{name}.b", name, arrays)
    return Layer(name, kind, window, filters, weights, bias, groups=groups)


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


def _labels(raw, last: str, depth: int) -> tuple[str, ...] | None:
    """Check class labels: strings, one per channel of the last layer."""
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise _fail("labels must be a list of strings", None, "labels")
    if len(raw) != depth:
        raise _fail(
            f"labels: {len(raw)} given, but the last layer {last!r} has {depth} channels "
            "(one label per channel)",
            None,
            "labels",
        )
    long = next((v for v in raw if len(v) > MAX_LABEL_CHARS), None)
    if long is not None:
        raise _fail(
            f"labels: {long[:20]!r}... is over {MAX_LABEL_CHARS} characters", None, "labels"
        )
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
    seen: dict[str, None] = {}
    arrays: set[str] = set()
    parsed = tuple(
        graph.topological([_layer(item, i, seen, arrays) for i, item in enumerate(layers)])
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
    if height is not None:
        spec.shapes(height, width)
    return spec
