"""Bearer keys: required on /v2 except health; jobs, results and models belong to their key."""

from __future__ import annotations

import numpy as np
import pytest

from tests.integration.apikit import Api, images, load_body, v2_json

A = {"Authorization": "Bearer key-a-0123456789ab"}
B = {"Authorization": "Bearer key-b-0123456789ab"}


@pytest.fixture
def api():
    return Api(API_KEYS="key-a-0123456789ab, key-b-0123456789ab")


def test_health_needs_no_key_everything_else_does(api):
    assert api.client.get("/v2/health/live").status_code == 200
    assert api.client.get("/v2/health/ready").status_code == 503  # no worker, but not 401
    for method, path in [
        ("get", "/v2"),
        ("post", "/v2/repository/index"),
        ("get", "/v2/models/tiny"),
        ("post", "/v2/models/tiny/jobs"),
        ("get", "/v2/jobs/" + "0" * 32),
        ("post", "/v2/models/tiny/infer"),
        ("post", "/v2/repository/models/tiny/load"),
    ]:
        rv = getattr(api.client, method)(path)
        assert rv.status_code == 401, path
        assert rv.headers["WWW-Authenticate"] == "Bearer" and "error" in rv.json
    for bad in ("Bearer nope", "Basic a2V5LWE=", "Bearer ", "key-a-0123456789ab"):
        assert api.client.get("/v2", headers={"Authorization": bad}).status_code == 401
    assert api.client.get("/v2", headers=A).status_code == 200


def test_keys_never_reach_redis(api):
    api.load(headers=A)
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1)), headers=A)
    assert rv.status_code == 202
    for key in api.redis.keys("*"):
        kind = api.redis.type(key)
        values = {
            b"string": lambda k: [api.redis.get(k)],
            b"hash": lambda k: list(api.redis.hgetall(k).values()),
        }.get(kind, lambda k: [])
        for value in values(key):
            assert b"key-a-0123456789ab" not in value


def test_another_keys_jobs_and_results_are_404(api):
    assert api.load(headers=A).status_code == 200
    job_id = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1)), headers=A).json["id"]
    api.burst()
    for path in (f"/v2/jobs/{job_id}", f"/v2/jobs/{job_id}/result"):
        assert api.client.get(path, headers=B).status_code == 404
        assert api.client.get(path, headers=A).status_code == 200
    assert api.client.delete(f"/v2/jobs/{job_id}", headers=B).status_code == 404
    assert api.client.get(f"/v2/jobs/{job_id}", headers=A).json["status"] == "finished"
    assert api.client.delete(f"/v2/jobs/{job_id}", headers=A).status_code == 200


def test_another_keys_models_are_invisible_and_untouchable(api):
    assert api.load(headers=A).status_code == 200
    assert api.client.get("/v2/models/tiny", headers=B).status_code == 404
    assert api.client.get("/v2/models/tiny/ready", headers=B).status_code == 404
    assert api.client.post("/v2/repository/index", headers=B).json == []
    assert [m["name"] for m in api.client.post("/v2/repository/index", headers=A).json] == ["tiny"]
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1)), headers=B)
    assert rv.status_code == 404 and api.queue_keys() == 0
    assert api.client.post("/v2/repository/models/tiny/unload", headers=B).status_code == 404
    # Each key names models in its own namespace: B's "tiny" is B's, A's stays A's, and the
    # answer is the same whether or not another key uses the name (nothing to probe or squat).
    rv = api.client.post("/v2/repository/models/tiny/load", json=load_body(seed=9), headers=B)
    assert rv.status_code == 200 and rv.json["name"] == "tiny"
    assert api.client.get("/v2/models/tiny", headers=A).json["versions"] == ["1"]
    assert api.client.get("/v2/models/tiny", headers=B).json["name"] == "tiny"
    assert [m["name"] for m in api.client.post("/v2/repository/index", headers=B).json] == ["tiny"]
    assert api.client.post("/v2/repository/models/tiny/unload", headers=B).status_code == 200
    assert api.client.get("/v2/models/tiny", headers=A).status_code == 200
    assert api.client.get("/v2/models/tiny", headers=B).status_code == 404


