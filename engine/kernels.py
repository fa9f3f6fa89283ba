"""Conv kernels by name: which apply to a layer, which one runs, and where that choice comes from.

A kernel is a path (how the conv becomes GEMMs) on a GEMM family (what does the multiply-adds),
named "<path>-<family>":
- paths: pointwise (1x1, stride 1, no pad: the input's pixels are the GEMM's rows), winograd
  (F(2x2, 3x3), 3x3 stride 1, engine._winograd), implicit (windows read in place, no column
  buffer; Wout >= IMPLICIT_MIN_WIDTH), im2col (tiles packed, then multiplied: every conv);
- families: avx512 (6x64, 8x48, 3x32 register blocks, engine._gemm), avx2 (3x32, 4x16), blas
  (one single-threaded sgemm per tile: portable, pointwise and im2col only).
Grouped convs of many groups with few filters each (ResNeXt's 32 groups of 4: GEMMs of 4
columns would waste most lanes) run a kernel of their own, vectorised across groups
(engine._grouped_kernel): grouped-avx512 and grouped-avx2 (register tiles of 16 or 8 groups),
grouped-direct (one pixel at a time, any width). CONVQ_KERNEL forces those convs only when it
names a grouped kernel.
Every kernel is correct on every CPU; the family only decides how fast.

A layer falls in one shape class (CLASSES). Each class has a ranking of kernels and a layer runs
the first one in it that applies to the layer (im2col applies to all). The ranking comes from,
first to last: CONVQ_KERNEL (a name, or a comma list, forced on every conv: an unknown name, or
none that applies to a layer, is a KernelError); the measured ranking for this machine
(engine.tuning, cached in CHOICES_FILE beside Numba's cache under key()); the default of the
CPU's ISA (DEFAULTS).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import tempfile
import threading
from dataclasses import dataclass

import llvmlite.binding as llvm
import numba

from . import _cache, _grouped_kernel
from .errors import EngineError

PATHS = {  # path -> the families it runs on
    "pointwise": ("avx512", "avx2", "blas"),
    "winograd": ("avx512", "avx2"),
    "implicit": ("avx512", "avx2"),
    "im2col": ("avx512", "avx2", "blas"),
    "grouped": ("avx512", "avx2", "direct"),
}
KERNELS = tuple(f"{path}-{family}" for path, families in PATHS.items() for family in families)
DIRECT = "depthwise"  # the direct kernel of depthwise convs (C/groups == 1): no GEMM to choose
GROUPED_DIRECT = "grouped-direct"  # grouped convs with few filters per group, any output width
# Grouped convs with at most this many filters per group, in at least this many groups (a
# vector's lanes), run the grouped kernels instead of one GEMM per group: measured at N=8, 3x3,
# the one-pixel kernel against per-group GEMMs: 32 groups of 4 channels 0.32, of 8 0.35; 64 of
# 4 0.18; but 16 of 16 2.2, 8 of 16 2.75, 4 of 16 5.2.
GROUPED_MAX_KG = 8
GROUPED_MIN_GROUPS = 16
# Winograd's 16 GEMMs are too shallow to pay for its transforms below this many input channels.
WINOGRAD_MIN_C = 32
# Implicit GEMM computes rows of whole blocks: an output row must be at least the tallest block.
IMPLICIT_MIN_WIDTH = 8
# Inputs thinner than this: a padded copy costs less than packing columns (implicit GEMM wins).
THIN_C = 16
CLASSES = ("1x1", "3x3s1", "thin", "unpadded", "padded", "grouped")
ENV = "CONVQ_KERNEL"
CHOICES_FILE = "kernel-choices.json"
# CPUs LLVM knows by name whose code is AVX-512 or AVX2 (NUMBA_CPU_NAME without features).
AVX512_CPUS = {
    "skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake-client",
    "icelake-server", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
    "graniterapids", "znver4", "znver5", "x86-64-v4",
}  # fmt: skip
AVX2_CPUS = {
    "haswell", "broadwell", "skylake", "alderlake", "raptorlake", "meteorlake", "znver1",
    "znver2", "znver3", "x86-64-v3",
}  # fmt: skip


class KernelError(EngineError, ValueError):
    """CONVQ_KERNEL names a kernel that does not exist or applies to no layer it meets."""


@dataclass(frozen=True)
class ConvShape:
    """What choosing a kernel needs of a conv: C, K, window, stride, pads, Wout (and groups:
    a grouped conv asks here only when it has GROUPED_MIN_GROUPS groups of at most
    GROUPED_MAX_KG filters; others run per group, asking as ungrouped convs)."""

    c: int
    k: int
    fh: int
    fw: int
    sh: int
    sw: int
    padded: bool
    wout: int
    groups: int = 1


def grouped(c: int, k: int, groups: int) -> bool:
    """Return whether a conv of these channels, filters and groups runs a grouped kernel."""
    return groups >= GROUPED_MIN_GROUPS and k // groups <= GROUPED_MAX_KG and c > groups


def applies(name: str, shape: ConvShape) -> bool:
    """Return whether kernel `name` can run a conv of this shape."""
    path, family = split(name)
    if (path == "grouped") != (shape.groups > 1):
        return False  # grouped convs run grouped kernels; the others, per group, the rest
    if path == "grouped":
        if family == "direct":
            return True
        fits = _grouped_kernel.tile(family, shape.k // shape.groups)
        return fits is not None and shape.wout >= fits[1]  # at least one tile wide
    if path == "pointwise":
        return (shape.fh, shape.fw, shape.sh, shape.sw) == (1, 1, 1, 1) and not shape.padded
    if path == "winograd":
        return (shape.fh, shape.fw, shape.sh, shape.sw) == (3, 3, 1, 1)
    if path == "implicit":
        return shape.wout >= IMPLICIT_MIN_WIDTH
    return path == "im2col"


def shape_class(shape: ConvShape) -> str:
    """Return the class (CLASSES) whose ranking decides this shape's kernel."""
    if shape.groups > 1:
        return "grouped"
    if (shape.fh, shape.fw, shape.sh, shape.sw) == (1, 1, 1, 1) and not shape.padded:
        return "1x1"
    if (shape.fh, shape.fw, shape.sh, shape.sw) == (3, 3, 1, 1) and shape.c >= WINOGRAD_MIN_C:
        return "3x3s1"
    if shape.c < THIN_C:
        return "thin"
    return "padded" if shape.padded else "unpadded"


