"""Time whole networks: the engine vs ONNX Runtime vs PyTorch channels-last, same process.

    python bench/networks.py [--nets resnet18 ...] [--rounds 7] [--threads 2] [--no-mem] [--kernels]

Each network of bench/torch_nets.py (random weights) is exported to ONNX by PyTorch and
imported by engine.onnx_import; the engine's Model, an ONNX Runtime session (dynamic batch) and
the torch module in channels-last memory then run the same float32 batch with the same thread
count. Rounds alternate between the three and each figure is the median over rounds. The engine
is asked for the final output only, so a run frees each layer once nothing later reads it.
Memory is the peak RSS growth of one call, measured in a fresh subprocess per network, batch
and implementation. Prints the machine (CPU model, ISA, sgemm GFLOP/s measured in this run, the
kernel choices: bench/machine.py), one row per network and batch with the engine kernels its
conv layers ran (every layer's with --kernels), and the geometric mean of engine / the faster
peer. The process's malloc keeps freed blocks for reuse, as a convq worker's does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings

# Alternating libraries in one process: each thread pool must sleep, not spin, between calls.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))

# The engine before PyTorch: importing it sets GOMP_SPINCOUNT (its threads spin ~50 us between
# layers before sleeping, as in a convq worker), which GNU OpenMP reads once, when the first
# library that links it loads; torch first made the engine's threads sleep after every kernel
# and a 2-thread conv at N=1 ran at about 1-thread speed (ResNet-18 layer3 3x3: 0.65 vs 0.40 ms).
import engine  # noqa: E402

# isort: split
import torch_nets  # noqa: E402

from bench.machine import describe, status_kb  # noqa: E402

IMPLS = ("engine", "ort", "torch")


def export(name: str) -> tuple[object, bytes, int]:
    """Return (torch module, .onnx bytes with a symbolic batch, input side)."""
    net = torch_nets.build(name)
    side = torch_nets.NETWORKS[name][1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        data = torch_nets.to_onnx(net, side)
    return net, data, side


def make(impl: str, name: str, n: int, threads: int):
    """Return a no-argument function that runs network name on a batch of n images."""
    net, data, side = export(name)
    x = np.random.default_rng(0).standard_normal((n, 3, side, side), dtype=np.float32)
    if impl == "engine":
        from engine.onnx_import import convert

        engine.set_threads(threads)
        spec, arrays = convert(data)
        model = engine.Model.from_arrays(spec, arrays)
        x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        last = [model.layer_names[-1]]
        return lambda: model.run(x_nhwc, last)
    if impl == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        return lambda: sess.run(None, {"image": x})
    import torch

    torch.set_num_threads(threads)
    net = net.to(memory_format=torch.channels_last)
    tx = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode():
            return net(tx)

    return run


def used_kernels(name: str, n: int, threads: int, each: bool = False) -> str:
    """Return how many conv layers of the network ran each engine kernel at batch n (with
    each, every conv layer and its kernel)."""
    import collections

    from engine.onnx_import import convert

    engine.set_threads(threads)
    _, data, side = export(name)
    model = engine.Model.from_arrays(*convert(data))
    model.run(np.zeros((n, side, side, 3), np.float32), [model.layer_names[-1]])
    if each:
        return ", ".join(f"{layer}: {kernel}" for layer, kernel in model.kernels.items())
    counts = collections.Counter(model.kernels.values())
    return ", ".join(f"{k} x{v}" for k, v in counts.most_common())


def time_net(name: str, n: int, threads: int, rounds: int) -> dict[str, float]:
    """Return {impl: median seconds}, alternating implementations round by round."""
    fns = {impl: make(impl, name, n, threads) for impl in IMPLS}
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {impl: [] for impl in fns}
    for _ in range(rounds):
        for impl, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[impl].append(time.perf_counter() - t0)
    return {impl: statistics.median(ts) for impl, ts in times.items()}


def peak_growth(impl: str, name: str, n: int, threads: int) -> float:
    """Run in a subprocess: peak RSS growth (bytes) of one call at batch n.

    Code is loaded first without touching this network's buffers: engine.warmup() (tiny
    inputs) for the engine, one call at N=1 for the others (as bench/engine.py does).
    """
    if impl == "engine":
        engine.warmup()
    else:
        make(impl, name, 1, threads)()
    fn = make(impl, name, n, threads)
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    before = status_kb("VmRSS")
    out = fn()
    peak = status_kb("VmHWM")
    del out
    return (peak - before) * 1024.0


def measure_memory(impl: str, name: str, n: int, threads: int) -> float | None:
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); from bench.networks import peak_growth; "
        f"print(peak_growth({impl!r}, {name!r}, {n}, {threads}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        print(f"  memory {impl} {name} N={n}: {proc.stderr.strip().splitlines()[-1:]}")
        return None
    return float(proc.stdout.split()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nets", nargs="+", default=list(torch_nets.NETWORKS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--no-mem", action="store_true", help="skip the memory subprocesses")
    ap.add_argument("--kernels", action="store_true", help="print every conv layer's kernel")
    args = ap.parse_args(argv)
    engine.set_threads(args.threads)
    engine.warmup()  # compiles, then measures the kernel choices unless stored for this machine
    print(describe(args.threads)[0])
    # malloc as a convq worker sets it (worker.horse.keep_freed_memory), for every library in
    # this process as in bench/engine.py: a run's freed activations are reused by the next
    # instead of being mapped and faulted in anew (ONNX Runtime keeps its own arena either way).
    from worker.horse import keep_freed_memory

    keep_freed_memory()
    print(f"threads={args.threads} rounds={args.rounds}; medians; "
          "memory = peak RSS growth of one call")  # fmt: skip
    head = f"{'network':<16}{'N':>4}{'engine ms':>11}{'ORT ms':>9}{'torch ms':>10}"
    head += f"{'/best':>7}{'eng MB':>8}{'ORT MB':>8}{'torch MB':>9}"
    print(head)
    ratios = []
    for name in args.nets:
        for n in torch_nets.NETWORKS[name][2]:
            t = time_net(name, n, args.threads, args.rounds)
            ratio = t["engine"] / min(t["ort"], t["torch"])
            ratios.append(ratio)
            mem = {impl: None for impl in IMPLS}
            if not args.no_mem:
                mem = {impl: measure_memory(impl, name, n, args.threads) for impl in IMPLS}
            row = f"{name:<16}{n:>4}{1e3 * t['engine']:>11.2f}{1e3 * t['ort']:>9.2f}"
            row += f"{1e3 * t['torch']:>10.2f}{ratio:>7.2f}"
            row += "".join(
                f"{'-' if mem[i] is None else f'{mem[i] / 2**20:.0f}':>{w}}"
                for i, w in zip(IMPLS, (8, 8, 9), strict=True)
            )
            print(row, flush=True)
            print(f"  kernels: {used_kernels(name, n, args.threads, args.kernels)}")
    geo = float(np.exp(np.mean(np.log(ratios))))
    print(f"geomean engine / faster peer: {geo:.2f}; worst {max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
