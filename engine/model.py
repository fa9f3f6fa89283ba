"""A validated ConvNet: a checked spec plus its checked weights, run layer by layer on NHWC."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from . import backprop, footprint, layers, ops
from .errors import InputError, ModelError, ShapeError, WeightsError
from .graph import IMAGE
from .layer_spec import BATCHNORM_ARRAYS, Layer
from .plan import Step, peak_bytes, plan
from .spec import Spec, load_spec, parse_spec, parse_spec_json
from .summary import summarize
from .weights import load_weights, read_weights, to_ohwi, to_safetensors

OnLayer = Callable[[int, int, str], object]
OnStep = Callable[[], object]
# A layer bigger than this many multiply-adds runs in steps when a run asks for on_step: a
# step is 4 GFLOP (~10 ms on 2 Zen 5 cores, ~130 ms on one Zen 1 core), so a timeout or
# cancel is seen that soon; smaller steps cost the engine (5e8: AlexNet conv1 at N=32 ran in
# groups of 4 images, +3%).
STEP_MACS = 2_000_000_000


def _expected_shapes(layer: Layer, c: int, out_hw) -> dict[str, tuple]:
    """Return {field: shape} of the arrays a layer needs in OHWI, None where not yet known."""
    if layer.type == "batchnorm":
        return dict.fromkeys(BATCHNORM_ARRAYS, (c,))
    win, k = layer.sliding_window(), layer.filters
    if layer.type == "conv":
        return {"weights": (k, win.fh, win.fw, c // layer.groups), "bias": (k,)}
    hout, wout = out_hw
    return {"weights": (hout, wout, k, win.fh, win.fw, c), "bias": (hout, wout, k)}


def _as_layout(shape: tuple, layout: str) -> tuple:
    """Show an OHWI shape as the spec's layout would spell it."""
    if layout == "OIHW" and len(shape) >= 3:
        return (*shape[:-3], shape[-1], shape[-3], shape[-2])
    return shape


def _matches(shape: tuple, expected: tuple) -> bool:
    if len(shape) != len(expected):
        return False
    return all(e is None or s == e for s, e in zip(shape, expected, strict=True))


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


def _check_array(layer: Layer, field: str, array, expected: tuple, layout: str) -> np.ndarray:
    """Return array as float32 OHWI after checking type, shape and finiteness."""
    name = layer.name
    if not isinstance(array, np.ndarray):
        raise WeightsError(
            f"{name}: {field} must be an array, got {type(array).__name__}", layer=name, field=field
        )
    if array.dtype.kind != "f":
        raise WeightsError(
            f"{name}: {field} must be float, got {array.dtype}", layer=name, field=field
        )
    want = _as_layout(expected, layout) if field == "weights" else expected
    if not _matches(array.shape, want):
        raise WeightsError(
            f"{name}: {field} shape should be {_fmt(want)}"
            f"{' (' + layout + ')' if field == 'weights' else ''}, got {_fmt(array.shape)}",
            layer=name,
            field=field,
        )
    if field == "weights" and layout == "OIHW":
        array = to_ohwi(array, layer.type)
    with np.errstate(over="ignore"):  # float64 past float32's range becomes inf, refused below
        held = np.ascontiguousarray(array, dtype=np.float32)
    bad = int(held.size - np.count_nonzero(np.isfinite(held)))
    if bad:
        raise WeightsError(
            f"{name}: {field} holds {bad} values that are NaN, inf or beyond float32's range",
            layer=name,
            field=field,
        )
    return held


