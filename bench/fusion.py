"""The plan's residual-add and concat fusions on whole networks: fused vs not, same process.

    python bench/fusion.py [--nets resnet18 googlenet-3b] [--rounds 15] [--threads 2]

Each network of bench/torch_nets.py is exported and imported as bench/networks.py does; one
Model then runs the final output only with the plan as it is (a conv's residual add and ReLU in
its store, conv branches written straight into their concat's output) and with those two turned
off (conv steps end at batchnorm/relu; every concat copies its inputs), the state before them.
The two alternate round by round; each figure is the median. Prints the CPU model beside them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.append(os.path.join(ROOT, "bench"))

# The engine before PyTorch, as in bench/networks.py (its GOMP_SPINCOUNT must reach GNU OpenMP
# before torch loads it, or the engine's threads sleep after every kernel).
import engine  # noqa: E402
from engine import plan as plan_module  # noqa: E402
from engine.onnx_import import convert  # noqa: E402

# isort: split
import torch_nets  # noqa: E402

from bench.machine import describe  # noqa: E402

FUSED = plan_module._FOLLOWERS["conv"]
UNFUSED = tuple(kind for kind in FUSED if kind != "add")


def set_mode(model: engine.Model, fused: bool, depth: dict) -> None:
    """Switch the residual-add and concat-slice fusions on or off (plans are remade)."""
    plan_module._FOLLOWERS["conv"] = FUSED if fused else UNFUSED
    model._depth = depth if fused else None
    model._plans.clear()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=["resnet18", "googlenet-3b"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    engine.set_threads(args.threads)
    print(describe(args.threads)[0])
    print(f"threads={args.threads} rounds={args.rounds}; medians")
    print(f"{'network':<14} {'N':>3} {'unfused ms':>11} {'fused ms':>9} {'fused/unfused':>14}")
    for name in args.nets:
        net = torch_nets.build(name)
        side = torch_nets.NETWORKS[name][1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec, arrays = convert(torch_nets.to_onnx(net, side))
        model = engine.Model.from_arrays(spec, arrays)
        depth = model._depth
        last = [model.layer_names[-1]]
        for n in torch_nets.NETWORKS[name][2]:
            x = np.random.default_rng(0).standard_normal((n, side, side, 3), dtype=np.float32)
            times: dict[bool, list[float]] = {False: [], True: []}
            outs = {}
            for fused in (False, True):  # warm both plans
                set_mode(model, fused, depth)
                outs[fused] = model.run(x, last)[last[0]]
            np.testing.assert_allclose(outs[True], outs[False], rtol=2e-4, atol=1e-5)
            for _ in range(args.rounds):
                for fused in (False, True):
                    set_mode(model, fused, depth)
                    t = time.perf_counter()
                    model.run(x, last)
                    times[fused].append(time.perf_counter() - t)
            a, b = (statistics.median(times[f]) * 1e3 for f in (False, True))
            print(f"{name:<14} {n:>3} {a:>11.2f} {b:>9.2f} {b / a:>14.3f}")
        set_mode(model, True, depth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