def split(name: str) -> tuple[str, str]:
    """Return (path, family) of a kernel name."""
    path, family = name.rsplit("-", 1)
    return path, family


# ISA -> class -> ranking; "{f}" is the ISA's own GEMM family.
_DEFAULT = {
    "1x1": ["pointwise-{f}", "im2col-{f}"],
    "3x3s1": ["winograd-{f}", "implicit-{f}", "im2col-{f}"],
    "thin": ["implicit-{f}", "im2col-{f}"],
    "unpadded": ["implicit-{f}", "im2col-{f}"],
    "padded": ["im2col-{f}"],
    "grouped": ["grouped-{f}", "grouped-direct"],
}
DEFAULTS = {
    "avx512": {cls: [n.format(f="avx512") for n in r] for cls, r in _DEFAULT.items()},
    "avx2": {cls: [n.format(f="avx2") for n in r] for cls, r in _DEFAULT.items()},
    "portable": {
        cls: ["grouped-direct"] if cls == "grouped" else ["pointwise-blas", "im2col-blas"]
        for cls in CLASSES
    },
}


@functools.cache
def _host_features() -> frozenset[str]:
    """Return the host CPU's features (asked of LLVM once: it takes ~1 ms)."""
    flags = llvm.get_host_cpu_features().flatten().split(",")
    return frozenset(f[1:] for f in flags if f[:1] == "+")


@functools.cache
def _host_name() -> str:
    return llvm.get_host_cpu_name()


def cpu_name() -> str:
    """Return the CPU name Numba compiles for (NUMBA_CPU_NAME, else the host's, as LLVM names
    it)."""
    name = numba.config.CPU_NAME
    return _host_name() if name in (None, "host") else name


def features() -> frozenset[str]:
    """Return the ISA features Numba compiles for (as Numba itself decides, engine._gemm's code
    included): NUMBA_CPU_FEATURES when set; the host's when unset, even under NUMBA_CPU_NAME;
    when set empty, what the named CPU implies (known names only; others count as portable)."""
    configured = numba.config.CPU_FEATURES
    if configured is None:
        return _host_features()
    if configured:
        return _parse(configured)
    name = cpu_name()
    if name in ("host", _host_name()):
        return _host_features()
    if name in AVX512_CPUS:
        return frozenset({"avx512f", "avx2", "fma", "avx"})
    if name in AVX2_CPUS:
        return frozenset({"avx2", "fma", "avx"})
    return frozenset()


