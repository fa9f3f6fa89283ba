"""What machine a benchmark ran on: CPU model, ISA, measured sgemm, the engine's kernel choices.

    python bench/machine.py [--threads 2]

sgemm is NumPy's float32 matmul of two SIZE x SIZE matrices on `threads` threads, median of
ROUNDS, in a subprocess whose OpenBLAS runs its own kernels for this CPU (OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE dropped): the machine's practical GEMM peak, the yardstick of the engine's
GFLOP/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZE = 2048
ROUNDS = 7


def status_kb(key: str) -> int:
    """Return a field of /proc/self/status in KiB (VmRSS now, VmHWM the peak so far)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1])
    raise KeyError(key)


_SGEMM = f"""
import statistics, time
import numpy as np
a = np.random.default_rng(0).standard_normal(({SIZE}, {SIZE}), dtype=np.float32)
b = a.T.copy()
a @ b
ts = []
for _ in range({ROUNDS}):
    t0 = time.perf_counter()
    a @ b
    ts.append(time.perf_counter() - t0)
print(2 * {SIZE}**3 / statistics.median(ts) / 1e9)
"""


def sgemm_gflops(threads: int) -> float | None:
    """Return NumPy's float32 SIZE^3 matmul rate on `threads` threads (GFLOP/s), None if it
    failed."""
    drop = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-c", _SGEMM], env=env, capture_output=True, text=True, check=False
    )
    try:
        return float(proc.stdout.split()[-1])
    except (ValueError, IndexError):
        return None


def describe(threads: int) -> tuple[str, float | None]:
    """Return (lines naming the CPU, ISA, sgemm rate and kernel choices; the sgemm rate)."""
    from engine import _threads, kernels

    gflops = sgemm_gflops(threads)
    pool = _threads.max_threads()  # the choices are keyed by Numba's pool size
    rate = f"{gflops:.0f} GFLOP/s" if gflops is not None else "failed"
    names, source = zip(*(kernels.ranking(c, pool) for c in kernels.CLASSES), strict=True)
    choices = ", ".join(f"{c}: {r[0]}" for c, r in zip(kernels.CLASSES, names, strict=True))
    lines = [
        f"CPU: {kernels.cpu_model()} ({kernels.cpu_name()}, {os.cpu_count()} logical); "
        f"ISA: {kernels.isa()} [{' '.join(kernels.isa_flags())}]",
        f"sgemm ({SIZE}^2 float32, NumPy/OpenBLAS native, {threads} threads): {rate}",
        f"kernels ({'/'.join(sorted(set(source)))}, key {kernels.key(pool)}): {choices}",
    ]
    return "\n".join(lines), gflops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import engine

    engine.set_threads(args.threads)
    print(describe(args.threads)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
