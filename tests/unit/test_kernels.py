"""engine.kernels and engine.tuning: names, forcing, shape classes, ISA defaults, the measured
choice and its cache file; every kernel against the reference on AVX2 and portable code."""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numba
import numpy as np
import pytest
from numba.core.registry import CPUDispatcher

from engine import Model, _cache, _threads, kernels, ops, tuning
from engine import reference as ref
from engine.kernels import ConvShape, KernelError
from tests import isa_check

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.fixture
def choices_dir(tmp_path, monkeypatch):
    """Keep the choices file in a temporary directory (and no forcing) for the test."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(kernels.ENV, raising=False)
    kernels.forget()
    yield tmp_path
    kernels.forget()


def test_kernel_names_are_path_and_family():
    assert len(kernels.KERNELS) == len(set(kernels.KERNELS)) == 13
    for name in kernels.KERNELS:
        path, family = kernels.split(name)
        assert family in kernels.PATHS[path]
    assert "winograd-blas" not in kernels.KERNELS  # Winograd runs on the micro-kernel only


def test_every_kernel_matches_the_reference_here(capsys):
    assert isa_check.main() == 0
    report = json.loads(capsys.readouterr().out)
    assert report["failures"] == []
    assert {c.split(":")[1] for c in report["checked"]} == set(kernels.KERNELS)


@pytest.mark.parametrize(
    "shape,cls",
    [
        (ConvShape(256, 64, 1, 1, 1, 1, False, 28), "1x1"),
        (ConvShape(64, 64, 3, 3, 1, 1, True, 56), "3x3s1"),
        (ConvShape(3, 96, 11, 11, 4, 4, False, 55), "thin"),
        (ConvShape(16, 32, 3, 3, 1, 1, True, 32), "padded"),  # 3x3 s1 but too shallow
        (ConvShape(64, 128, 3, 3, 2, 2, True, 28), "padded"),
        (ConvShape(64, 128, 3, 3, 2, 2, False, 27), "unpadded"),
        (ConvShape(64, 128, 1, 1, 2, 2, False, 14), "unpadded"),  # 1x1 stride 2
        (ConvShape(128, 128, 3, 3, 1, 1, True, 56, 32), "grouped"),  # ResNeXt's 32 of 4
    ],
)
def test_shape_classes(shape, cls):
    assert kernels.shape_class(shape) == cls


def test_what_applies_where():
    narrow = ConvShape(8, 8, 3, 3, 1, 1, True, 7)
    assert not kernels.applies("implicit-avx512", narrow)  # Wout < the tallest block
    assert kernels.applies("winograd-avx2", narrow)
    assert not kernels.applies("winograd-avx2", ConvShape(8, 8, 3, 3, 2, 2, True, 9))
    assert not kernels.applies("pointwise-blas", ConvShape(8, 8, 1, 1, 1, 1, True, 9))
    assert all(
        kernels.applies(f"im2col-{f}", narrow) for f in kernels.PATHS["im2col"]
    )  # im2col runs every conv
    resnext = ConvShape(128, 128, 3, 3, 1, 1, True, 56, 32)
    assert kernels.applies("grouped-avx2", resnext) and kernels.applies("grouped-direct", resnext)
    assert not kernels.applies("im2col-avx2", resnext)  # ungrouped kernels: per group only
    assert not kernels.applies("grouped-avx2", ConvShape(128, 128, 3, 3, 1, 1, True, 56))
    tiny_row = ConvShape(128, 128, 3, 3, 1, 1, True, 2, 32)  # narrower than a 3-pixel tile
    assert not kernels.applies("grouped-avx2", tiny_row)
    assert kernels.applies("grouped-direct", tiny_row)
    nine = ConvShape(128, 288, 3, 3, 1, 1, True, 28, 32)  # 9 filters per group: no tile
    assert not kernels.applies("grouped-avx512", nine) and kernels.applies("grouped-direct", nine)


def test_grouped_convs_obey_only_a_forced_list_that_names_a_grouped_kernel(monkeypatch):
    x, w = rand(1, 6, 9, 64), rand(64, 3, 3, 4)
    unforced = ops.conv_kernel(x.shape, w, pad=1, groups=16)
    assert kernels.split(unforced)[0] == "grouped"
    monkeypatch.setenv(kernels.ENV, "im2col-avx2")
    assert ops.conv_kernel(x.shape, w, pad=1, groups=16) == unforced  # its ranking decides
    monkeypatch.setenv(kernels.ENV, "im2col-avx2,grouped-direct")
    assert ops.conv_kernel(x.shape, w, pad=1, groups=16) == "grouped-direct"
    monkeypatch.setenv(kernels.ENV, "grouped-avx512")
    assert ops.conv_kernel(x.shape, w, pad=1, groups=16) == "grouped-avx512"
    np.testing.assert_allclose(
        ops.conv2d(x, w, pad=1, groups=16),
        ref.conv2d_reference(x, w, pad=1, groups=16),
        rtol=1e-4,
        atol=1e-5,
    )


def test_unknown_forced_kernel_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "winograd-avx1024")
    with pytest.raises(KernelError, match=r"unknown kernel 'winograd-avx1024'.*im2col-blas"):
        ops.conv2d(rand(1, 5, 5, 2), rand(3, 3, 3, 2))


def test_forced_kernel_that_applies_to_no_layer_names_it(monkeypatch):
    spec = {
        "name": "net",
        "input": {"height": 6, "width": 6, "channels": 3},
        "layers": [{"name": "squeeze", "type": "conv", "filters": 4, "size": 1}],
    }
    model = Model.from_arrays(spec, {"squeeze.w": rand(4, 1, 1, 3), "squeeze.b": rand(4)})
    monkeypatch.setenv(kernels.ENV, "winograd-avx512")
    with pytest.raises(KernelError, match="none of which runs a 1x1") as err:
        model.run(rand(1, 6, 6, 3))
    assert err.value.layer == "squeeze" and "im2col-" in err.value.message


def test_forced_list_runs_the_first_kernel_that_applies(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "winograd-avx2, im2col-blas")
    x, w3, w1 = rand(2, 7, 7, 4, seed=1), rand(5, 3, 3, 4, seed=2), rand(5, 1, 1, 4, seed=3)
    assert ops.conv_kernel(x.shape, w3, pad=1) == "winograd-avx2"
    assert ops.conv_kernel(x.shape, w1) == "im2col-blas"
    assert ops.conv_kernel(x.shape, rand(8, 3, 3, 1), pad=1, groups=4) == kernels.DIRECT
    np.testing.assert_allclose(
        ops.conv2d(x, w3, pad=1), ref.conv2d_reference(x, w3, pad=1), rtol=1e-4, atol=1e-5
    )


def test_model_records_the_kernel_of_each_conv(monkeypatch):
    spec = {
        "name": "net",
        "input": {"height": 12, "width": 12, "channels": 3},
        "layers": [
            {"name": "stem", "type": "conv", "filters": 8, "size": 3, "pad": 1},
            {"name": "squeeze", "type": "conv", "filters": 4, "size": 1},
            {"name": "pool", "type": "maxpool", "size": 2},
        ],
    }
    arrays = {"stem.w": rand(8, 3, 3, 3), "stem.b": rand(8), "squeeze.w": rand(4, 1, 1, 8)}
    arrays["squeeze.b"] = rand(4)
    model = Model.from_arrays(spec, arrays)
    assert model.kernels == {}
    monkeypatch.setenv(kernels.ENV, "pointwise-avx2,im2col-blas")
    model.run(rand(1, 12, 12, 3))
    assert model.kernels == {"stem": "im2col-blas", "squeeze": "pointwise-avx2"}
    monkeypatch.delenv(kernels.ENV)
    model.run(rand(1, 12, 12, 3))
    assert model.kernels == {
        "stem": ops.conv_kernel((1, 12, 12, 3), arrays["stem.w"], pad=1),
        "squeeze": ops.conv_kernel((1, 12, 12, 8), arrays["squeeze.w"]),
    }


@pytest.mark.parametrize(
    "name,features,isa",
    [
        (None, None, None),  # the host, as Numba sees it
        ("haswell", "", "avx2"),
        ("znver3", "", "avx2"),
        ("skylake-avx512", "", "avx512"),
        ("generic", "", "portable"),
        ("some-future-cpu", "", "portable"),  # unknown: only what is certain
        ("haswell", "+avx2,+fma,+avx512f", "avx512"),  # explicit features win
        ("generic", "+sse4.2", "portable"),
    ],
)
def test_isa_follows_what_numba_compiles_for(monkeypatch, name, features, isa):
    monkeypatch.setattr(numba.config, "CPU_NAME", name)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", features)
    if isa is None:
        host = kernels._host_features()
        isa = "avx512" if "avx512f" in host else "avx2" if {"avx2", "fma"} <= host else "portable"
    assert kernels.isa() == isa


@pytest.mark.parametrize(
    "name,deep,pointwise,thin",
    [
        ("skylake-avx512", "winograd-avx512", "pointwise-avx512", "implicit-avx512"),
        ("haswell", "winograd-avx2", "pointwise-avx2", "implicit-avx2"),
        ("generic", "im2col-blas", "pointwise-blas", "im2col-blas"),
    ],
)
def test_without_a_measurement_each_isa_has_its_default(
    choices_dir, monkeypatch, name, deep, pointwise, thin
):
    monkeypatch.setattr(numba.config, "CPU_NAME", name)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "")
    threads = _threads.max_threads()
    assert kernels.choose(ConvShape(64, 64, 3, 3, 1, 1, True, 28), threads) == deep
    assert kernels.choose(ConvShape(256, 64, 1, 1, 1, 1, False, 28), threads) == pointwise
    assert kernels.choose(ConvShape(3, 96, 11, 11, 4, 4, False, 55), threads) == thin
    # an implicit default on a row too narrow for it falls back to im2col of the same family
    narrow = kernels.choose(ConvShape(3, 96, 5, 5, 1, 1, True, 4), threads)
    assert narrow == "im2col-" + ("blas" if name == "generic" else deep.split("-")[1])


def fake_timings(first: str):
    """Return a measure() stand-in that ranks `first` fastest wherever it applies."""
    calls = []

    def measure(budget=tuning.BUDGET):
        calls.append(budget)
        return {
            cls: {n: (0.1 if n == first else 1.0 + i) for i, n in enumerate(tuning.candidates(cls))}
            for cls in tuning.SAMPLES
        }

    return measure, calls


def test_measured_choice_is_stored_by_key_and_reused(choices_dir, monkeypatch):
    measure, calls = fake_timings("im2col-avx2")
    monkeypatch.setattr(tuning, "measure", measure)
    threads = _threads.max_threads()
    entry = tuning.ensure()
    assert len(calls) == 1
    assert entry["threads"] == threads and entry["cpu"] == kernels.cpu_model()
    assert entry["version"] == kernels.version() and entry["isa_flags"] == kernels.isa_flags()
    path = choices_dir / kernels.CHOICES_FILE
    assert kernels.choices_path() == str(path)
    stored = json.loads(path.read_text())
    assert list(stored) == [kernels.key(threads)]
    assert stored[kernels.key(threads)]["rankings"]["padded"][0] == "im2col-avx2"
    padded = ConvShape(64, 128, 3, 3, 2, 2, True, 28)
    assert kernels.choose(padded, threads) == "im2col-avx2"
    kernels.forget()  # a new process: reads the file, does not measure again
    tuning.ensure()
    assert len(calls) == 1
    assert kernels.choose(padded, threads) == "im2col-avx2"
    # another convq version (or CPU, ISA, thread count) is another key: measured again
    with pytest.MonkeyPatch.context() as other_cpu:
        other_cpu.setattr(numba.config, "CPU_FEATURES", "+sse2")
        kernels.forget()
        assert kernels.key(threads) != list(stored)[0]
    kernels.forget()
    assert kernels.key(threads) == list(stored)[0]
    monkeypatch.setattr(kernels, "version", lambda: "0.0.0+other")
    kernels.forget()
    assert kernels.choose(padded, threads) == kernels.DEFAULTS[kernels.isa()]["padded"][0]
    tuning.ensure()
    assert len(calls) == 2
    assert list(json.loads(path.read_text())) == [kernels.key(threads)]  # the old version's gone


def test_the_key_holds_the_thread_count(choices_dir):
    assert kernels.key(1) != kernels.key(2)
    assert kernels.key_fields(2)["threads"] == 2


def test_forcing_wins_over_a_measurement(choices_dir, monkeypatch):
    measure, _ = fake_timings("im2col-avx2")
    monkeypatch.setattr(tuning, "measure", measure)
    tuning.ensure()
    with kernels.forced("im2col-blas"):
        assert kernels.choose(ConvShape(64, 128, 3, 3, 2, 2, True, 28), 2) == "im2col-blas"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": {"rankings": {"1x1": ["x"]}}}'])
def test_unreadable_choices_fall_back_to_the_default(choices_dir, content):
    text = content % kernels.key(_threads.max_threads()) if "%s" in content else content
    (choices_dir / kernels.CHOICES_FILE).write_text(text)
    shape = ConvShape(256, 64, 1, 1, 1, 1, False, 28)
    default = kernels.DEFAULTS[kernels.isa()]["1x1"][0]
    assert kernels.choose(shape, _threads.max_threads()) == default


def test_an_unwritable_cache_directory_still_uses_the_measurement(choices_dir, monkeypatch):
    measure, _ = fake_timings("im2col-avx2")
    monkeypatch.setattr(tuning, "measure", measure)
    blocker = choices_dir / "file"
    blocker.write_text("")
    monkeypatch.setattr(kernels, "choices_path", lambda: str(blocker / kernels.CHOICES_FILE))
    tuning.ensure()
    assert kernels.choose(ConvShape(64, 128, 3, 3, 2, 2, True, 28), 2) == "im2col-avx2"


def test_measure_times_every_candidate_of_every_class(choices_dir):
    timings = tuning.measure(budget=0.2)
    assert set(timings) == set(kernels.CLASSES)
    for cls, ms in timings.items():
        assert set(ms) == set(tuning.candidates(cls)) and all(v > 0 for v in ms.values())
    assert set(tuning.rank(timings)["1x1"]) == set(timings["1x1"])


def test_a_slow_first_call_does_not_rank_a_kernel_last(choices_dir, monkeypatch):
    # A kernel's first call at a new block width loads its code from Numba's cache (or compiles
    # it): timed, that made every avx512 kernel of a Zen 5 machine "hopeless", ranked last.
    real = ops._dense_conv
    victim = tuning.candidates("1x1")[0]
    calls = []

    def first_call_slow(*args, **kw):
        name = kernels.forced_names()[0]
        if name == victim and name not in calls:
            calls.append(name)
            end = time.process_time() + 0.2  # CPU time, which measure() reads
            while time.process_time() < end:
                pass
        return real(*args, **kw)

    monkeypatch.setattr(ops, "_dense_conv", first_call_slow)
    ms = tuning.measure(budget=0.5)["1x1"]
    assert calls == [victim]
    assert ms[victim] < 50, ms  # its own speed, not the 200 ms of its first call


def test_the_default_stays_first_unless_clearly_beaten():
    ms = {"pointwise-avx512": 1.0, "pointwise-blas": 0.95, "im2col-avx512": 3.0}
    assert tuning.rank({"1x1": ms}, "avx512")["1x1"] == [
        "pointwise-avx512",
        "pointwise-blas",
        "im2col-avx512",
    ]
    ms["pointwise-blas"] = 0.8  # 25% faster: displaces the default
    assert tuning.rank({"1x1": ms}, "avx512")["1x1"][0] == "pointwise-blas"
    assert tuning.rank({"1x1": ms}, "portable")["1x1"][0] == "pointwise-blas"


ISAS = {  # the environment of each build: the ISA engine.kernels must see, zmm/ymm expected
    "avx2": ({"NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": ""}, (False, True)),
    "portable": ({"NUMBA_CPU_NAME": "generic"}, (False, False)),
}


@pytest.mark.slow
def test_every_kernel_matches_the_reference_on_avx2_and_portable_code():
    # Both builds compile every kernel from scratch, a channel slice of the output too (~80 s of
    # CPU each, loaded): run them side by side.
    with tempfile.TemporaryDirectory() as cache:
        procs = {}
        for isa, (env, _) in ISAS.items():
            full = {**os.environ, **env, "NUMBA_CACHE_DIR": os.path.join(cache, isa)}
            full.pop(kernels.ENV, None)
            procs[isa] = subprocess.Popen(
                [sys.executable, "-m", "tests.isa_check"],
                cwd=ROOT,
                env=full,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        outputs = {isa: proc.communicate(timeout=600) for isa, proc in procs.items()}
    for isa, (out, err) in outputs.items():
        assert procs[isa].returncode == 0, (isa, out, err[-2000:])
        report = json.loads(out.strip().splitlines()[-1])
        assert report["isa"] == isa and report["failures"] == []
        assert {c.split(":")[1] for c in report["checked"]} == set(kernels.KERNELS)
        assert (report["zmm"], report["ymm"]) == ISAS[isa][1]
        family = "avx2" if isa == "avx2" else "blas"
        assert report["defaults"]["3x3-deep"] == (
            "winograd-avx2" if family == "avx2" else "im2col-blas"
        )
        assert report["defaults"]["1x1"] == f"pointwise-{family}"


def test_convq_info_shows_the_choices_key_and_file(choices_dir, monkeypatch, capsys):
    from service import cli

    measure, _ = fake_timings("im2col-avx2")
    monkeypatch.setattr(tuning, "measure", measure)
    assert cli.main(["info", "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["key"] == kernels.key(_threads.max_threads()) and before["measured_at"] is None
    assert before["choices_file"] == str(choices_dir / kernels.CHOICES_FILE)
    assert before["classes"]["padded"]["source"] == "default"
    tuning.ensure()
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"key {before['key']}" in text and "[measured] im2col-avx2 0.100 ms" in text
    monkeypatch.setenv(kernels.ENV, "im2col-blas")
    assert cli.main(["info", "--json"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["forced"] == "im2col-blas"
    assert forced["classes"]["1x1"] == {"kernels": ["im2col-blas"], "source": kernels.ENV}


def test_a_measurement_written_by_another_process_is_used_at_once(choices_dir):
    threads = _threads.max_threads()
    padded = ConvShape(64, 128, 3, 3, 2, 2, True, 28)
    assert kernels.choose(padded, threads) == kernels.DEFAULTS[kernels.isa()]["padded"][0]
    other = {"rankings": {"padded": ["im2col-blas"]}, "version": kernels.version()}
    kernels.write_choice(threads, other)  # as a worker starting beside this process would
    kernels._loaded[threads] = {}  # this process had read the file before: no measurement
    assert kernels.choose(padded, threads) == "im2col-blas"


def test_the_choice_follows_the_pool_not_set_threads(choices_dir):
    # results stay bit-identical whatever set_threads says: the kernel does not change with it
    x, w = rand(2, 12, 12, 40, seed=4), rand(24, 3, 3, 40, seed=5)
    before = ops.get_threads()
    try:
        ops.set_threads(1)
        one = ops.conv_kernel(x.shape, w, pad=1), ops.conv2d(x, w, pad=1)
        ops.set_threads(_threads.max_threads())
        two = ops.conv_kernel(x.shape, w, pad=1), ops.conv2d(x, w, pad=1)
    finally:
        ops.set_threads(before)
    assert one[0] == two[0]
    np.testing.assert_array_equal(one[1], two[1])


# (N, H, W, C, K, (FH, FW), stride, pad, dilation, groups): where the fused store (out= a channel
# slice, accumulate=True) meets each kernel's own tiling; K of 40 and 72 is no multiple of any
# block width, 20 groups no multiple of a grouped tile's lanes
SEAM_CASES = {
    "1x1-K40": (2, 5, 9, 6, 40, (1, 1), 1, 0, 1, 1),
    "1x1-C33-K72": (1, 7, 8, 33, 72, (1, 1), 1, 0, 1, 1),
    "3x3-padded-C33-K72": (1, 6, 10, 33, 72, (3, 3), 1, 1, 1, 1),
    "3x3-unpadded-C32-K40": (2, 7, 11, 32, 40, (3, 3), 1, 0, 1, 1),
    "5x5-K72": (1, 9, 12, 17, 72, (5, 5), 1, 2, 1, 1),
    "strided-K40": (1, 11, 21, 18, 40, (3, 3), 2, 1, 1, 1),
    "thin-C3-K40": (2, 8, 12, 3, 40, (3, 3), 1, 1, 1, 1),
    "dilated-K72": (1, 10, 13, 5, 72, (3, 3), 1, 2, 2, 1),
    "grouped-20-of-4-K80": (2, 6, 11, 80, 80, (3, 3), 1, 1, 1, 20),
    "grouped-16-of-6-strided": (1, 11, 21, 32, 96, (3, 3), 2, 1, 1, 16),
}


def _seam_pairs() -> list[tuple[str, str]]:
    """Return (kernel, case) for every kernel and every SEAM_CASES shape it applies to."""
    pairs = []
    for name in kernels.KERNELS:
        for case, (n, h, w, c, k, size, stride, pad, dil, g) in SEAM_CASES.items():
            part = (k, *size, c // g)
            with kernels.forced([name]):
                try:
                    if ops.conv_kernel((n, h, w, c), part, stride, pad, dil, g) != name:
                        continue  # a grouped conv, and no grouped kernel forced
                except KernelError:
                    continue
            pairs.append((name, case))
    return pairs


SEAM_PAIRS = _seam_pairs()


@functools.cache
def _seam_data(case: str) -> tuple:
    """Return x, w, b, the reference conv (float64, no ReLU) and a residual for a case."""
    n, h, w, c, k, size, stride, pad, dil, g = SEAM_CASES[case]
    x, wt, b = rand(n, h, w, c, seed=21), rand(k, *size, c // g, seed=22), rand(k, seed=23)
    conv = ref.conv2d_reference(x, wt, b, stride, pad, dil, groups=g).astype(np.float64)
    return x, wt, b, conv, rand(*conv.shape, seed=24)


def test_every_kernel_meets_several_seam_shapes():
    per_kernel = {name: [c for n, c in SEAM_PAIRS if n == name] for name in kernels.KERNELS}
    assert all(len(cases) >= 2 for cases in per_kernel.values()), per_kernel
    ungrouped = [case for case, shape in SEAM_CASES.items() if shape[-1] == 1]
    assert per_kernel["im2col-blas"] == ungrouped  # im2col runs every ungrouped conv
    assert per_kernel["grouped-direct"] == [c for c in SEAM_CASES if c not in ungrouped]
    assert per_kernel["pointwise-avx2"] == ["1x1-K40", "1x1-C33-K72"]


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("name,case", SEAM_PAIRS, ids=[f"{n}:{c}" for n, c in SEAM_PAIRS])
def test_each_kernel_writes_a_channel_slice_and_accumulates(name, case, relu, monkeypatch):
    # A concat's slice: only its channels change. A fused residual: conv + what out held,
    # then the ReLU, equal to the reference computed and added in float64. Even these small
    # convs are split over the threads (as a big layer's would be).
    monkeypatch.setattr(ops._threads, "_small_work", lambda: 0)
    n, h, w, c, k, size, stride, pad, dil, g = SEAM_CASES[case]
    x, wt, b, conv, residual = _seam_data(case)
    geo = {"stride": stride, "pad": pad, "dilation": dil, "groups": g}
    atol = 2e-5 * max(1.0, np.sqrt(size[0] * size[1] * c / g / 16))
    wider = np.full((*conv.shape[:3], 3 + k + 5), 7.0, np.float32)
    with kernels.forced([name]):
        assert ops.conv_kernel(x.shape, wt, **geo) == name
        got = ops.conv2d(x, wt, b, relu=relu, out=wider[..., 3 : 3 + k], **geo)
        assert np.shares_memory(got, wider)
        assert (wider[..., :3] == 7).all() and (wider[..., 3 + k :] == 7).all()
        want = np.maximum(conv, 0) if relu else conv
        np.testing.assert_allclose(wider[..., 3 : 3 + k], want, rtol=1e-4, atol=atol)
        summed = conv + residual
        want = np.maximum(summed, 0) if relu else summed
        whole = residual.copy()
        ops.conv2d(x, wt, b, relu=relu, out=whole, accumulate=True, **geo)
        np.testing.assert_allclose(whole, want, rtol=1e-4, atol=atol)
        wider[..., 3 : 3 + k] = residual
        ops.conv2d(x, wt, b, relu=relu, out=wider[..., 3 : 3 + k], accumulate=True, **geo)
        assert (wider[..., :3] == 7).all() and (wider[..., 3 + k :] == 7).all()
        np.testing.assert_allclose(wider[..., 3 : 3 + k], want, rtol=1e-4, atol=atol)


@pytest.mark.slow  # a second process importing the engine, and a 3 s wait
def test_one_process_at_a_time_compiles_into_the_cache(choices_dir, monkeypatch):
    import contextlib

    held = []

    @contextlib.contextmanager
    def spy():
        held.append(True)
        yield

    monkeypatch.setattr(kernels, "compile_lock", spy)
    ops.warmup(tune=False)
    assert held == [True]  # warmup compiles under the lock
    monkeypatch.undo()
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(choices_dir))
    script = "from engine import kernels\nwith kernels.compile_lock():\n    print('in')\n"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with kernels.compile_lock():
        other = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE)
        with pytest.raises(subprocess.TimeoutExpired):
            other.wait(timeout=3)  # waits while this process holds the lock
    out, _ = other.communicate(timeout=60)
    assert out.decode().strip() == "in"


def test_every_engine_kernel_has_a_name_of_its_own():
    # Numba names a compiled function's symbol by its qualified name, argument types and a
    # per-process counter. Kernels built by one factory (a register block per width, a
    # grouped tile per shape) with one name could take each other's symbol when one is loaded
    # from the cache and another compiled in the same process: a conv then ran another
    # block's code and crashed the process.
    ops.warmup(tune=False)
    seen: dict[int, CPUDispatcher] = {}
    todo = [vars(importlib.import_module(f"engine.{m[:-3]}")) for m in _cache.KERNEL_MODULES]
    todo.append(vars(importlib.import_module("engine._backward")))
    while todo:  # module globals, dicts of kernels, and each kernel's own globals
        for value in list(todo.pop().values()):
            if isinstance(value, dict):
                todo.append(value)
            elif isinstance(value, CPUDispatcher) and id(value) not in seen:
                seen[id(value)] = value
                todo.append(value.py_func.__globals__)
    names: dict[str, list] = {}
    for obj in seen.values():
        if obj.py_func.__module__.startswith("engine."):
            name = f"{obj.py_func.__module__}.{obj.py_func.__qualname__}"
            names.setdefault(name, []).append(obj)
    assert len(names) > 40  # every kernel module's functions are seen
    shared = {name: len(objs) for name, objs in names.items() if len(objs) > 1}
    assert not shared, shared
