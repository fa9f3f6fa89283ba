"""BlobDir: whole files or none, copy-on-write maps, checked names, a sweep by age and kind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from worker.contract.blobs import SWEEP_MARGIN, BlobDir, BlobDirError

INPUT_TTL, RESULT_TTL = 100, 1000
NOW = 2_000_000_000.0  # a fixed clock for sweep(now=...); files are aged relative to it


@pytest.fixture
def blobs(tmp_path):
    return BlobDir(tmp_path / "blobs")


def listing(blobs: BlobDir) -> list[str]:
    """Every name in the directory, hidden temporary files included."""
    return sorted(os.listdir(blobs.root))


def put(blobs: BlobDir, name: str, age: float, data: bytes = b"x") -> None:
    """Create name (raw, not through write, so any name goes) last modified age seconds ago."""
    path = blobs.root / name
    path.write_bytes(data)
    os.utime(path, (NOW - age, NOW - age))


def test_write_then_map_round_trips_the_parts_in_order(blobs):
    parts = [b"\x93NUMPY", memoryview(bytes(range(256)) * 40), bytearray(b"tail")]
    blobs.write("input-j1", parts)
    expect = b"".join(bytes(p) for p in parts)
    assert (blobs.root / "input-j1").read_bytes() == expect
    data = blobs.map("input-j1")
    assert bytes(data) == expect
    with pytest.raises(TypeError):  # the read-only map cannot be written
        data[0] = 0
    assert listing(blobs) == ["input-j1"]  # no tmp file left behind


def test_a_writable_map_is_copy_on_write(blobs):
    blobs.write("result-j1.0", [b"abcdef"])
    data = blobs.map("result-j1.0", writable=True)
    data[0:3] = b"XYZ"
    assert bytes(data) == b"XYZdef"
    assert (blobs.root / "result-j1.0").read_bytes() == b"abcdef"
    assert bytes(blobs.map("result-j1.0")) == b"abcdef"


def test_a_map_outlives_the_deleted_file(blobs):
    blobs.write("result-j1.0", [b"abc" * 1000])
    data = blobs.map("result-j1.0")
    blobs.delete("result-j1.0")
    assert blobs.map("result-j1.0") is None
    assert bytes(data) == b"abc" * 1000


def test_an_empty_file_maps_to_empty_bytes(blobs):
    blobs.write("result-j1.0", [])
    assert bytes(blobs.map("result-j1.0")) == b""
    assert bytes(blobs.map("result-j1.0", writable=True)) == b""


def test_a_reader_sees_the_old_file_or_the_new_one_never_a_part(blobs):
    seen = []

    def parts(new: bytes):
        yield new[:3]
        # Half written: the final name must hold the previous whole file, or nothing.
        data = blobs.map("input-j1")
        seen.append(None if data is None else bytes(data))
        yield new[3:]

    blobs.write("input-j1", parts(b"first!"))
    assert bytes(blobs.map("input-j1")) == b"first!"
    blobs.write("input-j1", parts(b"second"))
    assert bytes(blobs.map("input-j1")) == b"second"
    assert seen == [None, b"first!"]
    assert listing(blobs) == ["input-j1"]


def _failing_parts(exc: BaseException):
    yield b"half of it"
    raise exc


def test_a_write_that_fails_leaves_no_file_and_no_tmp_file(blobs):
    with pytest.raises(BlobDirError) as caught:
        blobs.write("input-j1", _failing_parts(OSError(errno.ENOSPC, "No space left on device")))
    assert caught.value.errno == errno.ENOSPC and "input-j1" in str(caught.value)
    assert listing(blobs) == []
    blobs.write("input-j1", [b"old"])
    with pytest.raises(BlobDirError):
        blobs.write("input-j1", _failing_parts(OSError(errno.EIO, "I/O error")))
    assert listing(blobs) == ["input-j1"] and bytes(blobs.map("input-j1")) == b"old"


def test_a_parts_iterator_that_raises_anything_leaves_no_tmp_file(blobs):
    with pytest.raises(RuntimeError):
        blobs.write("input-j1", _failing_parts(RuntimeError("the request body broke off")))
    assert listing(blobs) == []


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x",
        "input-../x",
        "input-a/b",
        "/etc/passwd",
        "input-",
        "input-j1\n",
        "model-j1",
        "weights-j1",
        ".input-j1.42.tmp",
        "input-j1.0.1",
        "result-j1.12345",
        "input-" + "a" * 65,
        "input-a b",
        "input-j1.x",
    ],
)
def test_names_the_store_does_not_make_are_refused(blobs, name):
    for call in (
        lambda: blobs.write(name, [b"x"]),
        lambda: blobs.map(name),
        lambda: blobs.map(name, writable=True),
        lambda: blobs.delete(name),
    ):
        with pytest.raises(ValueError, match="not a blob name"):
            call()
    assert listing(blobs) == []


def test_delete_and_map_of_missing_files(blobs):
    assert blobs.map("input-nope") is None
    assert blobs.map("result-nope.0", writable=True) is None
    blobs.write("input-j1", [b"x"])
    blobs.delete("input-nope", "input-j1", "result-nope.3")
    blobs.delete()
    assert listing(blobs) == []


def test_sweep_deletes_by_kind_past_ttl_plus_margin(blobs):
    put(blobs, "input-old", INPUT_TTL + SWEEP_MARGIN + 1)
    put(blobs, "input-young", INPUT_TTL + SWEEP_MARGIN - 1)
    put(blobs, "result-old.0", RESULT_TTL + SWEEP_MARGIN + 1)
    put(blobs, "result-old.1", RESULT_TTL + SWEEP_MARGIN + 1)
    # Old enough to sweep an input, not a result: each kind has its own TTL.
    put(blobs, "result-young.0", INPUT_TTL + SWEEP_MARGIN + 1)
    put(blobs, "result-young.1", RESULT_TTL + SWEEP_MARGIN - 1)
    assert blobs.sweep(INPUT_TTL, RESULT_TTL, now=NOW) == 3
    assert listing(blobs) == ["input-young", "result-young.0", "result-young.1"]
    assert blobs.sweep(INPUT_TTL, RESULT_TTL, now=NOW) == 0


def test_sweep_deletes_stale_tmp_files_of_dead_writers(blobs):
    oldest = max(INPUT_TTL, RESULT_TTL) + SWEEP_MARGIN
    put(blobs, ".input-j1.0a1b2c3d.tmp", oldest + 1)
    put(blobs, ".result-j1.0.0a1b2c3d.tmp", oldest + 1)
    put(blobs, ".input-j2.0a1b2c3d.tmp", oldest - 1)  # perhaps still being written
    assert blobs.sweep(INPUT_TTL, RESULT_TTL, now=NOW) == 2
    assert listing(blobs) == [".input-j2.0a1b2c3d.tmp"]


def test_sweep_never_touches_foreign_files(blobs):
    ancient = 100 * (RESULT_TTL + SWEEP_MARGIN)
    foreign = ["README", ".hidden", "model-x", "weights", "inputs", ".probe-1", "results-x.0"]
    for name in foreign:
        put(blobs, name, ancient)
    (blobs.root / "cache").mkdir()
    os.utime(blobs.root / "cache", (NOW - ancient, NOW - ancient))
    assert blobs.sweep(INPUT_TTL, RESULT_TTL, now=NOW) == 0
    assert listing(blobs) == sorted([*foreign, "cache"])


@pytest.mark.parametrize(
    "name,is_dir", [("notes.tmp", False), ("input-notes.txt", False), ("result-archive", True)]
)
def test_sweep_never_touches_foreign_files_that_look_like_ours(blobs, name, is_dir):
    ancient = 100 * (RESULT_TTL + SWEEP_MARGIN)
    path = blobs.root / name
    path.mkdir() if is_dir else path.write_bytes(b"theirs")
    os.utime(path, (NOW - ancient, NOW - ancient))
    assert blobs.sweep(INPUT_TTL, RESULT_TTL, now=NOW) == 0
    assert listing(blobs) == [name]


def test_sweep_by_the_real_clock(blobs):
    blobs.write("input-j1", [b"x"])
    assert blobs.sweep(INPUT_TTL, RESULT_TTL) == 0
    os.utime(blobs.root / "input-j1", (1, 1))  # written in 1970
    assert blobs.sweep(INPUT_TTL, RESULT_TTL) == 1


def test_two_writers_of_one_name_at_once_each_use_their_own_tmp_file(blobs):
    # Two runs of one job (a retry racing an attempt presumed dead) write the same names.
    import threading

    barrier, errors = threading.Barrier(2), []

    def parts(fill: bytes):
        barrier.wait()  # both are inside write() before either has written a byte
        yield fill * 1000
        yield fill * 1000

    def writer(fill: bytes):
        try:
            blobs.write("result-j1.0", parts(fill))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f,)) for f in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert bytes(blobs.map("result-j1.0")) in (b"a" * 2000, b"b" * 2000)  # one whole file
    assert listing(blobs) == ["result-j1.0"]


def test_a_directory_is_made_on_first_use(tmp_path):
    blobs = BlobDir(str(tmp_path / "a" / "b"))
    assert blobs.root == tmp_path / "a" / "b" and blobs.root.is_dir()
    assert listing(blobs) == []  # the write probe is gone


def test_many_threads_may_open_the_same_new_directory_at_once(tmp_path):
    # bench/chaos.py's clients did: each thread's store checks the directory on first use.
    import threading

    barrier, errors = threading.Barrier(8), []

    def opener():
        barrier.wait()
        for _ in range(20):
            try:
                BlobDir(tmp_path / "shared")
            except OSError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and listing(BlobDir(tmp_path / "shared")) == []


def test_an_unusable_directory_is_a_blob_dir_error_naming_the_variable(tmp_path):
    plain = tmp_path / "plain-file"
    plain.write_bytes(b"")
    for root in (plain, plain / "blobs"):
        with pytest.raises(BlobDirError, match="CONVQ_BLOB_DIR=") as caught:
            BlobDir(root)
        assert str(root) in str(caught.value)
        assert isinstance(caught.value, OSError)  # the API answers OSErrors of storage as 507
    assert Path(plain).read_bytes() == b""
