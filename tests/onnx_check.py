"""Test helpers: run a graph spec layer by layer with PyTorch, and an .onnx with every tensor out.

run_spec_torch follows the graph spec format's definitions with torch.nn.functional, written
independently of the engine, so an importer bug and an engine bug cannot cancel out; the tests
also run the engine's Model where it knows every layer type of the spec.
"""

from __future__ import annotations

import numpy as np


def run_spec_torch(spec: dict, arrays: dict, x_nhwc: np.ndarray) -> dict[str, np.ndarray]:
    """Return {layer name: NHWC output} of every layer of spec on x (N, H, W, C)."""
    import torch
    import torch.nn.functional as F

    def arr(key):
        return torch.from_numpy(np.array(arrays[key], np.float32))

    def pad4(t, p, value=0.0):
        return F.pad(t, (p[1], p[3], p[0], p[2]), value=value)

    out: dict[str, torch.Tensor] = {"image": torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)}
    previous = "image"
    for layer in spec["layers"]:
        name, kind = layer["name"], layer["type"]
        srcs = [out[s] for s in layer.get("inputs", [layer.get("input", previous)])]
        x = srcs[0]
        if kind == "conv":
            w = arr(layer.get("weights") or f"{name}.w").permute(0, 3, 1, 2)
            b = arr(layer["bias"]) if layer.get("bias") else None
            y = F.conv2d(
                pad4(x, layer["pad"]),
                w,
                b,
                stride=layer["stride"],
                dilation=layer["dilation"],
                groups=layer.get("groups", 1),
            )
        elif kind == "maxpool":
            y = F.max_pool2d(
                pad4(x, layer["pad"], -np.inf),
                layer["size"],
                layer["stride"],
                dilation=layer["dilation"],
            )
        elif kind == "avgpool":
            size, stride = layer["size"], layer["stride"]
            area = size[0] * size[1]
            total = F.avg_pool2d(pad4(x, layer["pad"]), size, stride) * area
            if layer.get("count_pad"):
                y = total / area
            else:
                ones = torch.ones_like(x[:1, :1])
                y = total / (F.avg_pool2d(pad4(ones, layer["pad"]), size, stride) * area)
        elif kind == "relu":
            y = torch.relu(x)
        elif kind == "sigmoid":
            y = torch.sigmoid(x)
        elif kind == "tanh":
            y = torch.tanh(x)
        elif kind == "clip":
            y = torch.clamp(x, layer.get("min"), layer.get("max"))
        elif kind == "softmax":
            y = torch.softmax(x, dim=1)
        elif kind == "add":
            y = sum(srcs[1:], srcs[0])
            y = torch.relu(y) if layer.get("relu") else y
        elif kind == "concat":
            y = torch.cat(srcs, dim=1)
        elif kind == "batchnorm":
            c = (1, -1, 1, 1)
            mean, var = arr(f"{name}.mean").view(c), arr(f"{name}.var").view(c)
            scale, shift = arr(f"{name}.scale").view(c), arr(f"{name}.shift").view(c)
            y = (x - mean) / torch.sqrt(var + layer.get("eps", 1e-5)) * scale + shift
        elif kind == "lrn":
            y = F.local_response_norm(
                x, layer["size"], layer.get("alpha", 1e-4), layer.get("beta", 0.75),
                layer.get("bias", 1.0),
            )  # fmt: skip
        elif kind == "globalavgpool":
            y = x.mean(dim=(2, 3), keepdim=True)
        elif kind == "globalmaxpool":
            y = x.amax(dim=(2, 3), keepdim=True)
        else:
            raise AssertionError(f"run_spec_torch does not know layer type {kind!r}")
        out[name] = y
        previous = name
    del out["image"]
    return {k: v.permute(0, 2, 3, 1).numpy() for k, v in out.items()}


def onnxruntime_all(data: bytes, x_nchw: np.ndarray, tensors: list[str]) -> dict[str, np.ndarray]:
    """Run the .onnx with each of `tensors` made a graph output; return them by name."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(data)
    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    got = session.run(tensors, {name: x_nchw})
    return dict(zip(tensors, got, strict=True))


def as_nhwc(a: np.ndarray) -> np.ndarray:
    """ONNX (N, C, H, W) or (N, K) to our (N, H, W, C) / (N, 1, 1, K)."""
    return a[:, None, None, :] if a.ndim == 2 else a.transpose(0, 2, 3, 1)


def assert_every_layer_matches(data: bytes, x_nchw: np.ndarray, got: dict, tensors: dict):
    """Assert each layer in got (NHWC) equals ONNX Runtime's tensor for it."""
    want = onnxruntime_all(data, x_nchw, list(tensors.values()))
    assert set(got) == set(tensors)
    for layer, tensor in tensors.items():
        w = as_nhwc(want[tensor])
        assert got[layer].shape == w.shape, layer
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(got[layer], w, rtol=2e-4, atol=2e-5 * scale, err_msg=layer)
