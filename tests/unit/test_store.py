"""Store: models, inputs and results as Redis blobs (fakeredis), never pickled."""

from __future__ import annotations

import io

import fakeredis
import numpy as np
import pytest

from engine.npy import from_npy, to_npy
from worker.contract.cache import ModelCache, ModelGone
from worker.contract.config import Settings
from worker.contract.store import Store


@pytest.fixture
def store():
    return Store(fakeredis.FakeRedis(), result_ttl=100, input_ttl=200)


SPEC = {"name": "m", "layers": [{"name": "conv1", "type": "conv", "filters": 2, "size": 1}]}


def test_model_versions_count_up_and_survive_delete(store):
    assert store.put_model("m", SPEC, b"w1", owner="alice") == 1
    assert store.put_model("m", SPEC, b"w22", owner=None) == 2
    info = store.model_info("m")
    assert (info["version"], info["owner"], info["weights_bytes"]) == (2, None, 3)
    assert info["spec"] == SPEC
    assert store.model_weights("m", 2) == b"w22"
    # The replaced version stays readable for queued jobs, but only until its TTL.
    assert store.model_weights("m", 1) == b"w1"
    assert 0 < store.redis.ttl("convq:weights:m:1") <= 200
    assert store.redis.ttl("convq:weights:m:2") == -1
    assert store.delete_model("m") is True
    assert store.model_info("m") is None and store.list_models() == []
    assert store.delete_model("m") is False
    # A new upload after a delete never reuses a version number (worker caches key on it).
    assert store.put_model("m", SPEC, b"w3", owner=None) == 3


def test_list_models_sorted(store):
    store.put_model("b", SPEC, b"x", owner=None)
    store.put_model("a", SPEC, b"y", owner="k")
    assert [m["name"] for m in store.list_models()] == ["a", "b"]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_input_round_trip_with_ttl(store, dtype):
    images = (np.arange(2 * 3 * 4 * 3) % 251).astype(dtype).reshape(2, 3, 4, 3)
    store.put_input("j1", images)
    back = store.get_input("j1")
    assert back.dtype == dtype and np.array_equal(back, images)
    assert 0 < store.redis.ttl("convq:input:j1") <= 200
    assert store.get_input("missing") is None


def test_result_round_trip_keeps_order_and_ttl(store):
    outs = {
        "pool": np.full((1, 2, 2, 3), 2.5, np.float32),
        "conv": np.ones((1, 4, 4, 3), np.float32),
    }
    store.put_result("j", outs)
    assert store.result_names("j") == ["pool", "conv"]
    assert np.array_equal(store.result_array("j", "conv"), outs["conv"])
    assert store.result_array("j", "nope") is None
    assert store.result_array("j", "__names__") is None
    assert 0 < store.redis.ttl("convq:result:j") <= 100
    assert store.result_names("other") is None
    store.delete_job("j")
    assert store.result_names("j") is None


def test_npy_refuses_object_arrays():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        from_npy(buf.getvalue())
    assert np.array_equal(from_npy(to_npy(np.eye(3))), np.eye(3))


def test_cancel_mark(store):
    assert not store.is_canceled("j")
    store.mark_canceled("j")
    assert store.is_canceled("j")


class _FakeStore:
    def __init__(self):
        self.calls = 0

    def model_spec(self, name, version):
        self.calls += 1
        return (
            None
            if name == "gone"
            else {
                "name": name,
                "input": {"channels": 1},
                "layers": [{"name": "c", "type": "conv", "filters": 1, "size": 1}],
            }
        )

    def model_weights(self, name, version):
        from engine import Model

        if name == "gone":
            return None
        w = {"c.w": np.ones((1, 1, 1, 1), np.float32) * version, "c.b": np.zeros(1, np.float32)}
        return Model.from_arrays(self.model_spec(name, version), w).to_safetensors()


def test_model_cache_is_lru_and_byte_bounded():
    fake = _FakeStore()
    size = len(fake.model_weights("a", 1))
    cache = ModelCache(max_bytes=2 * size)
    a = cache.get(fake, "a", 1)
    assert cache.get(fake, "a", 1) is a and cache.hits == 1
    cache.get(fake, "b", 1)
    cache.get(fake, "a", 1)  # a is now the most recent
    cache.get(fake, "c", 1)  # evicts b, not a
    assert ("a", 1) in cache and ("c", 1) in cache and ("b", 1) not in cache
    assert cache.bytes <= 2 * size
    with pytest.raises(ModelGone, match="no longer available"):
        cache.get(fake, "gone", 1)


