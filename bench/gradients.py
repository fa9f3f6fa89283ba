"""Time Model.gradients(wrt=["input"]) against PyTorch's forward + backward of the same net.

    python bench/gradients.py [--n 32] [--threads 2] [--rounds 9] [--nets alexnet cnn10]
                              [--no-mem]

Both run float32 with the same thread count in the same process, rounds alternating, medians
reported; PyTorch's weights do not require grad, so it too computes only the input gradient.
The objective is the sum of channel 0 of the last layer. Peak memory is the RSS growth of one
call in a fresh subprocess, code loaded first (as bench/engine.py measures it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.machine import status_kb  # noqa: E402


def _conv(name, k, f, s=1, p=0):
    return {"name": name, "type": "conv", "filters": k, "size": f, "stride": s, "pad": p}


NETS = {
    # AlexNet's conv1 + ReLU + pool1 at 227 x 227.
    "alexnet": (
        (227, 3),
        [
            _conv("conv1", 96, 11, 4),
            {"name": "relu1", "type": "relu"},
            {"name": "pool1", "type": "maxpool", "size": 3, "stride": 2},
        ],
    ),
    # Ten layers, CIFAR-sized: four 3x3 convs with ReLUs and two max pools.
    "cnn10": (
        (32, 3),
        [
            _conv("c1", 32, 3, 1, 1),
            {"name": "r1", "type": "relu"},
            _conv("c2", 32, 3, 1, 1),
            {"name": "r2", "type": "relu"},
            {"name": "p1", "type": "maxpool", "size": 2, "stride": 2},
            _conv("c3", 64, 3, 1, 1),
            {"name": "r3", "type": "relu"},
            _conv("c4", 64, 3, 1, 1),
            {"name": "r4", "type": "relu"},
            {"name": "p2", "type": "maxpool", "size": 2, "stride": 2},
        ],
    ),
}


def build(net: str, n: int):
    """Return (model, images (N, H, W, C) float32, target) with fixed-seed weights."""
    from engine import Model

    (h, c), layers = NETS[net]
    spec = {"name": net, "input": {"height": h, "width": h, "channels": c}, "layers": layers}
    rng = np.random.default_rng(0)
    arrays, cin = {}, c
    for layer in layers:
        if layer["type"] == "conv":
            f, k = layer["size"], layer["filters"]
            scale = np.sqrt(2.0 / (f * f * cin))
            arrays[f"{layer['name']}.w"] = (rng.standard_normal((k, f, f, cin)) * scale).astype(
                np.float32
            )
            arrays[f"{layer['name']}.b"] = np.zeros(k, np.float32)
            cin = k
    x = rng.standard_normal((n, h, h, c), dtype=np.float32)
    return Model.from_arrays(spec, arrays), x, {"layer": layers[-1]["name"], "channel": 0}


def engine_fn(net: str, n: int, threads: int):
    import engine

    engine.set_threads(threads)
    model, x, target = build(net, n)
    return lambda: model.gradients(x, target, ["input"])["input"]


def torch_fn(net: str, n: int, threads: int):
    import torch

    torch.set_num_threads(threads)
    model, x, _ = build(net, n)
    f = torch.nn.functional
    weights = model.arrays()
    ops = []
    for layer in NETS[net][1]:
        if layer["type"] == "conv":
            w = torch.from_numpy(weights[f"{layer['name']}.w"]).permute(0, 3, 1, 2)
            w = w.contiguous(memory_format=torch.channels_last)
            b = torch.from_numpy(weights[f"{layer['name']}.b"])
            ops.append(
                lambda t, w=w, b=b, s=layer["stride"], p=layer["pad"]: f.conv2d(t, w, b, s, p)
            )
        elif layer["type"] == "relu":
            ops.append(f.relu)
        else:
            ops.append(lambda t, k=layer["size"], s=layer["stride"]: f.max_pool2d(t, k, s))

    def run():
        tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_(True)  # channels_last
        t = tx
        for op in ops:
            t = op(t)
        t[:, 0].sum().backward()
        return tx.grad

    return run


IMPLS = {"engine": engine_fn, "torch": torch_fn}


def peak_growth(impl: str, net: str, n: int, threads: int) -> float:
    """Run in a subprocess: peak RSS growth (bytes) over the first call at batch n.

    Code is loaded first without touching this batch's buffers (as bench/engine.py does):
    the engine's kernels by its warmups on tiny inputs, PyTorch's by one call at N=1.
    """
    from worker.horse import keep_freed_memory

    keep_freed_memory()
    if impl == "engine":
        import engine

        engine.warmup()
        engine.backward.warmup()
    else:
        IMPLS[impl](net, 1, threads)()
    fn = IMPLS[impl](net, n, threads)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = status_kb("VmRSS")
    out = fn()
    peak = status_kb("VmHWM")
    del out
    return (peak - before) * 1024.0


def measure_memory(impl: str, net: str, n: int, threads: int) -> float | None:
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); from bench.gradients import peak_growth; "
        f"print(peak_growth({impl!r}, {net!r}, {n}, {threads}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        print(f"  memory {impl} {net}: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return float(proc.stdout.split()[-1])


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--nets", nargs="+", default=list(NETS))
    ap.add_argument("--no-mem", action="store_true")
    args = ap.parse_args(argv)
    import engine
    from worker.horse import keep_freed_memory

    engine.warmup()
    keep_freed_memory()
    print(f"CPU: {cpu_model()}  threads={args.threads} N={args.n} rounds={args.rounds}")
    print(
        f"{'net':10} {'engine ms':>10} {'torch ms':>10} {'ratio':>6} {'eng MB':>7} {'torch MB':>8}"
    )
    for net in args.nets:
        fns = {name: make(net, args.n, args.threads) for name, make in IMPLS.items()}
        outs = {name: fn() for name, fn in fns.items()}
        got, want = outs["engine"], outs["torch"].permute(0, 2, 3, 1).numpy()
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        mem = {
            name: None if args.no_mem else measure_memory(name, net, args.n, args.threads)
            for name in fns
        }
        mb = {k: "-" if v is None else f"{v / 2**20:.0f}" for k, v in mem.items()}
        print(
            f"{net:10} {med['engine']:10.2f} {med['torch']:10.2f} "
            f"{med['engine'] / med['torch']:6.2f} {mb['engine']:>7} {mb['torch']:>8}"
            f"   (max rel diff {err:.1e})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
