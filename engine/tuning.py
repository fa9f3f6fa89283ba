"""Measure which conv kernel runs each shape class fastest on this machine, and remember it.

ensure() (called by engine.warmup: `convq warmup`, every worker's start) looks up this machine's
key (engine.kernels.key: CPU model, ISA flags, pool size, convq version) in the choices file
beside Numba's cache; without an entry it times every kernel that applies to one representative
layer per shape class (SAMPLES), rounds alternating between the candidates, and stores each
class's kernels fastest first, by the CPU time of their fastest round (on a shared machine a
neighbour's load stretches the wall clock, not the work). Each kernel is called WARM_CALLS
times untimed first (loading its code is not its speed); one still HOPELESS times slower than
the best after PRUNE_AFTER timed rounds (a family compiled for a CPU without its ISA) is not
timed again.
Measuring takes at most about BUDGET seconds; a job never measures (without a measurement a
layer runs its ISA's default, engine.kernels.DEFAULTS). `convq info` (main) shows the result.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from . import _args, _threads, kernels, ops
from .geometry import Window

# One representative layer per class: (N, H, W, C, K, F, stride, pad, groups), 15-230 M
# multiply-adds.
SAMPLES = {
    "1x1": (4, 28, 28, 128, 128, 1, 1, 0, 1),
    "3x3s1": (4, 28, 28, 64, 64, 3, 1, 1, 1),
    # a network's first conv (ResNet's 7x7/2 with 64 filters, on 56x56 images): with 32
    # filters (5x5/1, measured until 2026-12-04) the avx512 family's 3x32 block won on an
    # AVX2-only Zen 1, which then ran AlexNet's conv1 (96 filters) 1.8x slower than avx2's
    "thin": (4, 56, 56, 3, 64, 7, 2, 3, 1),
    "unpadded": (4, 33, 33, 48, 96, 3, 2, 0, 1),
    "padded": (4, 28, 28, 64, 128, 3, 2, 1, 1),
    "grouped": (4, 28, 28, 128, 128, 3, 1, 1, 32),
}
BUDGET = 3.0  # s: the most one measurement of every class may take (checked between rounds)
ROUNDS = 15  # most rounds per class; each round times every candidate once
HOPELESS = 4.0  # a kernel this many times the fastest after PRUNE_AFTER rounds: not timed again
PRUNE_AFTER = 3  # timed rounds before that cut (a single round can be a neighbour's spike)
MARGIN = 0.1  # how much faster than the ISA's default a kernel must be to displace it
WARM_CALLS = 2  # untimed calls of each candidate before its first timed round


def candidates(cls: str) -> list[str]:
    """Return every kernel that applies to the class's representative layer."""
    n, h, w, c, k, f, s, p, g = SAMPLES[cls]
    wout = (w + 2 * p - f) // s + 1
    shape = kernels.ConvShape(c, k, f, f, s, s, p > 0, wout, g)
    assert kernels.shape_class(shape) == cls
    return [name for name in kernels.KERNELS if kernels.applies(name, shape)]