def test_model_cache_counts_the_filters_runs_pack():
    fake = _FakeStore()
    size = len(fake.model_weights("a", 1))
    cache = ModelCache(max_bytes=2 * size)
    a = cache.get(fake, "a", 1)
    cache.get(fake, "b", 1)
    assert cache.bytes == 2 * size and a.packed_bytes == 0
    a.run(np.ones((1, 3, 3, 1), np.float32))  # packs its conv's filters on the way
    assert a.packed_bytes > 0 and cache.bytes == 2 * size + a.packed_bytes
    assert cache.get(fake, "a", 1) is a  # the fetch re-checks the budget: b, the older, goes
    assert ("b", 1) not in cache and cache.bytes <= 2 * size


def test_model_bigger_than_cache_is_not_kept():
    fake = _FakeStore()
    cache = ModelCache(max_bytes=1)
    cache.get(fake, "a", 1)
    assert cache.bytes == 0


def test_settings_from_env():
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://x:1/0",
            "CONVQ_THREADS": "3",
            "CONVQ_JOB_TIMEOUT": "7",
            "CONVQ_RETRIES": "0",
        }
    )
    assert (s.redis_url, s.threads, s.job_timeout, s.retries) == ("redis://x:1/0", 3, 7, 0)
    assert Settings.from_env({}).redis_url is None
    with pytest.raises(ValueError, match="CONVQ_THREADS"):
        Settings.from_env({"CONVQ_THREADS": "many"})


def test_poll_seconds_from_env_is_a_number_of_at_least_a_twentieth():
    assert Settings.from_env({}).poll == 2.0
    assert Settings.from_env({"CONVQ_POLL_SECONDS": "0.5"}).poll == 0.5
    assert Settings.from_env({"CONVQ_POLL_SECONDS": "0"}).poll == 0.05  # never a busy loop
    with pytest.raises(ValueError, match="CONVQ_POLL_SECONDS"):
        Settings.from_env({"CONVQ_POLL_SECONDS": "soon"})


def test_callback_settings_from_env():
    s = Settings.from_env(
        {
            "CONVQ_CALLBACK_ALLOW": "10.0.0.0/8",
            "CONVQ_CALLBACK_ATTEMPTS": "0",
            "CONVQ_CALLBACK_BACKOFF": "0.5",
            "CONVQ_CALLBACK_TIMEOUT": "0",
            "CONVQ_WEBHOOK_SECRET": "s" * 20,
        }
    )
    assert (s.callback_allow, s.callback_attempts, s.callback_backoff) == ("10.0.0.0/8", 1, 0.5)
    assert s.callback_timeout == 0.1 and s.webhook_secret == "s" * 20
    assert "s" * 20 not in repr(s)  # a logged Settings never shows the secret
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="CONVQ_CALLBACK_BACKOFF"):
            Settings.from_env({"CONVQ_CALLBACK_BACKOFF": bad})


def test_key_names_stay_what_deployed_redis_data_uses():
    from worker.contract import keys

    assert [
        keys.models(),
        keys.model("m"),
        keys.model_version("m"),
        keys.spec("m", 2),
        keys.weights("m", 2),
        keys.job_input("j"),
        keys.result("j"),
        keys.result_data("j", 3),
        keys.cancel("j"),
        keys.run("j"),
        keys.ended("j"),
        keys.sweep_lock("q"),
        keys.expired_seen("q"),
        keys.telemetry_jobs(),
        keys.telemetry_seconds("queue"),
        keys.webhook("j"),
        keys.webhooks_due(),
        keys.webhook_lease("j"),
        keys.webhook_secret(),
    ] == [
        "convq:models",
        "convq:model:m",
        "convq:model-version:m",
        "convq:spec:m:2",
        "convq:weights:m:2",
        "convq:input:j",
        "convq:result:j",
        "convq:result:j:3",
        "convq:cancel:j",
        "convq:run:j",
        "convq:ended:j",
        "convq:sweep-lock:q",
        "convq:expired-seen:q",
        "convq:telemetry:jobs",
        "convq:telemetry:queue_seconds",
        "convq:webhook:j",
        "convq:webhooks:due",
        "convq:webhook-lease:j",
        "convq:webhook-secret",
    ]


def test_every_key_the_store_writes_is_a_convq_key(store):
    store.put_model("m", {"name": "m"}, b"w", owner=None)
    store.put_input("j", np.zeros((1, 2, 2, 1), np.uint8))
    store.mark_canceled("j")
    assert sorted(k.decode() for k in store.redis.keys("*")) == [
        "convq:cancel:j",
        "convq:input:j",
        "convq:model-version:m",
        "convq:model:m",
        "convq:models",
        "convq:spec:m:1",
        "convq:weights:m:1",
    ]


