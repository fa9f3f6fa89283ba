"""Time the engine's layers against a plain NumPy im2col baseline, PyTorch and ONNX Runtime.

    python bench/engine.py [--quick] [--n 1 32] [--layers conv1 1x1 ...] [--threads 2]
                           [--rounds 15] [--no-mem] [--native-blas]

Every implementation runs the same float32 layer with the same thread count; rounds alternate
between implementations (A/B/C/D, then again) and each figure is the median over rounds, so a
noisy neighbour slows all of them alike. Memory is the peak RSS growth of one call, measured in
a fresh subprocess per layer (see bench/README.md). Prints the machine first (CPU model, ISA,
sgemm GFLOP/s measured in this run, the engine's kernel choices: bench/machine.py), then one
table per N, with the kernel each layer ran and its share of sgemm, plus geometric means.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

# Rounds alternate between libraries in one process, so each one's thread pool must sleep, not
# spin, once its call returns, or it steals the cores from the next one.
# libgomp (Numba's and PyTorch's) reads this when it starts; ORT is told per session below.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# NumPy's OpenBLAS (the baseline) otherwise keeps its threads spinning for 2^28 cycles (~0.1 s)
# after each call: they held a core through the next rounds and every library after it ran at
# one-thread speed (measured: engine AlexNet conv1 N=32 30 -> 16.5 ms, ORT 31 -> 16 ms).
# The value is log2 of the cycles to spin; 4 is the smallest OpenBLAS accepts.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import status_kb  # noqa: E402


@dataclass(frozen=True)
class Layer:
    """One benchmark layer: square input H x H x C; conv K filters F x F in g groups, or a max
    pool."""

    name: str
    h: int
    c: int
    k: int
    f: int
    s: int = 1
    p: int = 0
    d: int = 1
    pool: bool = False
    g: int = 1

    @property
    def hout(self) -> int:
        return (self.h + 2 * self.p - self.d * (self.f - 1) - 1) // self.s + 1

    def flops(self, n: int) -> float:
        """2 * multiply-adds of one call over n images (0 for a pool)."""
        return 0.0 if self.pool else 2.0 * n * self.hout**2 * self.k * self.f**2 * self.c // self.g

    def io_bytes(self, n: int) -> int:
        """Bytes of the float32 input plus output."""
        return 4 * n * (self.h**2 * self.c + self.hout**2 * (self.c if self.pool else self.k))


SUITE = [
    Layer("alexnet-conv1", 227, 3, 96, 11, s=4),
    Layer("32x3-k32-f5", 32, 3, 32, 5, p=2),
    Layer("56x64-k64-f3", 56, 64, 64, 3, p=1),
    Layer("28x128-k128-f3", 28, 128, 128, 3, p=1),
    Layer("1x1-28x256-k64", 28, 256, 64, 1),
    Layer("dilated-56x64-d2", 56, 64, 64, 3, p=2, d=2),
    Layer("56x64-k128-s2", 56, 64, 128, 3, s=2, p=1),
    Layer("maxpool-3/2-55x96", 55, 96, 96, 3, s=2, pool=True),
    Layer("alexnet-conv2-g2", 27, 96, 256, 5, p=2, g=2),
    Layer("dw-56x128-f3", 56, 128, 128, 3, p=1, g=128),
    Layer("dw-28x256-f3-s2", 28, 256, 256, 3, s=2, p=1, g=256),
    # ResNeXt-50 32x4d's grouped 3x3s: 32 groups of 4 and of 8 channels
    Layer("resnext-56x128-g32", 56, 128, 128, 3, p=1, g=32),
    Layer("resnext-28x256-g32", 28, 256, 256, 3, p=1, g=32),
]


def data(layer: Layer, n: int):
    """Return x (N, H, W, C), w (K, F, F, C/g), b (K,) float32, fixed seed."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, layer.h, layer.h, layer.c), dtype=np.float32)
    w = rng.standard_normal((layer.k, layer.f, layer.f, layer.c // layer.g), dtype=np.float32) * 0.1
    return x, w, rng.standard_normal(layer.k, dtype=np.float32)


def engine_fn(layer: Layer, n: int, threads: int):
    import engine

    engine.set_threads(threads)
    x, w, b = data(layer, n)
    if layer.pool:
        return lambda: engine.max_pool2d(x, layer.f, layer.s, layer.p)
    # Filters packed once, as a Model does per layer and as ORT's session and PyTorch's
    # channels-last weights are prepared before their timed calls.
    cw = engine.ConvWeights(w, groups=layer.g)
    return lambda: engine.conv2d(x, cw, b, stride=layer.s, pad=layer.p, dilation=layer.d)


def numpy_fn(layer: Layer, n: int, threads: int):
    """The plain baseline: whole-batch im2col with sliding_window_view, then one matmul (one
    einsum over the groups when g > 1)."""
    from numpy.lib.stride_tricks import sliding_window_view

    x, w, b = data(layer, n)
    span = layer.d * (layer.f - 1) + 1
    wmat = w.reshape(layer.k, -1).T.copy()
    g = layer.g
    wg = w.reshape(g, layer.k // g, layer.f**2, layer.c // g)

    def run():
        fill = -np.inf if layer.pool else 0.0
        xp = np.pad(x, ((0, 0), (layer.p,) * 2, (layer.p,) * 2, (0, 0)), constant_values=fill)
        win = sliding_window_view(xp, (span, span), axis=(1, 2))
        win = win[:, :: layer.s, :: layer.s, :, :: layer.d, :: layer.d]  # (N, Ho, Wo, C, F, F)
        if layer.pool:
            return win.max(axis=(4, 5))
        if g > 1:
            cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(-1, layer.f**2, g, layer.c // g)
            out = np.einsum("mfgc,gkfc->mgk", cols, wg, optimize=True).reshape(-1, layer.k)
            return (out + b).reshape(n, layer.hout, layer.hout, layer.k)
        cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(-1, wmat.shape[0])
        return (cols @ wmat + b).reshape(n, layer.hout, layer.hout, layer.k)

    return run


def torch_fn(layer: Layer, n: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    x, w, b = data(layer, n)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2)  # NCHW view of NHWC memory: channels_last
    tw = torch.from_numpy(w).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    tb = torch.from_numpy(b)
    f = torch.nn.functional

    def run():
        with torch.inference_mode():
            if layer.pool:
                return f.max_pool2d(tx, layer.f, layer.s, layer.p)
            return f.conv2d(tx, tw, tb, layer.s, layer.p, layer.d, layer.g)

    return run


def ort_fn(layer: Layer, n: int, threads: int):
    """ONNX Runtime on NCHW input (its native layout; the transpose is not timed)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    x, w, b = data(layer, n)
    xn = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    k = layer.c if layer.pool else layer.k
    attrs = {"kernel_shape": [layer.f] * 2, "strides": [layer.s] * 2, "pads": [layer.p] * 4}
    if layer.pool:
        node = helper.make_node("MaxPool", ["x"], ["y"], **attrs)
        inits = []
    else:
        node = helper.make_node(
            "Conv", ["x", "w", "b"], ["y"], dilations=[layer.d] * 2, group=layer.g, **attrs
        )
        inits = [
            numpy_helper.from_array(np.ascontiguousarray(w.transpose(0, 3, 1, 2)), "w"),
            numpy_helper.from_array(b, "b"),
        ]
    graph = helper.make_graph(
        [node],
        layer.name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(xn.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, k, layer.hout, layer.hout])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    onnx.checker.check_model(model)
    return lambda: sess.run(None, {"x": xn})


IMPLS = {"engine": engine_fn, "numpy": numpy_fn, "torch": torch_fn, "ort": ort_fn}


def available() -> list[str]:
    names = ["engine", "numpy"]
    for name, module in (("torch", "torch"), ("ort", "onnxruntime")):
        try:
            __import__(module)
            names.append(name)
        except ImportError:
            pass
    return names


def time_layer(layer: Layer, n: int, threads: int, rounds: int, impls: list[str]) -> dict:
    """Return {impl: median seconds}, alternating implementations round by round."""
    fns = {name: IMPLS[name](layer, n, threads) for name in impls}
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def peak_growth(impl: str, layer_name: str, n: int, threads: int) -> float:
    """Run in a subprocess: peak RSS growth (bytes) over the first call at batch n.

    Code is loaded first, without touching this layer's buffers: engine.warmup() (tiny inputs)
    for the engine, so its column workspace is counted; one call at N=1 for the others.
    """
    layer = next(lay for lay in SUITE if lay.name == layer_name)
    if impl == "engine":
        import engine

        engine.warmup()
    else:
        IMPLS[impl](layer, 1, threads)()
    fn = IMPLS[impl](layer, n, threads)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = status_kb("VmRSS")
    out = fn()  # held until the peak is read, as a caller would hold it
    peak = status_kb("VmHWM")
    del out
    return (peak - before) * 1024.0


def measure_memory(impl: str, layer: Layer, n: int, threads: int) -> float | None:
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); from bench.engine import peak_growth; "
        f"print(peak_growth({impl!r}, {layer.name!r}, {n}, {threads}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        print(f"  memory {impl} {layer.name}: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return float(proc.stdout.split()[-1])


def geomean(values: list[float]) -> float:
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def kernel_of(layer: Layer, n: int) -> str:
    """Return the engine kernel this layer runs at batch n (engine.kernels)."""
    if layer.pool:
        return "maxpool"
    from engine import ops

    shape = (n, layer.h, layer.h, layer.c)
    w = (layer.k, layer.f, layer.f, layer.c // layer.g)
    return ops.conv_kernel(shape, w, layer.s, layer.p, layer.d, layer.g)


def report(
    n: int, rows: list[tuple[Layer, dict, dict]], impls: list[str], sgemm: float | None = None
) -> None:
    peers = [name for name in ("torch", "ort") if name in impls]
    head = f"{'layer':<20}{'kernel':<17}{'engine ms':>10}{'GFLOP/s':>9}{'%sgemm':>7}"
    head += "".join(f"{name + ' ms':>10}" for name in impls if name != "engine")
    head += "".join(f"{'/' + name:>8}" for name in impls if name != "engine")
    head += f"{'/best':>7}{'mem MB':>8}{'torch MB':>9}{'limit MB':>9}"
    print(f"\nN={n}")
    print(head)
    ratios: dict[str, list[float]] = {name: [] for name in impls if name != "engine"}
    ratios["best"] = []
    for layer, t, mem in rows:
        eng = t["engine"]
        gf = layer.flops(n) / eng / 1e9 if not layer.pool else float("nan")
        share = 100 * gf / sgemm if sgemm else float("nan")
        line = f"{layer.name:<20}{kernel_of(layer, n):<17}{eng * 1e3:>10.2f}{gf:>9.0f}{share:>7.0f}"
        line += "".join(f"{t[name] * 1e3:>10.2f}" for name in impls if name != "engine")
        for name in impls:
            if name != "engine":
                ratios[name].append(eng / t[name])
                line += f"{eng / t[name]:>8.2f}"
        best = eng / min(t[p] for p in peers) if peers else float("nan")
        ratios["best"].append(best)
        limit = 1.25 * layer.io_bytes(n) / 1e6
        fmt = lambda v: f"{v / 1e6:.1f}" if v is not None else "-"  # noqa: E731
        line += f"{best:>7.2f}{fmt(mem.get('engine')):>8}{fmt(mem.get('torch')):>9}{limit:>9.1f}"
        print(line)
    print(
        "geomean engine/"
        + ", engine/".join(f"{name} {geomean(v):.2f}x" for name, v in ratios.items() if v)
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--layers", nargs="+", help="substrings of layer names to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="5 rounds, no memory subprocesses")
    ap.add_argument("--no-mem", action="store_true")
    ap.add_argument(
        "--native-blas",
        action="store_true",
        help="re-run without OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE from the environment",
    )
    args = ap.parse_args(argv)
    if args.native_blas and ("OPENBLAS_CORETYPE" in os.environ or "OPENBLAS_L2_SIZE" in os.environ):
        drop = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    rounds = args.rounds or (5 if args.quick else 15)
    layers = [lay for lay in SUITE if not args.layers or any(s in lay.name for s in args.layers)]
    impls = available()
    import engine
    from bench.machine import describe

    engine.set_threads(args.threads)
    engine.warmup()  # compiles, then measures the kernel choices unless stored for this machine
    machine, sgemm = describe(args.threads)
    print(machine)
    # malloc as a convq worker sets it (worker.horse.keep_freed_memory), for every library in
    # this process: freed big blocks are reused by the next call instead of being mapped and
    # faulted in anew (importing PyTorch fixes glibc's mmap threshold at its 128 KiB default,
    # so the engine's 4 MB output of 32x3 at N=32 would be faulted in on every call).
    from worker.horse import keep_freed_memory

    keep_freed_memory()
    print(
        f"threads={args.threads} rounds={rounds} impls={','.join(impls)} "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')} "
        f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '(unset)')} "
        f"OPENBLAS_THREAD_TIMEOUT={os.environ.get('OPENBLAS_THREAD_TIMEOUT')}"
    )
    # Every timing first, then the memory subprocesses: timed after them, the engine's and
    # PyTorch's OpenMP layers ran up to 1.8x slower at N=1 for the rest of the run (ORT did not),
    # so interleaving them skewed every layer after the first.
    times = {n: [time_layer(lay, n, args.threads, rounds, impls) for lay in layers] for n in args.n}
    for n in args.n:
        rows = []
        for layer, t in zip(layers, times[n], strict=True):
            mem: dict[str, float | None] = {}
            if not (args.quick or args.no_mem):
                for impl in ("engine", "torch"):
                    if impl in impls:
                        mem[impl] = measure_memory(impl, layer, n, args.threads)
            rows.append((layer, t, mem))
        report(n, rows, impls, sgemm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
