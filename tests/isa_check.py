"""Check every conv kernel against the reference in this process, whatever ISA Numba targets.

    NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES= python -m tests.isa_check   # AVX2 code
    NUMBA_CPU_NAME=generic python -m tests.isa_check                        # portable code

Run by tests/unit/test_kernels.py in subprocesses (with NUMBA_CACHE_DIR in a temporary
directory) so the AVX2 and portable builds are tested on any CI machine. Prints one JSON line:
the ISA engine.kernels sees, the default kernel of each case, the kernels checked (each into a
new array, into a channel slice of a wider buffer, and accumulating onto a residual there),
failures, and whether the micro-kernel's code uses zmm / ymm registers.
"""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np

# (N, H, W, C, K, (FH, FW), stride, pad, dilation, groups): small, awkward, one per shape class
# or more
CASES = {
    "1x1": (2, 5, 9, 3, 70, (1, 1), 1, 0, 1, 1),
    "3x3-deep": (1, 6, 10, 33, 20, (3, 3), 1, 1, 1, 1),
    "3x3-dilated": (1, 9, 11, 4, 17, (3, 3), 1, 2, 2, 1),
    "thin-5x5": (2, 7, 12, 3, 32, (5, 5), 1, 2, 1, 1),
    "strided-unpadded": (1, 11, 21, 18, 40, (3, 3), (1, 2), 0, 1, 1),
    "padded-asymmetric": (1, 6, 9, 17, 24, (3, 2), 2, (0, 2, 1, 0), 1, 1),
    "deep-Kc1150": (1, 3, 9, 128, 9, (3, 3), 1, 1, 1, 1),
    "grouped-32-of-4": (1, 5, 9, 128, 128, (3, 3), 1, 1, 1, 32),
    "grouped-17-of-7-strided": (2, 7, 15, 51, 119, (3, 2), 2, (1, 0, 0, 1), 1, 17),
}


def main() -> int:
    from engine import kernels, ops
    from engine import reference as ref

    rng = np.random.default_rng(0)
    checked, failures, defaults = [], [], {}
    for case_name, (n, h, w, c, k, size, stride, pad, dil, g) in CASES.items():
        x = rng.standard_normal((n, h, w, c)).astype(np.float32)
        wt = rng.standard_normal((k, *size, c // g)).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32)
        linear = ref.conv2d_reference(x, wt, b, stride, pad, dil, groups=g)
        want = np.maximum(linear, 0)
        residual = rng.standard_normal(linear.shape).astype(np.float32)
        summed = np.maximum(linear.astype(np.float64) + residual, 0)
        with kernels.forced(None):
            defaults[case_name] = ops.conv_kernel(x.shape, wt, stride, pad, dil, g)
        atol = 1e-5 * max(1.0, np.sqrt(size[0] * size[1] * c / g / 16))
        for name in kernels.KERNELS:
            with kernels.forced([name]):
                try:
                    got = ops.conv2d(x, wt, b, stride, pad, dil, relu=True, groups=g)
                    if g > 1 and ops.conv_kernel(x.shape, wt, stride, pad, dil, g) != name:
                        continue  # forcing an ungrouped kernel leaves a grouped conv alone
                except kernels.KernelError:
                    continue  # does not apply to this shape
                # into a concat's channel slice, then onto a residual held there (fused add)
                wider = np.full((*linear.shape[:3], k + 5), 7.0, np.float32)
                ops.conv2d(x, wt, b, stride, pad, dil, out=wider[..., 2 : 2 + k], groups=g)
                sliced = wider[..., 2 : 2 + k].copy()
                wider[..., 2 : 2 + k] = residual
                ops.conv2d(
                    x,
                    wt,
                    b,
                    stride,
                    pad,
                    dil,
                    relu=True,
                    out=wider[..., 2 : 2 + k],
                    accumulate=True,
                    groups=g,
                )
            checked.append(f"{case_name}:{name}")
            untouched = (wider[..., :2] == 7).all() and (wider[..., 2 + k :] == 7).all()
            for variant, have, expect in (
                ("new", got, want),
                ("slice", sliced, linear),
                ("accumulate", wider[..., 2 : 2 + k], summed),
            ):
                ok = have.shape == expect.shape and np.allclose(have, expect, rtol=1e-4, atol=atol)
                if not ok or not untouched:
                    err = float(np.abs(have - expect).max()) if have.shape == expect.shape else None
                    failures.append(
                        {"case": case_name, "kernel": name, "variant": variant, "max_error": err}
                    )
    from engine import _gemm

    with warnings.catch_warnings(record=True) as caught:  # code loaded from Numba's cache has
        warnings.simplefilter("always")  # no assembly to show (a warm cache in this process)
        asm = "".join(_gemm._block16.inspect_asm(sig) for sig in _gemm._block16.signatures)
    if caught:
        asm = None
    report = {
        "isa": kernels.isa(),
        "cpu_name": kernels.cpu_name(),
        "defaults": defaults,
        "checked": checked,
        "failures": failures,
        "zmm": None if asm is None else "zmm" in asm,
        "ymm": None if asm is None else "ymm" in asm,
    }
    print(json.dumps(report))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