def _parse(spec: str) -> frozenset[str]:
    return frozenset(f.strip()[1:] for f in spec.split(",") if f.strip()[:1] == "+")


def isa() -> str:
    """Return "avx512", "avx2" or "portable": the family of the code Numba makes here."""
    have = features()
    if "avx512f" in have:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= have else "portable"


def cpu_model() -> str:
    """Return the CPU's model name (/proc/cpuinfo), else what platform says."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def isa_flags() -> list[str]:
    """Return the vector ISA features of the code Numba makes (the ones that pick kernels)."""
    return sorted(f for f in features() if f.startswith(("avx", "fma", "sse4")))


@functools.lru_cache(maxsize=1)
def version() -> str:
    """Return convq's version and a hash of the kernels' and the choice's sources: a choice
    measured on other code is not reused."""
    try:
        from importlib.metadata import version as dist_version

        ours = dist_version("convq")
    except Exception:  # not installed (a source checkout on sys.path)
        ours = "source"
    digest = hashlib.sha256(_cache.source_hash().encode())
    for name in ("kernels.py", "tuning.py"):  # the classes, samples and rules of the choice
        with open(os.path.join(_cache.HERE, name), "rb") as src:
            digest.update(src.read())
    return f"{ours}+{digest.hexdigest()[:16]}"


def key_fields(threads: int) -> dict:
    """Return what a measured choice depends on: CPU, ISA flags, Numba's pool size, version."""
    return {
        "cpu": cpu_model(),
        "cpu_name": cpu_name(),
        "isa_flags": isa_flags(),
        "threads": threads,
        "version": version(),
    }


def key(threads: int) -> str:
    """Return the cache key of a choice measured with this many threads on this machine."""
    if threads not in _keys:
        text = json.dumps(key_fields(threads), sort_keys=True)
        _keys[threads] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _keys[threads]


_keys: dict[int, str] = {}


def choices_path() -> str:
    """Return the JSON file of measured choices: beside Numba's cache of the kernels."""
    base = os.environ.get("NUMBA_CACHE_DIR")  # all cache_dir() reads that can change
    path = _paths.get(base)
    if path is None:
        path = _paths[base] = os.path.join(os.path.dirname(_cache.cache_dir()), CHOICES_FILE)
    return path


_paths: dict[str | None, str] = {}


def read_choices(path: str | None = None) -> dict:
    """Return the choices file's {key: entry}, {} when missing or unreadable."""
    try:
        with open(path or choices_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_choice(threads: int, entry: dict, path: str | None = None) -> str | None:
    """Store entry under this machine's key (atomically), dropping other convq versions' entries;
    return the path, None if unwritable."""
    path = path or choices_path()
    ours = version()  # entries of other versions are stale for good: dropped
    data = {k: v for k, v in read_choices(path).items() if _version_of(v) == ours}
    data[key(threads)] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        return None
    _loaded.pop(threads, None)
    _chosen.clear()
    return path


def _version_of(entry) -> str | None:
    return entry.get("version") if isinstance(entry, dict) else None


_loaded: dict[int, dict[str, list[str]]] = {}
_seen: dict[int, tuple[int, int] | None] = {}  # the file's (mtime, size) when last read


def _stamp() -> tuple[int, int] | None:
    try:
        st = os.stat(choices_path())
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def measured(threads: int) -> dict[str, list[str]]:
    """Return the measured rankings for this machine and pool size ({} if none yet).

    The file is read again whenever it changed (one stat per call), so every process on the
    machine runs what the last measurement chose: their results stay bit-identical.
    """
    stamp = _stamp()
    if threads not in _loaded or _seen.get(threads) != stamp:
        _seen[threads] = stamp
        entry = read_choices().get(key(threads))
        rankings = entry.get("rankings") if isinstance(entry, dict) else None
        ok = isinstance(rankings, dict) and all(
            isinstance(r, list) and r and all(n in KERNELS for n in r) for r in rankings.values()
        )
        _loaded[threads] = rankings if ok else {}  # type: ignore[assignment]
    return _loaded[threads]


def forget() -> None:
    """Drop the rankings and keys worked out so far: the next conv reads the choices file
    (and this machine's key) again."""
    _loaded.clear()
    _keys.clear()
    _seen.clear()
    _chosen.clear()


def remember(threads: int, rankings: dict[str, list[str]]) -> None:
    """Use these rankings in this process (whether or not the file could be written)."""
    _loaded[threads] = rankings
    _seen[threads] = _stamp()
    _chosen.clear()


@contextlib.contextmanager
def choices_lock():
    """Hold an exclusive lock beside the choices file (none if its directory is unwritable)."""
    with _file_lock(choices_path() + ".lock"):
        yield


@contextlib.contextmanager
def compile_lock():
    """Hold an exclusive lock while compiling kernels into Numba's cache (warmup does): two
    processes compiling the same kernel at once can give their cache entries the same number,
    and one of them then loads the other's machine code (garbage results or a crash, seen)."""
    with _file_lock(os.path.join(os.path.dirname(choices_path()), "compile.lock")):
        yield


@contextlib.contextmanager
def _file_lock(path: str):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def parse_forced(value: str | None) -> list[str] | None:
    """Return CONVQ_KERNEL's names (None when unset or blank); KernelError on an unknown one."""
    if value is None or not value.strip():
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in KERNELS]
    if unknown:
        raise KernelError(
            f"{ENV}={value!r}: unknown kernel {unknown[0]!r}; known kernels: "
            f"{', '.join(KERNELS)} (a comma list runs the first that applies to each layer)",
            field=ENV,
        )
    return names


