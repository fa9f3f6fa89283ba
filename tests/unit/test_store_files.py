"""Store with a blob directory (CONVQ_BLOB_DIR): job bytes in files, their names in Redis."""

from __future__ import annotations

import os
import time

import fakeredis
import numpy as np
import pytest

from worker.contract import store as store_module
from worker.contract.blobs import SWEEP_MARGIN, BlobDirError
from worker.contract.config import Settings
from worker.contract.store import BlobMissing, Store

INPUT_TTL, RESULT_TTL = 200, 100


@pytest.fixture
def redis():
    return fakeredis.FakeRedis()


@pytest.fixture
def store(redis, tmp_path):
    return Store(
        redis, result_ttl=RESULT_TTL, input_ttl=INPUT_TTL, blob_dir=str(tmp_path / "blobs")
    )


def files(store: Store) -> list[str]:
    return sorted(os.listdir(store.blobs.root))


def largest_value(redis) -> int:
    """Return the length of the longest string value or hash field value in redis."""
    sizes = [0]
    for key in redis.keys("*"):
        kind = redis.type(key)
        if kind == b"string":
            sizes.append(redis.strlen(key))
        elif kind == b"hash":
            sizes.extend(len(v) for v in redis.hgetall(key).values())
    return max(sizes)


def some_images(dtype, shape=(2, 32, 32, 3)) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape, dtype=np.uint8)
    return rng.standard_normal(shape).astype(dtype)


def some_outputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "pool1": rng.standard_normal((2, 7, 7, 8)).astype(np.float32),
        # Not C-contiguous: the store must write its C-order bytes, not its memory.
        "conv1": rng.standard_normal((2, 9, 9, 4)).astype(np.float32).transpose(0, 2, 1, 3),
        "fc": rng.standard_normal((2, 1, 1, 5)).astype(np.float64),
    }


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_input_round_trips_through_a_file(store, dtype):
    images = some_images(dtype)
    store.put_input("j1", images)
    assert files(store) == ["input-j1"]
    back = store.get_input("j1")
    assert back.dtype == dtype and back.shape == images.shape
    assert np.array_equal(back, images)
    assert back.flags.writeable
    back[...] = 0  # the engine may scale in place; the file must not change
    assert np.array_equal(store.get_input("j1"), images)
    assert 0 < store.redis.ttl(store.input_key("j1")) <= INPUT_TTL
    assert largest_value(store.redis) < 1024 < images.nbytes
    assert store.get_input("missing") is None


def test_results_round_trip_through_files_in_every_form(store):
    outs = some_outputs()
    store.put_result("j1", outs)
    assert files(store) == ["result-j1.0", "result-j1.1", "result-j1.2"]
    assert store.result_names("j1") == list(outs)
    for name, want in outs.items():
        assert store.result_layout("j1", name) == (want.shape, want.dtype)
        assert b"".join(store.result_slices("j1", name)) == want.tobytes()
        got = store.result_array("j1", name)
        assert got.dtype == want.dtype and np.array_equal(got, want)
        assert got.flags.writeable
        got[...] = -1
        assert np.array_equal(store.result_array("j1", name), want)
        assert np.array_equal(store.result_array("j1", name), want)
    assert store.result_slices("j1", "nope") is None and store.result_array("j1", "nope") is None
    assert 0 < store.redis.ttl(store.result_key("j1")) <= RESULT_TTL
    assert store.redis.keys(store.result_key("j1") + ":*") == []  # no data keys in Redis
    assert largest_value(store.redis) < 1024


