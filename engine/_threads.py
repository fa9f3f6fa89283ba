"""Who owns the cores: Numba's thread pool, and nothing else.

Decision: every kernel splits its work into per-thread tiles with `prange`
and does each tile's GEMM in that thread — on AVX-512 CPUs with the engine's own micro-kernel
(engine._gemm), elsewhere with one single-threaded sgemm call (Numba's np.dot -> SciPy's
OpenBLAS, whose thread count is set to 1 here, once). So only one pool of threads ever runs and
OpenBLAS's never wakes. Numba's OpenMP workers sleep once a parallel loop ends
(OMP_WAIT_POLICY=PASSIVE), but only after spinning for GOMP_SPINCOUNT=5000 turns (~50 us): long
enough to catch the next layer of the same run, short enough to leave the cores to whatever
runs between jobs (other worker processes, NumPy in the service). Waking a sleeping worker costs
15-100 us on this kind of VM; a spinning one almost nothing, so with OpenMP kernels of more
than SMALL_WORK_OMP multiply-adds use every thread (1x1 28x28x256 K64 at N=1: 1 thread 0.30 ms,
2 sleeping 0.27, 2 spinning 0.19). Numba's workqueue layer (for processes that fork, below) neither
spins nor runs one-thread launches inline, so there the bar is SMALL_WORK.

Measured on 2 cores (bench/README.md): 2 tiles x 1-thread sgemm reach what one 2-thread sgemm
reaches on the same matrices (~190 GFLOP/s with OPENBLAS_CORETYPE=Haswell) without the ~ms
hand-over between pools; the micro-kernel reaches ~230 GFLOP/s per core in place.

GNU OpenMP cannot be used across fork(): a process that forks after starting Numba's pool
must pick Numba's "workqueue" layer first. `convq worker` avoids both: only its forked
work-horse loads and runs kernels (worker/horse.py). The kernels and this module work the same
on either layer. `set_threads(n)` caps both Numba's tiles and the
workspace slots; Numba's own setting is thread-local, so each op re-applies it per launch.
"""

from __future__ import annotations

import ctypes
import glob
import os

# Read by libgomp when Numba's OpenMP pool first starts, so they must be set before any kernel
# runs; an explicit setting by the user wins. GOMP_SPINCOUNT, when set, overrides the policy's
# spin count (0 for PASSIVE): threads spin ~50 us, then sleep.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "5000")

import numba  # noqa: E402

# Kernels smaller than this many multiply-adds (about 70-150 us on one core) run on one thread
# under a layer whose workers sleep at once (measured, bench/README.md).
SMALL_WORK = 16e6
# The same bar under OpenMP with spinning workers: two threads win from ~1.6 M (65 -> 46 us).
SMALL_WORK_OMP = 1e6

_state = {"threads": numba.config.NUMBA_NUM_THREADS, "blas_single": False}


def max_threads() -> int:
    """Return the most threads a kernel can use (NUMBA_NUM_THREADS, by default the core count)."""
    return numba.config.NUMBA_NUM_THREADS


def set_threads(n: int) -> int:
    """Set how many threads every kernel uses, clamped to [1, max_threads()]; return the count."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"threads must be an int, got {n!r}")
    _state["threads"] = max(1, min(n, max_threads()))
    return _state["threads"]


def get_threads() -> int:
    """Return how many threads every kernel uses."""
    return _state["threads"]


def _scipy_openblas() -> ctypes.CDLL | None:
    import scipy.linalg.cython_blas  # noqa: F401  (loads the library Numba's np.dot calls)

    with open("/proc/self/maps") as maps:
        # NumPy ships its own OpenBLAS (libscipy_openblas64_ under numpy.libs); leave that one be
        paths = {ln.split()[-1] for ln in maps if "scipy_openblas" in ln and "numpy" not in ln}
    if not paths:
        import scipy

        root = os.path.dirname(os.path.dirname(scipy.__file__))
        paths = set(glob.glob(os.path.join(root, "scipy.libs", "libscipy_openblas*.so")))
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def single_threaded_blas() -> None:
    """Make the BLAS under Numba's np.dot run in the calling thread (once per process)."""
    if _state["blas_single"]:
        return
    _state["blas_single"] = True
    lib = _scipy_openblas()
    for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
        fn = getattr(lib, name, None) if lib is not None else None
        if fn is not None:
            fn(1)
            return


def _small_work() -> float:
    if numba.config.THREADING_LAYER == "workqueue":  # picked by a process that must fork
        return SMALL_WORK
    try:
        layer = numba.threading_layer()  # known once a first parallel loop has run
    except ValueError:
        layer = "omp"
    return SMALL_WORK_OMP if layer == "omp" else SMALL_WORK


def enter(work: float = float("inf")) -> int:
    """Apply the thread settings for a kernel launched from this thread; return the count.

    work is the kernel's size in multiply-adds (or element visits); below SMALL_WORK one
    thread runs it, since waking a sleeping worker costs more than it saves.
    """
    single_threaded_blas()
    n = _state["threads"] if work >= _small_work() else 1
    numba.set_num_threads(n)
    return n