def _check_arrays(spec: Spec, arrays) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """Return (float32 OHWI arrays, each local layer's (Hout, Wout)) after checking all of them."""
    if not isinstance(arrays, Mapping):
        raise WeightsError(
            f"weights must be a mapping of name to array, got {type(arrays).__name__}",
            field="weights",
        )
    size = spec.input_size
    sizes = spec.shapes(*size) if size is not None else None
    needed = {}
    for layer in spec.layers:
        for field, key in layer.array_keys().items():
            needed[key] = (layer, field)
    for key, (layer, field) in needed.items():
        if key not in arrays:
            have = ", ".join(sorted(map(str, arrays))[:10]) or "none"
            raise WeightsError(
                f"{layer.name}: {field} array {key!r} is missing (the file has: {have})",
                layer=layer.name,
                field=field,
            )
    extra = sorted(str(k) for k in arrays if k not in needed)
    if extra:
        raise WeightsError(
            f"weights hold arrays no layer uses: {', '.join(extra[:10])}", field="weights"
        )
    out: dict[str, np.ndarray] = {}
    local_hw: dict[str, tuple[int, int]] = {}
    for i, (layer, c) in enumerate(zip(spec.layers, spec.channels_in(), strict=True)):
        keys = layer.array_keys()
        if not keys:
            continue
        hw = (sizes[i][0], sizes[i][1]) if sizes else (None, None)
        shapes = _expected_shapes(layer, c, hw)
        if "weights" in keys:
            key = keys["weights"]
            out[key] = _check_array(layer, "weights", arrays[key], shapes["weights"], spec.layout)
        if layer.type == "local":
            hout, wout = out[keys["weights"]].shape[:2]
            local_hw[layer.name] = (hout, wout)
            shapes["bias"] = (hout, wout, layer.filters)
        for field, key in keys.items():
            if field != "weights":
                out[key] = _check_array(layer, field, arrays[key], shapes[field], spec.layout)
    return out, local_hw


_SIMPLE = {
    "relu": ops.relu,
    "globalavgpool": layers.global_avg_pool,
    "globalmaxpool": layers.global_max_pool,
    "softmax": layers.softmax,
    "sigmoid": layers.sigmoid,
    "tanh": layers.tanh,
}