def measure(budget: float = BUDGET) -> dict[str, dict[str, float]]:
    """Return {class: {kernel: ms}} for every class, timed on this machine.

    The time of a call is the CPU time of the process (every thread's), the least over rounds:
    on a shared machine a descheduled thread stretches the wall clock, not the work.
    """
    rng = np.random.default_rng(0)
    deadline = time.monotonic() + budget
    share = budget / len(SAMPLES)
    result = {}
    for cls, (n, h, w, c, k, f, s, p, g) in SAMPLES.items():
        # read-only inputs, as conv2d passes them: the same compiled kernels a run uses
        x = _args.input_array(rng.standard_normal((n, h, w, c), dtype=np.float32))
        cw = ops.ConvWeights(
            rng.standard_normal((k, f, f, c // g), dtype=np.float32) * 0.1, groups=g
        )
        win = Window.make(f, s, p)
        # the kernel alone, into one output: a fresh one per call is page faults, not kernel
        out = np.empty((n, *win.out_hw(h, w), k), np.float32)
        bias = _args.read_only(np.zeros(k, np.float32))
        names = candidates(cls)
        times: dict[str, list[float]] = {name: [] for name in names}
        conv = (x, cw, bias, out, win)
        # Untimed calls first: the first packs the filters and loads the kernel's code, which for
        # a block width that warmup's tiny layers never ran means reading Numba's cache (or
        # compiling); the second still ran 2-3x slow (caches, the pool's threads settling). Timed,
        # they once made every avx512 kernel of a Zen 5 machine look hopeless.
        with kernels.compile_lock():
            for _ in range(WARM_CALLS):
                for name in names:
                    _call(name, conv)
        until = min(deadline, time.monotonic() + share)
        for round_ in range(ROUNDS):
            for name in names:
                t0 = time.process_time()
                _call(name, conv)
                times[name].append(time.process_time() - t0)
            if round_ + 1 == PRUNE_AFTER:  # a kernel this much slower cannot win: time it no more
                best = min(min(ts) for ts in times.values())
                names = [n for n in names if min(times[n]) <= HOPELESS * best]
            elif round_ + 1 > PRUNE_AFTER and time.monotonic() > until:
                break
        # a hopeless kernel keeps its best of PRUNE_AFTER rounds, which ranks it last
        result[cls] = {n: 1e3 * min(ts) for n, ts in times.items()}
    return result


def _call(name: str, conv: tuple) -> None:
    """Run conv (x, filters, bias, out, window) once through kernel name, without ReLU."""
    x, cw, bias, out, win = conv
    with kernels.forced([name]):
        if cw.groups > 1:
            ops._grouped_conv(x, cw, bias, out, win, False)
        else:
            ops._dense_conv(x, cw, bias, out, win, False)


def rank(timings: dict[str, dict[str, float]], isa: str | None = None) -> dict[str, list[str]]:
    """Return each class's kernels fastest first, except that the ISA's default stays first
    unless another is more than MARGIN faster (a noisy round should not flip a choice)."""
    defaults = kernels.DEFAULTS[isa or kernels.isa()]
    rankings = {}
    for cls, ms in timings.items():
        order = sorted(ms, key=ms.__getitem__)
        default = defaults[cls][0]
        if order and default in ms and ms[order[0]] * (1 + MARGIN) >= ms[default]:
            order.remove(default)
            order.insert(0, default)
        if order:
            rankings[cls] = order
    return rankings


def ensure(force: bool = False) -> dict:
    """Measure and store this machine's choices unless stored already; return the entry."""
    threads = _threads.max_threads()
    with kernels.choices_lock():  # one process measures; the others then read its entry
        kernels.forget()
        entry = kernels.read_choices().get(kernels.key(threads))
        if not force and isinstance(entry, dict) and kernels.measured(threads):
            return entry
        return _measure_and_store(threads)


def _measure_and_store(threads: int) -> dict:
    before = ops.get_threads()
    ops.set_threads(threads)  # measured on the whole pool, whatever this process runs on
    _threads.enter()
    started = time.monotonic()
    try:
        timings = measure()
    finally:
        ops.set_threads(before)
    entry = {
        **kernels.key_fields(threads),
        "isa": kernels.isa(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 2),
        "ms": {cls: {k: round(v, 4) for k, v in ms.items()} for cls, ms in timings.items()},
        "rankings": rank(timings),
    }
    kernels.write_choice(threads, entry)
    kernels.remember(threads, entry["rankings"])
    return entry


def info(threads: int) -> dict:
    """Return the kernel choices in effect for a pool of `threads` threads and their source."""
    stored = kernels.read_choices().get(kernels.key(threads))
    classes = {}
    for cls in kernels.CLASSES:
        names, source = kernels.ranking(cls, threads)
        classes[cls] = {"kernels": names, "source": source}
    return {
        **kernels.key_fields(threads),
        "isa": kernels.isa(),
        "key": kernels.key(threads),
        "choices_file": kernels.choices_path(),
        "measured_at": stored.get("measured_at") if isinstance(stored, dict) else None,
        "forced": os.environ.get(kernels.ENV) or None,
        "classes": classes,
        "ms": stored.get("ms") if isinstance(stored, dict) else None,
    }


def main(argv: list[str] | None = None) -> int:
    """`convq info`: print the CPU, ISA, cache key and file, and each class's kernels."""
    ap = argparse.ArgumentParser(
        prog="convq info", description="show the engine's kernel choices on this machine"
    )
    ap.add_argument("--measure", action="store_true", help="measure now (and store) first")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    threads = _threads.max_threads()
    if args.measure:
        ops.warmup(tune=False)
        ensure(force=True)
    data = info(threads)
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    print(f"CPU:      {data['cpu']} ({data['cpu_name']})")
    print(f"ISA:      {data['isa']} [{' '.join(data['isa_flags'])}]")
    print(f"threads:  {threads} (Numba's pool)    convq {data['version']}")
    when = data["measured_at"] or "not measured yet (convq warmup measures)"
    print(f"choices:  {data['choices_file']}  key {data['key']}: {when}")
    if data["forced"]:
        print(f"forced:   {kernels.ENV}={data['forced']}")
    for cls, row in data["classes"].items():
        ms = (data["ms"] or {}).get(cls, {})
        ranked = ", ".join(
            f"{n} {ms[n]:.3f} ms" if n in ms else n for n in row["kernels"]
        )  # fastest first when measured
        print(f"  {cls:<9} [{row['source']}] {ranked}")
    return 0