_forcing = threading.local()
_FROM_ENV = "env"  # this thread forces nothing itself: CONVQ_KERNEL decides


class forced:
    """Within the block, this thread's convs run the first of `names` that applies (as
    CONVQ_KERNEL would force them; None lifts a CONVQ_KERNEL setting)."""

    def __init__(self, names: str | list[str] | None) -> None:
        self.names = parse_forced(
            names if isinstance(names, str) or names is None else ",".join(names)
        )

    def __enter__(self) -> forced:
        self.before = getattr(_forcing, "names", _FROM_ENV)
        _forcing.names = self.names
        return self

    def __exit__(self, *exc) -> None:
        _forcing.names = self.before


def forced_names() -> list[str] | None:
    """Return the kernels forced on this thread (forced(), else CONVQ_KERNEL), or None."""
    names: list[str] | str | None = getattr(_forcing, "names", _FROM_ENV)
    if isinstance(names, str):
        raw = os.environ.get(ENV)
        return None if raw is None else parse_forced(raw)
    return names


def ranking(cls: str, threads: int) -> tuple[list[str], str]:
    """Return (the kernels tried in order for a class, where that order comes from)."""
    names = forced_names()
    if names is not None and (cls != "grouped" or any(n.startswith("grouped-") for n in names)):
        return names, ENV
    rankings = measured(threads)
    if cls in rankings:
        return rankings[cls], "measured"
    return DEFAULTS[isa()][cls], "default"


def choose(shape: ConvShape, threads: int, layer: str | None = None) -> str:
    """Return the kernel a conv of this shape runs on `threads` threads.

    Every conv asks (twice in a Model: to report the kernel and to run it), so answers are
    remembered per shape, pool size, forced list and choices file version (one stat).
    """
    names = forced_names()
    memo = (shape, threads, None if names is None else tuple(names), _stamp())
    name = _chosen.get(memo)
    if name is None:
        name = _choose(shape, threads, layer)
        if len(_chosen) >= 4096:
            _chosen.clear()
        _chosen[memo] = name
    return name


_chosen: dict[tuple, str] = {}


def _choose(shape: ConvShape, threads: int, layer: str | None) -> str:
    cls = shape_class(shape)
    names, source = ranking(cls, threads)
    for name in names:
        if applies(name, shape):
            return name
    fallback = GROUPED_DIRECT if cls == "grouped" else f"im2col-{isa_family()}"
    if source == ENV:
        raise KernelError(
            f"{ENV} forces {', '.join(names)}, none of which runs a {shape.fh}x{shape.fw} "
            f"stride {shape.sh}x{shape.sw} conv {'with' if shape.padded else 'without'} pads, "
            f"Wout {shape.wout} (class {cls!r}); add {fallback} to the list, "
            "which runs every conv",
            layer=layer,
            field=ENV,
        )
    return fallback


def isa_family() -> str:
    """Return the GEMM family of this CPU's ISA (blas on a portable one)."""
    kind = isa()
    return "blas" if kind == "portable" else kind