def test_two_keys_running_one_name_get_their_own_results(api):
    from tests.integration.apikit import reference_model

    assert api.load(headers=A).status_code == 200
    assert (
        api.client.post(
            "/v2/repository/models/tiny/load", json=load_body(seed=9), headers=B
        ).status_code
        == 200
    )
    imgs = images(1)
    ids = {}
    for who, headers in (("a", A), ("b", B)):
        rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(imgs, ["fc"]), headers=headers)
        assert rv.status_code == 202 and rv.json["model"] == "tiny"
        ids[who] = rv.json["id"]
    api.burst()
    for who, headers, seed in (("a", A, 0), ("b", B, 9)):
        status = api.client.get(f"/v2/jobs/{ids[who]}", headers=headers).json
        assert status["status"] == "finished" and status["model"] == "tiny"
        rv = api.client.get(f"/v2/jobs/{ids[who]}/result?output=fc&format=npy", headers=headers)
        import io

        got = np.load(io.BytesIO(rv.data))
        np.testing.assert_array_equal(got, reference_model(seed).run(imgs, ["fc"])["fc"])


def test_server_models_are_shared_but_read_only():
    api = Api(API_KEYS="key-a-0123456789ab")
    store = api.app.extensions["convq"].store
    from tests.integration.apikit import reference_model

    model = reference_model()
    store.put_model("tiny", model.spec, model.to_safetensors(), owner=None)
    assert api.client.get("/v2/models/tiny", headers=A).status_code == 200
    assert (
        api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1)), headers=A).status_code
        == 202
    )
    assert api.client.post("/v2/repository/models/tiny/unload", headers=A).status_code == 409
    # A key's own model of that name shadows the server's for that key alone.
    assert api.load(headers=A, seed=9).status_code == 200
    assert store.model_info("tiny")["owner"] is None  # the server's is untouched
    assert api.client.post("/v2/repository/models/tiny/unload", headers=A).status_code == 200
    assert api.client.get("/v2/models/tiny", headers=A).status_code == 200  # the server's again


def test_without_keys_everything_is_open():
    api = Api()
    assert api.load().status_code == 200
    job_id = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1))).json["id"]
    assert api.client.get(f"/v2/jobs/{job_id}").status_code == 200
    # A stray Authorization header changes nothing when auth is off.
    assert api.client.get(f"/v2/jobs/{job_id}", headers=B).status_code == 200


def test_keys_and_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONVQ_API_KEYS", "k1-0123456789abcd,k2-0123456789abcd")
    monkeypatch.setenv("CONVQ_MAX_IMAGES", "3")
    api = Api()
    assert api.app.config["MAX_IMAGES"] == 3
    assert api.client.get("/v2").status_code == 401
    assert (
        api.client.get("/v2", headers={"Authorization": "Bearer k2-0123456789abcd"}).status_code
        == 200
    )
    # The test mapping wins over the environment.
    assert Api(API_KEYS="").client.get("/v2").status_code == 200


@pytest.mark.parametrize(
    "value",
    ["false", "0", "[]", "null", "k1", "good-key-0123456789,", " , ", "a b c d e f g h i j"],
)
def test_an_invalid_key_list_stops_the_app(monkeypatch, value):
    from service.auth import KeyListError

    monkeypatch.setenv("CONVQ_API_KEYS", value)
    with pytest.raises(KeyListError):
        Api()


def test_an_invalid_key_list_stops_convq_up_and_api_with_status_2(monkeypatch, capsys):
    import subprocess
    import sys

    from service.cli import main

    monkeypatch.setenv("CONVQ_API_KEYS", "false")
    assert main(["up"]) == 2
    assert "CONVQ_API_KEYS" in capsys.readouterr().err
    # gunicorn's config module refuses it too (convq api, the image and compose all read it).
    env = {"CONVQ_API_KEYS": "[]", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", "import service.gunicorn_conf"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "empty list" in done.stderr or "CONVQ_API_KEYS" in done.stderr


def test_gunicorn_settings_have_one_name_and_default(monkeypatch):
    import importlib

    import service.gunicorn_conf as conf

    monkeypatch.delenv("CONVQ_API_WORKERS", raising=False)
    monkeypatch.delenv("CONVQ_API_TIMEOUT", raising=False)
    importlib.reload(conf)
    assert (conf.workers, conf.timeout, conf.worker_class) == (2, 180, "gevent")
    monkeypatch.setenv("CONVQ_API_WORKERS", "5")
    importlib.reload(conf)
    assert conf.workers == 5