def test_a_name_held_by_another_owner_is_refused_and_left_alone(store):
    from worker.contract.store import NameTaken

    store.put_model("m", {"name": "m"}, b"mine", owner="key-a")
    with pytest.raises(NameTaken):
        store.put_model("m", {"name": "m"}, b"theirs", owner="key-b")
    info = store.model_info("m")
    assert info["owner"] == "key-a" and store.model_weights("m", info["version"]) == b"mine"
    assert store.put_model("m", {"name": "m"}, b"again", owner="key-a") > info["version"]
    store.put_model("s", {"name": "s"}, b"server", owner=None)  # the server's: no key takes it
    with pytest.raises(NameTaken):
        store.put_model("s", {"name": "s"}, b"theirs", owner="key-b")


def test_a_claim_racing_between_read_and_write_loses_atomically(store):
    """Another owner takes the name after this upload read it free, before it wrote: the
    WATCHed transaction aborts, the retry sees the other owner, and nothing of ours lands."""
    from worker.contract.store import NameTaken

    other = Store(store.redis)
    real = store.redis.transaction
    raced = []

    def transaction(func, *keys, **kw):
        def interleaved(pipe):
            func(pipe)  # reads the name free and queues our writes
            if not raced:
                raced.append("key-b")
                other.put_model("m", {"name": "m"}, b"theirs", owner="key-b")

        return real(interleaved, *keys, **kw)

    store.redis.transaction = transaction
    with pytest.raises(NameTaken):
        store.put_model("m", {"name": "m"}, b"mine", owner="key-a")
    info = store.model_info("m")
    assert raced and info["owner"] == "key-b"
    assert store.model_weights("m", info["version"]) == b"theirs"
    assert [k for k in store.redis.keys("convq:weights:*") if b"theirs" != store.redis.get(k)] == []


def test_read_inputs_reads_each_job_as_read_input_does(store, tmp_path):
    small = np.arange(2 * 3 * 4 * 3, dtype=np.uint8).reshape(2, 3, 4, 3)
    floats = np.linspace(-1, 1, 5 * 5 * 3, dtype=np.float32).reshape(1, 5, 5, 3)
    store.put_input("a", small)
    store.put_input("b", floats)
    with_dir = Store(store.redis, result_ttl=100, input_ttl=200, blob_dir=str(tmp_path))
    with_dir.put_input("c", small)
    got = with_dir.read_inputs(["a", "gone", "b", "c"])
    assert [type(g) for g in got] == [tuple] * 4
    (a, a_file), (gone, _), (b, b_file), (c, c_file) = got
    assert np.array_equal(a, small) and a_file is False
    assert gone is None
    assert np.array_equal(b, floats) and b.dtype == np.float32 and b_file is False
    assert np.array_equal(c, small) and c_file is True
    # A file this process cannot see is that job's error, not the others'.
    missing = store.read_inputs(["a", "c"])
    assert np.array_equal(missing[0][0], small) and isinstance(missing[1], LookupError)


def test_claim_runs_and_run_states_as_claim_run_and_run_state(store):
    store.claim_runs({"j1": "t1", "j2": "t2"}, ttl=30)
    store.claim_run("j2", "newer", ttl=30)  # a newer attempt of j2 took over
    store.mark_canceled("j3")
    states = store.run_states({"j1": "t1", "j2": "t2", "j3": "t3"})
    assert states == {"j1": (True, False), "j2": (False, False), "j3": (True, True)}
    assert states["j1"] == store.run_state("j1", "t1") and 0 < store.redis.ttl("convq:run:j1") <= 30


def test_model_infos_read_specs_once_per_version_and_see_new_versions():
    redis = fakeredis.FakeRedis()
    store = Store(redis, result_ttl=100, input_ttl=200)
    other = {**SPEC, "name": "m2"}
    store.put_model("m", SPEC, b"w1", owner=None)
    assert [i and i["spec"] for i in store.model_infos(["nope", "m"])] == [None, SPEC]
    first = store.model_info("m")
    first["spec"]["layers"].clear()  # a caller's copy: the next read is untouched
    assert store.model_info("m")["spec"] == SPEC
    # A new version's spec is read, not the cached one of the old version.
    store.put_model("m", other, b"w2", owner=None)
    assert store.model_info("m")["spec"] == other
    # Another Store (another process) sees the same models; a deleted model is gone at once.
    assert Store(redis).model_info("m")["version"] == 2
    store.delete_model("m")
    assert store.model_infos(["m"]) == [None]