class Model:
    """A validated ConvNet: spec plus weights (held as float32, OHWI)."""

    def __init__(self, spec: Spec, arrays: Mapping[str, np.ndarray]):
        self._spec = spec
        self._arrays, self._local_hw = _check_arrays(spec, arrays)
        # Each conv's packed filters, made on its first run and reused by every later one.
        self._conv_weights = {
            layer.name: ops.ConvWeights(self._arrays[layer.weights_key()], groups=layer.groups)
            for layer in spec.layers
            if layer.type == "conv"
        }
        self._folds: dict[tuple[str, str], tuple] = {}
        self._kernels: dict[str, str] = {}  # conv layer -> kernel its last run used
        self._plans: dict[tuple, list[Step]] = {}
        self._depth = spec.depths()
        self.fuse = True  # fold batchnorm/relu into the layer before where allowed (plan.py)

    @classmethod
    def from_arrays(cls, spec: dict | Spec, arrays: Mapping[str, np.ndarray]) -> Model:
        """Build a model from a spec dict and {name: ndarray}."""
        return cls(spec if isinstance(spec, Spec) else parse_spec(spec), arrays)

    @classmethod
    def load(cls, spec_path, weights_path) -> Model:
        """Load spec.json and its .npz or .safetensors weights from disk."""
        spec = load_spec(spec_path)  # check the spec before reading big weights
        return cls(spec, load_weights(weights_path))

    @classmethod
    def from_bytes(cls, spec, weights: bytes, filename: str = "weights.npz") -> Model:
        """Build a model from uploaded spec JSON (bytes, str or dict) and weight file bytes."""
        parsed = parse_spec(parse_spec_json(spec))
        return cls(parsed, read_weights(weights, filename))

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> dict:
        """The normalised spec as held: layout is always OHWI (weights were converted at load)."""
        out = self._spec.to_dict()
        out["layout"] = "OHWI"
        return out

    @property
    def labels(self) -> list[str] | None:
        """Class labels, one per channel of the last layer, or None when the spec has none."""
        return None if self._spec.labels is None else list(self._spec.labels)

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self._spec.layers]

    @property
    def input_shape(self) -> tuple[int | None, int | None, int]:
        """(H, W, C), or (None, None, C) when the spec declares no input size."""
        return self._spec.height, self._spec.width, self._spec.channels

    def arrays(self) -> dict[str, np.ndarray]:
        """Return the weights as held ({name: float32 OHWI array}); do not modify them."""
        return dict(self._arrays)

    def output_shapes(self, h: int, w: int) -> dict[str, tuple[int, int, int]]:
        """Return {layer: (Hout, Wout, K)} for h x w images; ShapeError when they do not fit."""
        shapes = self._spec.shapes(h, w)
        for layer, shape in zip(self._spec.layers, shapes, strict=True):
            want = self._local_hw.get(layer.name)
            if want is not None and tuple(want) != shape[:2]:
                raise ShapeError(
                    f"{layer.name}: local weights are for a {want[0]}x{want[1]} output, "
                    f"but a {h}x{w} input gives "
                    f"{shape[0]}x{shape[1]}",
                    layer=layer.name,
                    field="weights",
                )
        return dict(zip(self.layer_names, shapes, strict=True))

    def output_bytes(self, n: int, h: int, w: int, outputs=None) -> int:
        """Return the float32 bytes the requested outputs take for n images of h x w."""
        shapes = self.output_shapes(h, w)
        return sum(4 * n * int(np.prod(shapes[name])) for name in self.resolve_outputs(outputs))

    def peak_bytes(self, n: int, h: int, w: int, outputs=None) -> int:
        """Return the most bytes a run of n images h x w keeping outputs holds at once."""
        return footprint.peak_bytes(self._spec, n, h, w, self.resolve_outputs(outputs))

    def resolve_outputs(self, outputs=None) -> list[str]:
        """Return layer names: None -> [last], "all" -> every layer, a name or list -> checked."""
        names = self.layer_names
        if outputs is None:
            return [names[-1]]
        if outputs == "all":
            return list(names)
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, (list, tuple)) or not outputs:
            raise ModelError(
                "outputs must be a layer name, a non-empty list of them, or 'all'", field="outputs"
            )
        for out in outputs:
            if out not in names:
                raise ModelError(
                    f"unknown output {out!r}; layers are: {', '.join(names)}", field="outputs"
                )
        return list(dict.fromkeys(outputs))

    def summary(
        self, h: int | None = None, w: int | None = None, *, batch: int | None = None
    ) -> list[dict]:
        """Return one row per layer (engine.summary.summarize) for h x w or the declared input."""
        if h is None or w is None:
            h, w = self._spec.height, self._spec.width
        if h is not None and w is not None:
            self.output_shapes(h, w)
        return summarize(self._spec, h, w, local_hw=self._local_hw, batch=batch)

    @property
    def kernels(self) -> dict[str, str]:
        """Return {conv layer: the kernel (engine.kernels) its last run used}, in run order."""
        return dict(self._kernels)

    def to_safetensors(self) -> bytes:
        """Return the weights (float32, OHWI) as safetensors bytes."""
        return to_safetensors(self._arrays)

    def prepare(self, images) -> np.ndarray:
        """Return images as float32 (N, H, W, C): uint8 preprocessed by the spec, float32 as is."""
        if not isinstance(images, np.ndarray):
            raise InputError(
                f"images must be a numpy array, got {type(images).__name__}", field="input"
            )
        if images.dtype not in (np.uint8, np.float32):
            raise InputError(
                f"images must be uint8 (preprocessed) or float32 (as is), got {images.dtype}",
                field="input",
            )
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or 0 in images.shape:
            raise InputError(
                f"images must be (N, H, W, C) or (N, H, W) and non-empty, got shape {images.shape}",
                field="input",
            )
        h, w, c = self.input_shape
        if images.shape[3] != c:
            hint = " (convert grey images to RGB first)" if images.shape[3] == 1 else ""
            raise InputError(
                f"images have {images.shape[3]} channels; the model takes {c}{hint}", field="input"
            )
        if h is not None and images.shape[1:3] != (h, w):
            raise InputError(
                f"images are {images.shape[1]}x{images.shape[2]}; the model takes {h}x{w}",
                field="input",
            )
        if images.dtype == np.float32:
            if not np.isfinite(images).all():
                raise InputError("float images hold NaN or inf values", field="input")
            return np.ascontiguousarray(images)
        p = self._spec.preprocess
        return ops.preprocess(images, p.scale, p.mean, p.std)

    @property
    def packed_bytes(self) -> int:
        """Bytes of the packed conv filters made so far by runs (beside the weights)."""
        packed = [*self._conv_weights.values(), *(p for p, _ in self._folds.values())]
        return sum(p.nbytes for p in packed)

    def prepare_fitting(self, images) -> np.ndarray:
        """Return prepare(images), or InputError when their height and width do not fit."""
        x = self.prepare(images)
        try:
            self.output_shapes(x.shape[1], x.shape[2])
        except ShapeError as err:
            raise InputError(
                f"images of {x.shape[1]}x{x.shape[2]} do not fit: {err.message}",
                layer=err.layer,
                field=err.field,
            ) from None
        return x

    def run(
        self,
        images,
        outputs=None,
        on_layer: OnLayer | None = None,
        on_step: OnStep | None = None,
    ) -> dict[str, np.ndarray]:
        """Run images (N, H, W, C) through the layers; return {name: float32 (N, Hout, Wout, K)}.

        Only the requested outputs are kept; layers past the last requested one are not run.
        on_layer(i, n, name) is called before layer i (0-based) of the n layers this run computes;
        on_step() before each step of a windowed layer bigger than STEP_MACS (image groups or
        bands of output rows, see _apply_in_steps), so a run can be stopped inside one long layer.
        Either may raise to abort the run. Steps split images or output rows only, so results equal
        an unstepped run's (within float rounding where the Winograd kernel's tiles shift).
        """
        wanted = self.resolve_outputs(outputs)
        x = self.prepare_fitting(images)
        steps = self._steps(wanted)
        values: dict[str, np.ndarray] = {IMAGE: x}
        shapes = self.output_shapes(x.shape[1], x.shape[2]) if any(s.into for s in steps) else {}
        del x
        n, i = sum(len(step.layers) for step in steps), 0
        for step in steps:
            for layer in step.layers:
                if on_layer is not None:
                    on_layer(i, n, layer.name)
                i += 1
            xs = [values[src] for src in step.inputs]
            out = None
            if step.into is not None:  # a slice of the concat's output, made by its first writer
                cat, c0, c1 = step.into
                if cat not in values:
                    values[cat] = np.empty((len(xs[0]), *shapes[cat]), np.float32)
                out = values[cat][..., c0:c1]
            elif step.filled:
                out = values[step.name]
            if on_step is None:
                values[step.name] = self._apply(step, xs, out=out)
            else:
                values[step.name] = self._apply_in_steps(step, xs, on_step=on_step, out=out)
            del xs, out
            for src in step.frees:
                del values[src]
        return {name: values[name] for name in wanted}

    def _steps(self, wanted: list[str]) -> list[Step]:
        key = (self.fuse, *wanted)
        steps = self._plans.get(key)
        if steps is None:
            steps = plan(self._spec.layers, wanted, fuse=self.fuse, depth=self._depth)
            if len(self._plans) < 64:
                self._plans[key] = steps
        return steps

    def memory(self, n: int, h: int, w: int, outputs=None) -> int:
        """Return the peak float32 activation bytes a run of n h x w images holds at once.

        Counts the input, the values still to be read or requested, and the layer being made
        (engine.plan.peak_bytes); not weights, packed filters or kernel scratch.
        """
        shapes = self.output_shapes(h, w) | {IMAGE: (h, w, self._spec.channels)}
        return peak_bytes(self._steps(self.resolve_outputs(outputs)), shapes, n)

    def _apply_in_steps(
        self, step: Step, xs: list[np.ndarray], *, on_step: OnStep, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Run one step as _apply does, in parts of at most about STEP_MACS multiply-adds.

        Images are grouped while a group fits a part; an image too big for one part is computed
        in bands of output rows, each from the input rows its windows read, with the real pads
        only where a band touches the top or bottom edge (Hout = (H + 2P - D(F-1) - 1)/S + 1 per
        band, as for the whole image). Only single-input windowed layers are split. A stepped
        run gives the unstepped run's floats (bands aligned to Winograd's tiles; a conv on a
        BLAS kernel steps by whole images only, see _whole_images_only).
        """
        layer = step.head
        win = layer.window
        if win is None or len(xs) != 1 or step.in_place is not None:
            on_step()
            return self._apply(step, xs, out=out)
        x = xs[0]
        n, h, w, c = x.shape
        hout, wout = win.out_hw(h, w)
        k = layer.filters or c
        per_row = wout * k * win.fh * win.fw * (c if layer.filters else 1)
        per_image = max(1, hout * per_row)
        if n * per_image <= STEP_MACS:
            on_step()
            return self._apply(step, xs, out=out)
        if out is None:
            out = np.empty((n, hout, wout, k), np.float32)
        group = max(1, STEP_MACS // per_image)
        rows = (
            hout if group > 1 or self._whole_images_only(step, x) else STEP_MACS // max(1, per_row)
        )
        # Bands start on a multiple of 2 x the row dilation: Winograd pairs output rows y and
        # y + D into one tile (engine._winograd.tile_origins), and a row's floats depend on its
        # place in its tile, so aligned bands give every row the floats of the unstepped run.
        if rows < hout:
            rows = max(2 * win.dh, rows - rows % (2 * win.dh))
        for a in range(0, n, group):
            b = min(n, a + group)
            if rows >= hout:  # whole images: straight into their slice of out (a conv, no copy)
                on_step()
                self._apply(step, [x[a:b]], out=out[a:b])
                continue
            for y0 in range(0, hout, rows):
                y1 = min(hout, y0 + rows)
                on_step()
                out[a:b, y0:y1] = self._band(step, x[a:b], y0, y1)
        return out

    def _whole_images_only(self, step: Step, x: np.ndarray) -> bool:
        """Whether step's conv runs a BLAS kernel: its tiles are cut from the rows of the whole
        output image and sgemm's floats depend on a tile's size, so bands of rows would give
        other floats than the unstepped run (such a layer is stepped by whole images only)."""
        layer = step.head
        if layer.type != "conv":
            return False
        win = layer.sliding_window()
        packed = self._conv_weights[layer.name]
        stride, dilation = (win.sh, win.sw), (win.dh, win.dw)
        name = ops.conv_kernel(x.shape, packed, stride, win.pad, dilation, layer=layer.name)
        return name.endswith("-blas")  # the choice _apply makes for the same layer and input

    def _band(self, step: Step, x: np.ndarray, y0: int, y1: int) -> np.ndarray:
        """Return output rows [y0, y1) of a windowed step on x (all rows: the whole output)."""
        layer = step.head
        win = layer.sliding_window()
        h = x.shape[1]
        lo = y0 * win.sh - win.top
        hi = (y1 - 1) * win.sh - win.top + win.dh * (win.fh - 1) + 1
        if lo <= -win.top and hi >= h + win.bottom:
            return self._apply(step, [x])
        if lo >= h or hi <= 0:  # a band of pad rows only: give them as rows of the pad value
            fill = -np.inf if layer.type == "maxpool" else 0.0
            part = np.full((x.shape[0], hi - lo, *x.shape[2:]), fill, np.float32)
            pad = (0, win.left, 0, win.right)
        else:
            pad = (max(0, -lo), win.left, max(0, hi - h), win.right)
            part = x[:, max(0, lo) : min(h, hi)]
        return self._apply(step, [part], pad=pad, rows=(y0, y1))

    def _apply(
        self,
        step: Step,
        xs: list[np.ndarray],
        *,
        pad: tuple[int, int, int, int] | None = None,
        rows: tuple[int, int] | None = None,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Run one step (a layer and what is fused into it) through the fast path.

        xs holds the values of step.inputs. pad and rows: for a band of output rows (_band) of a
        windowed layer. out: where the result goes (step.into's slice of a concat's output, or
        the concat's output itself); a step that cannot write there is copied in.
        """
        if out is not None and step.head.type == "concat":
            return self._fill_concat(step, xs, out)
        if out is not None and (step.head.type != "conv" or rows is not None):
            out[...] = self._apply(step, xs, pad=pad, rows=rows)
            return out
        layer, x = step.head, xs[0]
        add = step.fused("add")
        relu = step.fused("relu") is not None or (add is not None and add.relu)
        kind = layer.type
        if step.in_place is not None and kind != "conv":
            return self._in_place(step, xs, relu)
        if kind in _SIMPLE:
            return _SIMPLE[kind](x)
        if kind == "add":
            return layers.add(xs, relu=relu or layer.relu)
        if kind == "concat":
            return layers.concat(xs)
        if kind == "batchnorm":
            scale, shift, mean, var = (self._arrays[k] for k in layer.arrays)
            return layers.batchnorm(x, scale, shift, mean, var, eps=layer.eps)
        if kind == "lrn":
            return layers.lrn(x, layer.size or 1, layer.alpha, layer.beta, layer.lrn_bias)
        if kind == "clip":
            return layers.clip(x, layer.lo, layer.hi)
        win = layer.sliding_window()
        stride, dilation = (win.sh, win.sw), (win.dh, win.dw)
        pad = win.pad if pad is None else pad
        size = (win.fh, win.fw)
        if kind == "maxpool":
            return ops.max_pool2d(x, size, stride, pad, dilation)
        if kind == "avgpool":
            return ops.avg_pool2d(x, size, stride, pad, count_pad=layer.count_pad)
        bias = self._arrays[layer.bias] if layer.bias is not None else None
        if kind == "conv":
            bn = step.fused("batchnorm")
            packed, bias = (
                self._folded(layer, bn)
                if bn is not None
                else (self._conv_weights[layer.name], bias)
            )
            self._kernels[layer.name] = ops.conv_kernel(
                x.shape, packed, stride, pad, dilation, layer=layer.name
            )
            if add is not None:
                out = self._residual(step, xs[len(layer.inputs) :])
            return ops.conv2d(
                x,
                packed,
                bias,
                stride,
                pad,
                dilation,
                relu=relu,
                groups=layer.groups,
                out=out,
                accumulate=add is not None,
            )
        weights = self._arrays[layer.weights_key()]
        if rows is not None:  # a local layer's weights and bias are per output position
            weights = weights[rows[0] : rows[1]]
            bias = None if bias is None else bias[rows[0] : rows[1]]
        return ops.local2d(x, weights, bias, stride, pad, dilation, relu=relu)

    def _residual(self, step: Step, rs: list[np.ndarray]) -> np.ndarray:
        """Return the sum of a fused add's residuals rs (step.residuals' values) as the array the
        conv adds itself to: the in-place one when nothing later reads it, else a new one."""
        names = step.residuals
        if step.in_place is not None:
            i = names.index(step.in_place)
            rs = [rs[i], *rs[:i], *rs[i + 1 :]]
            acc = rs[0]
        else:
            acc = rs[0].copy()
        for r in rs[1:]:
            acc += r
        return acc

    def _fill_concat(self, step: Step, xs: list[np.ndarray], out: np.ndarray) -> np.ndarray:
        """Copy into out, a concat's output, the inputs not already written into their slice."""
        c0 = 0
        for src, x in zip(step.head.inputs, xs, strict=True):
            c1 = c0 + x.shape[3]
            if src not in step.filled:
                out[..., c0:c1] = x
            c0 = c1
        return out

    def _in_place(self, step: Step, xs: list[np.ndarray], relu: bool) -> np.ndarray:
        """Run an elementwise step writing over its input step.in_place (nothing reads it later)."""
        layer = step.head
        i = layer.inputs.index(step.in_place)
        x = xs[i]
        kind = layer.type
        if kind == "add":
            return layers.add([x, *xs[:i], *xs[i + 1 :]], relu=relu or layer.relu, out=x)
        if kind == "relu":
            return np.maximum(x, np.float32(0), out=x)
        if kind == "batchnorm":
            scale, shift, mean, var = (self._arrays[k] for k in layer.arrays)
            return layers.batchnorm(x, scale, shift, mean, var, eps=layer.eps, out=x)
        if kind == "clip":
            return layers.clip(x, layer.lo, layer.hi, out=x)
        return layers.sigmoid(x, out=x) if kind == "sigmoid" else layers.tanh(x, out=x)

    def _folded(self, conv: Layer, bn: Layer):
        """Return (packed filters, bias) of conv with batchnorm bn folded in (made once)."""
        key = (conv.name, bn.name)
        if key not in self._folds:
            a = self._arrays
            s, t, m, v = (a[k] for k in bn.arrays)
            scale, shift = layers.batchnorm_affine(s, t, m, v, eps=bn.eps)
            w = a[conv.weights_key()].astype(np.float64) * scale[:, None, None, None]
            b = a[conv.bias].astype(np.float64) if conv.bias is not None else 0.0
            bias = (b * scale + shift).astype(np.float32)
            self._folds[key] = (ops.ConvWeights(w.astype(np.float32), groups=conv.groups), bias)
        return self._folds[key]

    def gradients(self, images, target, wrt=("input",)) -> dict[str, np.ndarray]:
        """Return {name: gradient} of sum(channel k of layer L) for "input" and layers in wrt.

        target is {"layer": L, "channel": k or "top"}; see engine.backprop.
        """
        return backprop.gradients(self, images, target, wrt)

    def __repr__(self) -> str:
        return f"Model({self.name!r}, layers={self.layer_names})"
