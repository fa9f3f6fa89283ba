"""Peak activation memory of a graph run: asking for the last layer vs every layer.

A ResNet-like network (stem, `--blocks` residual blocks of conv-bn-relu-conv-bn-add+relu, global
pool, classifier) with random weights. For each request the peak of NumPy allocations during
Model.run is taken with tracemalloc (NumPy reports its array buffers to it), beside
Model.memory's estimate and the sum of every layer's activations.

    python -m bench.graph_memory [--n 8] [--size 56] [--channels 64] [--blocks 4]
                                 [--net resnet|inception]

--net inception chains inception blocks instead (four conv branches concatenated), where the
conv branches write straight into their concat's output.
"""

from __future__ import annotations

import argparse
import platform
import time
import tracemalloc

import numpy as np

from engine import Model


def resnet_like(size: int, c: int, blocks: int) -> tuple[dict, dict]:
    """Return (spec, arrays) of a stem conv and `blocks` basic residual blocks at c channels."""
    rng = np.random.default_rng(0)
    layers: list[dict] = [{"name": "stem", "type": "conv", "filters": c, "size": 3, "pad": 1}]
    layers.append({"name": "stem_relu", "type": "relu"})
    arrays = {"stem.w": rng.standard_normal((c, 3, 3, 3), np.float32) * 0.2}
    arrays["stem.b"] = np.zeros(c, np.float32)
    prev = "stem_relu"
    for i in range(blocks):
        for j in (1, 2):
            conv = {"name": f"b{i}c{j}", "type": "conv", "filters": c, "size": 3, "pad": 1}
            layers += [conv | {"bias": None}, {"name": f"b{i}bn{j}", "type": "batchnorm"}]
            arrays[f"b{i}c{j}.w"] = rng.standard_normal((c, 3, 3, c), np.float32) / (3 * c**0.5)
            for key, value in (("scale", 1.0), ("shift", 0.0), ("mean", 0.0), ("var", 1.0)):
                arrays[f"b{i}bn{j}.{key}"] = np.full(c, value, np.float32)
            if j == 1:
                layers.append({"name": f"b{i}r", "type": "relu"})
        layers[-5]["input"] = prev  # the block's first conv reads the block input
        layers.append({"name": f"b{i}", "type": "add", "inputs": [f"b{i}bn2", prev], "relu": True})
        prev = f"b{i}"
    layers += [
        {"name": "pool", "type": "globalavgpool"},
        {"name": "fc", "type": "conv", "filters": 10, "size": 1},
        {"name": "prob", "type": "softmax"},
    ]
    arrays["fc.w"] = rng.standard_normal((10, 1, 1, c), np.float32)
    arrays["fc.b"] = np.zeros(10, np.float32)
    spec = {"name": "resnet-like", "input": {"height": size, "width": size, "channels": 3}}
    return spec | {"layers": layers}, arrays


def inception_like(size: int, c: int, blocks: int) -> tuple[dict, dict]:
    """Return (spec, arrays) of a stem conv and `blocks` inception blocks of c channels each:
    1x1 | 1x1 -> 3x3 | 1x1 -> 5x5 | 3x3 max pool -> 1x1, concatenated (c/4 channels each)."""
    rng = np.random.default_rng(0)
    q = c // 4
    arrays: dict[str, np.ndarray] = {}

    def conv(name: str, k: int, f: int, src: str, cin: int) -> list[dict]:
        arrays[f"{name}.w"] = rng.standard_normal((k, f, f, cin), np.float32) / np.sqrt(f * f * cin)
        arrays[f"{name}.b"] = np.zeros(k, np.float32)
        layer = {"name": name, "type": "conv", "filters": k, "size": f, "pad": f // 2}
        return [layer | {"input": src}, {"name": f"{name}_relu", "type": "relu"}]

    layers = conv("stem", c, 3, "image", 3)
    prev = "stem_relu"
    for i in range(blocks):
        b = f"i{i}"
        layers += conv(f"{b}a", q, 1, prev, c)
        layers += conv(f"{b}b1", q, 1, prev, c) + conv(f"{b}b", q, 3, f"{b}b1_relu", q)
        layers += conv(f"{b}c1", q, 1, prev, c) + conv(f"{b}c", q, 5, f"{b}c1_relu", q)
        layers.append({"name": f"{b}p1", "type": "maxpool", "size": 3, "pad": 1, "stride": 1})
        layers[-1]["input"] = prev
        layers += conv(f"{b}p", q, 1, f"{b}p1", c)
        ends = [f"{b}{x}_relu" for x in ("a", "b", "c", "p")]
        layers.append({"name": b, "type": "concat", "inputs": ends})
        prev = b
    layers += [{"name": "pool", "type": "globalavgpool", "input": prev}]
    spec = {"name": "inception-like", "input": {"height": size, "width": size, "channels": 3}}
    return spec | {"layers": layers}, arrays


def measure(model: Model, x: np.ndarray, outputs) -> tuple[int, float]:
    """Return (peak traced bytes above the start, seconds) of one run."""
    model.run(x, outputs=outputs)  # warm: compiled kernels, packed filters, scratch buffers
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    t = time.perf_counter()
    result = model.run(x, outputs=outputs)
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return peak, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--net", choices=("resnet", "inception"), default="resnet")
    args = parser.parse_args()
    build = resnet_like if args.net == "resnet" else inception_like
    spec, arrays = build(args.size, args.channels, args.blocks)
    model = Model.from_arrays(spec, arrays)
    x = np.random.default_rng(1).standard_normal((args.n, args.size, args.size, 3), np.float32)
    shapes = model.output_shapes(args.size, args.size)
    total = sum(4 * args.n * int(np.prod(s)) for s in shapes.values())
    mb = 1 / 2**20
    print(
        f"{platform.processor() or platform.machine()}; {len(shapes)} layers, N={args.n}, "
        f"{args.size}x{args.size}, C={args.channels}; all activations {total * mb:.1f} MB"
    )
    print(f"{'outputs':<8} {'traced peak MB':>15} {'Model.memory MB':>16} {'run ms':>8}")
    for outputs in (None, "all"):
        peak, seconds = measure(model, x, outputs)
        estimate = model.memory(args.n, args.size, args.size, outputs)
        label = "last" if outputs is None else outputs
        print(f"{label:<8} {peak * mb:>15.1f} {estimate * mb:>16.1f} {seconds * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
