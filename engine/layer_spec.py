"""Parse and check one layer of a model spec (docs/model-format.md "Layers") into a Layer.

Pure Python, like engine.spec: every error is a ModelError naming the layer and the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .errors import ModelError
from .geometry import Window
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
MAX_DIM = 1 << 16  # caps every size, stride, pad, filter count and input side: keeps sizes sane
# The spec field behind each Window attribute, by its first letter (fh, sw, dh, top, left, ...).
_SPEC_FIELD = dict(f="size", s="stride", d="dilation", t="pad", l="pad", b="pad", r="pad")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,127}")


def fail(message: str, layer: str | None = None, field: str | None = None) -> ModelError:
    return ModelError(message, layer=layer, field=field)


def check_name(value, *, what: str, layer: str | None = None, field: str = "name") -> str:
    """Return value if it is a usable name: 1-128 of letters, digits, _ . : - ."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise fail(
            f"{what} must be 1-128 characters of letters, digits, '_', '.', ':' or '-' "
            f"(not starting with punctuation), got {value!r}",
            layer,
            field,
        )
    return value


def check_int(value, *, layer, field, minimum=1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(f"{layer}: {field} must be an integer, got {value!r}", layer, field)
    if not minimum <= value <= MAX_DIM:
        raise fail(
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

    def sliding_window(self) -> Window:
        """Return the window of a WINDOWED layer; ModelError for a type that has none."""
        if self.window is None:
            raise fail(f"{self.name}: a {self.type} layer has no window", self.name, "size")
        return self.window

    def weights_key(self) -> str:
        """Return the weights array key of a WEIGHTED layer; ModelError for any other type."""
        if self.weights is None:
            raise fail(f"{self.name}: a {self.type} layer has no weights", self.name, "weights")
        return self.weights

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


def parse_layer(raw, index: int, seen: dict[str, None], arrays: set[str]) -> Layer:
    """Return layer `index` checked; seen holds the names so far (in order), arrays the keys."""
    where = f"layer {index}"
    if not isinstance(raw, dict):
        raise fail(f"{where}: must be an object, got {type(raw).__name__}", where)
    name = check_name(raw.get("name"), what=f"{where}: name", layer=where)
    if name == IMAGE:
        raise fail(
            f"layer {index}: the name {IMAGE!r} is reserved for the model input", name, "name"
        )
    if name in seen:
        raise fail(f"{name}: duplicate layer name (layer {index})", name, "name")
    default = (next(reversed(seen)),) if seen else (IMAGE,)
    seen[name] = None
    layer = _layer_fields(raw, name, arrays)
    inputs = _inputs(raw, layer, default)
    return replace(layer, inputs=inputs)


def _inputs(raw: dict, layer: Layer, default: tuple[str, ...]) -> tuple[str, ...]:
    name, kind = layer.name, layer.type
    if "input" in raw and "inputs" in raw:
        raise fail(f"{name}: give input or inputs, not both", name, "inputs")
    if "input" in raw:
        value = check_name(raw["input"], what=f"{name}: input", layer=name, field="input")
        inputs: tuple[str, ...] = (value,)
    elif "inputs" in raw:
        value = raw["inputs"]
        if not isinstance(value, list) or not value:
            raise fail(
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
        raise fail(
            f"{name}: {kind} needs inputs naming at least 2 layers, got {list(inputs)}",
            name,
            "inputs",
        )
    if kind not in MULTI_INPUT and len(inputs) != 1:
        raise fail(
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
        raise fail(f"{layer}: {key} must be a finite number, got {value!r}", layer, key)
    if low is not None and (value <= low if low_open else value < low):
        sign = ">" if low_open else ">="
        raise fail(f"{layer}: {key} must be {sign} {low}, got {value}", layer, key)
    return float(value)


def _array_key(raw: dict, field: str, default: str, name: str, arrays: set[str]) -> str:
    key = check_name(raw.get(field, default), what=f"{name}: {field}", layer=name, field=field)
    if key in arrays:
        raise fail(f"{name}: {field} array {key!r} is already used by another layer", name, field)
    arrays.add(key)
    return key


def _plain_layer(raw: dict, name: str, kind: str, arrays: set[str]) -> Layer:
    """Parse the windowless layer types (everything but conv, local and the pools)."""
    if kind == "add":
        relu = raw.get("relu", False)
        if not isinstance(relu, bool):
            raise fail(f"{name}: relu must be true or false, got {relu!r}", name, "relu")
        return Layer(name, kind, relu=relu)
    if kind == "batchnorm":
        keys = tuple(_array_key(raw, f, f"{name}.{f}", name, arrays) for f in BATCHNORM_ARRAYS)
        eps = _float(raw, "eps", 1e-5, layer=name, low=0.0, low_open=True)
        return Layer(name, kind, arrays=keys, eps=eps)
    if kind == "lrn":
        if "size" not in raw:
            raise fail(f"{name}: size is required for an lrn layer", name, "size")
        return Layer(
            name,
            kind,
            size=check_int(raw["size"], layer=name, field="size"),
            alpha=_float(raw, "alpha", 1e-4, layer=name, low=0.0),
            beta=_float(raw, "beta", 0.75, layer=name),
            lrn_bias=_float(raw, "bias", 1.0, layer=name, low=0.0, low_open=True),
        )
    if kind == "clip":
        lo = _float(raw, "min", None, layer=name)
        hi = _float(raw, "max", None, layer=name)
        if lo is not None and hi is not None and lo > hi:
            raise fail(f"{name}: min {lo} is above max {hi}", name, "min")
        return Layer(name, kind, lo=lo, hi=hi)
    return Layer(name, kind)


def _layer_fields(raw: dict, name: str, arrays: set[str]) -> Layer:
    kind = raw.get("type")
    if kind not in LAYER_TYPES:
        raise fail(
            f"{name}: unknown type {kind!r}; use one of {', '.join(LAYER_TYPES)}", name, "type"
        )
    extra = sorted(set(raw) - LAYER_KEYS[kind])
    if extra:
        raise fail(
            f"{name}: unknown key {extra[0]!r} for a {kind} layer; allowed: "
            f"{', '.join(sorted(LAYER_KEYS[kind]))}",
            name,
            extra[0],
        )
    if kind not in WINDOWED:
        return _plain_layer(raw, name, kind, arrays)
    if "size" not in raw:
        raise fail(f"{name}: size is required for a {kind} layer", name, "size")
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
            raise fail(message, name, field)
    if pooled:
        count_pad = raw.get("count_pad", False)
        if not isinstance(count_pad, bool):
            raise fail(
                f"{name}: count_pad must be true or false, got {count_pad!r}", name, "count_pad"
            )
        return Layer(name, kind, window, count_pad=count_pad)
    if "filters" not in raw:
        raise fail(f"{name}: filters is required for a {kind} layer", name, "filters")
    filters = check_int(raw["filters"], layer=name, field="filters")
    groups = check_int(raw.get("groups", 1), layer=name, field="groups")
    weights = _array_key(raw, "weights", f"{name}.w", name, arrays)
    bias = None
    if raw.get("bias", f"{name}.b") is not None:
        bias = _array_key(raw, "bias", f"{name}.b", name, arrays)
    return Layer(name, kind, window, filters, weights, bias, groups=groups)