def test_result_slices_cover_the_file_in_order(store, monkeypatch):
    monkeypatch.setattr(store_module, "FILE_SLICE_BYTES", 1000)
    want = some_outputs()["conv1"]
    store.put_result("j1", {"conv1": want})
    pieces = list(store.result_slices("j1", "conv1"))
    assert [len(p) for p in pieces[:-1]] == [1000] * (len(pieces) - 1)
    assert len(pieces) == -(-want.nbytes // 1000)
    assert all(isinstance(p, bytes) for p in pieces)  # what a WSGI server can send
    assert b"".join(pieces) == want.tobytes()


def test_finish_run_drops_the_input_file_and_delete_job_the_rest(store):
    store.put_input("j1", some_images(np.uint8))
    store.put_input("j2", some_images(np.uint8))
    store.put_result("j1", some_outputs())
    store.finish_run("j1", "j1")
    assert files(store) == ["input-j2", "result-j1.0", "result-j1.1", "result-j1.2"]
    assert store.get_input("j1") is None
    store.delete_job("j1")
    assert files(store) == ["input-j2"] and store.result_names("j1") is None
    store.delete_job("j2")
    assert files(store) == [] and store.get_input("j2") is None
    store.delete_job("j3")  # nothing there: fine


def test_a_store_without_the_blob_dir_cannot_read_files_and_says_why(store, redis):
    store.put_input("j1", some_images(np.uint8))
    store.put_result("j1", some_outputs())
    plain = Store(redis, result_ttl=RESULT_TTL, input_ttl=INPUT_TTL)
    for read in (
        lambda: plain.get_input("j1"),
        lambda: plain.result_array("j1", "fc"),
        lambda: plain.result_slices("j1", "fc"),
    ):
        with pytest.raises(BlobMissing, match="CONVQ_BLOB_DIR") as caught:
            read()
        assert isinstance(caught.value, LookupError)
    assert plain.result_names("j1") == list(some_outputs())  # the index itself is readable


def test_a_deleted_or_cut_file_is_blob_missing(store):
    store.put_input("j1", some_images(np.uint8))
    store.put_result("j1", some_outputs())
    os.remove(store.blobs.root / "input-j1")
    with pytest.raises(BlobMissing, match="input-j1.*CONVQ_BLOB_DIR"):
        store.get_input("j1")
    os.remove(store.blobs.root / "result-j1.0")
    with pytest.raises(BlobMissing, match="result-j1.0"):
        store.result_slices("j1", "pool1")
    with pytest.raises(BlobMissing, match="result-j1.0"):
        store.result_array("j1", "pool1")
    path = store.blobs.root / "result-j1.1"
    path.write_bytes(path.read_bytes()[:-4])  # a short file must not be a short answer
    with pytest.raises(BlobMissing, match="result-j1.1"):
        store.result_slices("j1", "conv1")
    with pytest.raises(BlobMissing, match="result-j1.1"):
        store.result_array("j1", "conv1")
    assert np.array_equal(store.result_array("j1", "fc"), some_outputs()["fc"])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 9, 9, 3)])
def test_a_file_store_reads_what_a_redis_store_wrote(store, redis, shape):
    plain = Store(redis, result_ttl=RESULT_TTL, input_ttl=INPUT_TTL)
    images = some_images(np.uint8, shape)
    plain.put_input("j1", images)
    plain.put_result("j1", some_outputs())
    assert np.array_equal(store.get_input("j1"), images)
    for name, want in some_outputs().items():
        assert b"".join(store.result_slices("j1", name)) == want.tobytes()
        assert np.array_equal(store.result_array("j1", name), want)
    assert files(store) == []
    store.delete_job("j1")
    assert redis.keys("convq:*") == []


def test_a_failed_file_write_stores_nothing_in_redis(store, monkeypatch):
    def full(name, parts):
        raise BlobDirError(28, "No space left on device")

    monkeypatch.setattr(store.blobs, "write", full)
    with pytest.raises(BlobDirError):
        store.put_input("j1", some_images(np.uint8))
    with pytest.raises(BlobDirError):
        store.put_result("j1", some_outputs())
    assert store.redis.keys("*") == [] and files(store) == []


def test_a_result_whose_second_file_fails_is_not_visible(store, monkeypatch):
    write, calls = store.blobs.write, []

    def full_after_one(name, parts):
        calls.append(name)
        if len(calls) > 1:
            raise BlobDirError(28, "No space left on device")
        write(name, parts)

    monkeypatch.setattr(store.blobs, "write", full_after_one)
    with pytest.raises(BlobDirError):
        store.put_result("j1", some_outputs())
    assert store.result_names("j1") is None and store.result_array("j1", "pool1") is None


def age(store: Store, name: str, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(store.blobs.root / name, (then, then))


def test_sweep_blobs_deletes_files_past_the_store_ttls(store, redis):
    for job in ("old", "new"):
        store.put_input(job, some_images(np.uint8))
        store.put_result(job, {"fc": some_outputs()["fc"]})
    age(store, "input-old", INPUT_TTL + SWEEP_MARGIN + 60)
    age(store, "result-old.0", RESULT_TTL + SWEEP_MARGIN + 60)
    age(store, "input-new", INPUT_TTL + SWEEP_MARGIN - 60)
    age(store, "result-new.0", RESULT_TTL + SWEEP_MARGIN - 60)
    assert store.sweep_blobs() == 2
    assert files(store) == ["input-new", "result-new.0"]
    assert Store(redis).sweep_blobs() == 0  # no blob dir: nothing to sweep


def test_from_settings_takes_the_ttls_and_blob_dir(redis, tmp_path):
    settings = Settings(result_ttl=11, input_ttl=22, blob_dir=str(tmp_path / "b"))
    store = Store.from_settings(redis, settings)
    assert (store.result_ttl, store.input_ttl) == (11, 22)
    assert store.blobs.root == tmp_path / "b" and (tmp_path / "b").is_dir()
    assert Store.from_settings(redis, Settings()).blobs is None
    assert Settings.from_env({"CONVQ_BLOB_DIR": "/x"}).blob_dir == "/x"
    assert Settings.from_env({"CONVQ_BLOB_DIR": ""}).blob_dir is None


def test_an_unusable_blob_dir_is_refused_when_the_store_is_made(redis, tmp_path):
    plain = tmp_path / "plain-file"
    plain.write_bytes(b"")
    with pytest.raises(BlobDirError, match="CONVQ_BLOB_DIR"):
        Store(redis, blob_dir=str(plain / "blobs"))
