"""Job callbacks: one signed POST per ended job, retried with backoff, never to internal hosts."""

from __future__ import annotations

import json
import threading
import time

import pytest

from service.auth import owner_id
from tests.integration.apikit import Api, Live, images, npy_bytes, v2_json
from tests.integration.receiver import Receiver
from worker.contract import callbacks, keys, webhooks
from worker.dispatcher import Dispatcher

KEY_A, KEY_B = "key-a-0123456789ab", "key-b-0123456789ab"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
LOCAL = {"callback_allow": "127.0.0.1/32", "callback_backoff": 0.2}


@pytest.fixture
def receiver():
    made: list[Receiver] = []

    def make(answers=(200,), **kw) -> Receiver:
        made.append(Receiver(answers, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def keyed_api(**settings) -> Api:
    api = Api(API_KEYS=f"{KEY_A},{KEY_B}", settings={**LOCAL, **settings})
    for headers in (A, B):
        assert api.load(headers=headers).status_code == 200
    return api


def submit(api: Api, url, headers=None, **kw) -> str:
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        json=v2_json(images(1), callback=url, **kw),
        headers=headers or {},
    )
    assert rv.status_code == 202, rv.json
    return rv.json["id"]


def dispatch(api: Api, until, timeout: float = 10.0, **kw) -> Dispatcher:
    """Run dispatcher rounds (no jitter: each pause is exactly half its ceiling) until until()."""
    dispatcher = Dispatcher(api.redis, api.settings, jitter=lambda: 0.0, **kw)
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        dispatcher.run_once()
        time.sleep(0.01)
    return dispatcher


def secret(api: Api, headers=None) -> str:
    rv = api.client.get("/v2/webhook-secret", headers=headers or {})
    assert rv.status_code == 200, rv.json
    return rv.json["secret"]


def job(api: Api, job_id: str, headers=None) -> dict:
    rv = api.client.get(f"/v2/jobs/{job_id}", headers=headers or {})
    assert rv.status_code == 200, rv.json
    return rv.json


def test_each_finished_job_gets_one_call_signed_with_its_own_keys_secret(receiver):
    api, hook = keyed_api(), receiver()
    mine = [submit(api, hook.url, A) for _ in range(2)]
    theirs = submit(api, hook.url, B)
    before = job(api, theirs, B)["callback"]
    assert before == {"url": hook.url, "state": "waiting"}
    api.burst()
    dispatch(api, lambda: len(hook.calls) >= 3)
    dispatch(api, lambda: False, timeout=0.3)  # more rounds: nothing is sent again
    calls = {json.loads(c.body)["id"]: c for c in hook.calls}
    assert len(hook.calls) == 3 and set(calls) == {*mine, theirs}
    secret_a, secret_b = secret(api, A), secret(api, B)
    assert secret_a != secret_b
    for job_id, headers, own, other in [
        (mine[0], A, secret_a, secret_b),
        (mine[1], A, secret_a, secret_b),
        (theirs, B, secret_b, secret_a),
    ]:
        call = calls[job_id]
        signature = call.headers[webhooks.SIGNATURE_HEADER]
        assert webhooks.verify(own, call.body, signature)
        assert not webhooks.verify(other, call.body, signature)
        assert not webhooks.verify(own, call.body.replace(b"finished", b"failed"), signature)
        body = json.loads(call.body)
        status = job(api, job_id, headers)
        assert body["status"] == "finished" and body["model"] == "tiny" and body["version"] == 1
        assert body["outputs"] == status["outputs"] and body["error"] is None
        assert body["timings"]["ended_at"] == status["timings"]["ended_at"]
        assert call.path == "/hook" and call.headers["X-Convq-Job"] == job_id
        assert call.headers["Content-Type"] == "application/json"
        assert status["callback"]["state"] == "delivered"
        assert status["callback"]["attempts"] == 1 and status["callback"]["last_status"] == 200


def test_the_signature_is_over_timestamp_and_body_and_goes_stale():
    body = b'{"id":"x"}'
    header = webhooks.sign("whsec_s", body, int(time.time()))
    assert webhooks.verify("whsec_s", body, header)
    old = webhooks.sign("whsec_s", body, int(time.time()) - 600)
    assert not webhooks.verify("whsec_s", body, old)  # a replay ten minutes later
    assert webhooks.verify("whsec_s", body, old, tolerance=900)
    t = header.split(",")[0][2:]
    moved = webhooks.sign("whsec_s", body, int(t) + 1).split(",")[1]
    assert not webhooks.verify("whsec_s", body, f"t={t},{moved}")
    assert not webhooks.verify("whsec_s", body, "v1=00") and not webhooks.verify(
        "whsec_s", body, ""
    )


def test_auth_off_signs_with_a_generated_server_secret_or_the_configured_one(receiver):
    hook = receiver()
    generated = Api(settings=LOCAL)
    assert generated.load().status_code == 200
    job_id = submit(generated, hook.url)
    generated.burst()
    dispatch(generated, lambda: hook.calls)
    call = hook.wait_calls(1)[0]
    assert webhooks.verify(secret(generated), call.body, call.headers[webhooks.SIGNATURE_HEADER])
    assert json.loads(call.body)["id"] == job_id
    assert generated.redis.exists(keys.webhook_secret())
    configured = Api(settings={**LOCAL, "webhook_secret": "s3cret-s3cret-s3cret"})
    expected = webhooks.key_secret(b"s3cret-s3cret-s3cret", None)
    assert secret(configured) == expected != secret(generated)
    keyed = Api(API_KEYS=KEY_A, settings={"webhook_secret": "s3cret-s3cret-s3cret"})
    assert secret(keyed, A) == webhooks.key_secret(b"s3cret-s3cret-s3cret", owner_id(KEY_A))
    assert keyed.client.get("/v2/webhook-secret").status_code == 401


def test_failed_and_canceled_jobs_are_reported_with_their_state(receiver):
    api, hook = keyed_api(), receiver()
    failing = submit(api, hook.url, A)
    store = api.app.extensions["convq"].store
    api.redis.delete(store.input_key(failing))  # the job will fail: its input is gone
    api.burst()
    canceled = submit(api, hook.url, A)
    assert api.client.delete(f"/v2/jobs/{canceled}", headers=A).json["status"] == "canceled"
    dispatch(api, lambda: len(hook.calls) >= 2)
    bodies = {b["id"]: b for b in (json.loads(c.body) for c in hook.calls)}
    assert len(hook.calls) == 2
    assert bodies[failing]["status"] == "failed" and "input" in bodies[failing]["error"]
    assert bodies[failing]["outputs"] is None
    assert bodies[canceled]["status"] == "canceled"
    # Deleting a job that already ended reports nothing more.
    assert api.client.delete(f"/v2/jobs/{failing}", headers=A).json["status"] == "deleted"
    dispatch(api, lambda: False, timeout=0.3)
    assert len(hook.calls) == 2


def test_a_failing_receiver_is_retried_with_growing_pauses_until_it_answers(receiver):
    api, hook = keyed_api(), receiver(answers=(500, 503, 200))
    job_id = submit(api, hook.url, A)
    api.burst()
    dispatcher = dispatch(api, lambda: hook.calls)
    state = job(api, job_id, A)["callback"]
    assert state["state"] == "pending" and state["attempts"] == 1 and state["last_status"] == 500
    assert state["next_attempt_at"] is not None and "500" in state["last_error"]
    dispatcher.run_once()  # not due yet: the pause (0.1 s) has not passed
    assert len(hook.calls) == 1
    dispatch(api, lambda: len(hook.calls) >= 3)
    dispatch(api, lambda: False, timeout=0.5)
    first, second, third = hook.calls
    assert len(hook.calls) == 3
    # Pauses: backoff 0.2 s doubling, jitter drawn as 0 (the lower half's edge): 0.1, then 0.2 s.
    assert second.at - first.at >= 0.1 and third.at - second.at >= 0.2
    assert first.body == second.body == third.body  # the same event, signed anew each time
    assert [c.headers["X-Convq-Attempt"] for c in hook.calls] == ["1", "2", "3"]
    state = job(api, job_id, A)["callback"]
    assert state["state"] == "delivered" and state["attempts"] == 3 and state["last_status"] == 200
    assert state["delivered_at"] is not None and state["next_attempt_at"] is None


def test_a_receiver_that_never_answers_2xx_is_given_up_after_the_attempts(receiver):
    api, hook = keyed_api(callback_attempts=3, callback_backoff=0.05), receiver(answers=(500,))
    job_id = submit(api, hook.url, A)
    api.burst()
    dispatch(api, lambda: job(api, job_id, A)["callback"]["state"] == "failed")
    dispatch(api, lambda: False, timeout=0.3)
    assert len(hook.calls) == 3
    state = job(api, job_id, A)["callback"]
    assert state["state"] == "failed" and state["attempts"] == 3 and state["last_status"] == 500
    assert not api.redis.zscore(keys.webhooks_due(), job_id)


def test_an_unreachable_receiver_is_a_failed_attempt_not_a_crash(receiver):
    hook = receiver()
    url = hook.url
    hook.close()  # nothing listens on that port any more
    api = keyed_api(callback_attempts=2, callback_backoff=0.05)
    job_id = submit(api, url, A)
    api.burst()
    dispatch(api, lambda: job(api, job_id, A)["callback"]["state"] == "failed")
    state = job(api, job_id, A)["callback"]
    assert state["attempts"] == 2 and state["last_status"] is None
    assert "connect" in state["last_error"]


def test_two_dispatchers_at_once_send_each_job_exactly_once(receiver):
    api, hook = keyed_api(), receiver()
    ids = [submit(api, hook.url, A) for _ in range(12)]
    api.burst()
    stop = threading.Event()

    def run():
        dispatcher = Dispatcher(api.redis, api.settings)
        while not stop.is_set():
            dispatcher.run_once()
            stop.wait(0.005)  # as serve() pauses: three spinning threads would starve the receiver

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    hook.wait_calls(12)
    time.sleep(0.3)
    stop.set()
    for t in threads:
        t.join(5)
    sent = [json.loads(c.body)["id"] for c in hook.calls]
    assert sorted(sent) == sorted(ids)


def test_a_claim_is_exclusive_until_released():
    api = Api()
    now = time.time()
    webhooks.record_due(api.redis, "j1", url="http://x/", owner=None, body=b"{}", keep=60, now=now)
    assert not webhooks.record_due(
        api.redis, "j1", url="http://y/", owner=None, body=b"{}", keep=60, now=now
    )
    assert webhooks.due(api.redis, now + 1, 10) == ["j1"]
    first = webhooks.claim(api.redis, "j1", "t1", lease=30, now=now + 1)
    assert first is not None and first["url"] == "http://x/"
    assert webhooks.claim(api.redis, "j1", "t2", lease=30, now=now + 1) is None
    webhooks.attempted(
        api.redis, "j1", "t1", attempts=1, delivered=True, code=204, error=None, next_at=None,
        now=now + 2,
    )  # fmt: skip
    assert webhooks.claim(api.redis, "j1", "t3", lease=30, now=now + 3) is None  # done
    assert webhooks.due(api.redis, now + 3, 10) == []


def test_jobs_keep_finishing_while_the_receiver_hangs_and_fails(receiver):
    hook = receiver(answers=(500, 200), hold=20.0)
    live = Live(workers=1, API_KEYS=KEY_A, settings={**LOCAL, "callback_backoff": 0.05})
    try:
        client = live.api.client
        assert live.api.load(headers=A).status_code == 200
        ids = []
        for _ in range(4):
            rv = client.post(
                "/v2/models/tiny/jobs", json=v2_json(images(1), callback=hook.url), headers=A
            )
            assert rv.status_code == 202, rv.json
            ids.append(rv.json["id"])
            hook.wait_calls(1)  # the dispatcher is stuck in the first call from here on
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [client.get(f"/v2/jobs/{i}", headers=A).json["status"] for i in ids]
            if all(s == "finished" for s in states):
                break
            time.sleep(0.02)
        assert states == ["finished"] * 4
        assert hook.answered == 0  # every job finished while the receiver had answered nothing
        hook.release()
        hook.wait_calls(5, timeout=20)  # the first call failed (500): 4 + 1 retry
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            found = [client.get(f"/v2/jobs/{i}", headers=A).json["callback"] for i in ids]
            if all(f["state"] == "delivered" for f in found):
                break
            time.sleep(0.02)
        assert [f["state"] for f in found] == ["delivered"] * 4
        sent = [json.loads(c.body)["id"] for c in hook.calls]
        first = sent[0]  # the first call to arrive was answered 500, then tried again
        assert sorted(sent) == sorted([*ids, first])
    finally:
        live.close()


def test_a_hung_receiver_does_not_hold_up_another_jobs_callback(receiver):
    hung, fine = receiver(hold=20.0), receiver()
    live = Live(workers=1, settings=LOCAL)
    try:
        client = live.api.client
        assert live.api.load().status_code == 200
        slow = client.post("/v2/models/tiny/jobs", json=v2_json(images(1), callback=hung.url))
        assert slow.status_code == 202
        hung.wait_calls(1)
        quick = client.post("/v2/models/tiny/jobs", json=v2_json(images(1), callback=fine.url))
        assert quick.status_code == 202
        calls = fine.wait_calls(1, timeout=15)
        assert [json.loads(c.body)["id"] for c in calls] == [quick.json["id"]]
        assert hung.answered == 0  # still hanging while the other callback went through
    finally:
        for r in (hung, fine):
            r.release()
        live.close()


INTERNAL = [
    "http://127.0.0.1:9/hook",
    "http://localhost/hook",
    "http://[::1]/",
    "http://10.1.2.3/",
    "http://192.168.0.10:8080/x",
    "http://172.16.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://224.0.0.1/",
    "http://0.0.0.0/",
    "http://100.64.0.1/",
    "http://[::ffff:127.0.0.1]/",
    "http://[fd00::1]/",
    "https://240.0.0.1/",
]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_addresses_are_refused_at_submit_by_default(url):
    api = Api()
    assert api.load().status_code == 200
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1), callback=url))
    assert rv.status_code == 400 and rv.json["field"] == "callback", rv.json
    assert "internal address" in rv.json["error"] and api.queue_keys() == 0


BAD = [
    ("ftp://example.com/x", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://example.com/", "scheme"),
    ("example.com/hook", "scheme"),
    ("http://", "no host"),
    ("http://user:pw@93.184.216.34/", "credentials"),
    ("http://93.184.216.34:99999/", "valid URL"),
    ("http://93.184.216.34/a b", "spaces"),
    ("http://93.184.216.34/" + "a" * 3000, "limit"),
    ("", "URL string"),
    (42, "URL string"),
    (["http://93.184.216.34/"], "URL string"),
]


@pytest.mark.parametrize(("url", "message"), BAD)
def test_bad_callback_urls_are_400(url, message):
    api = Api()
    assert api.load().status_code == 200
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1), callback=url))
    assert rv.status_code == 400 and rv.json["field"] == "callback", rv.json
    assert message in rv.json["error"] and api.queue_keys() == 0


def test_a_host_that_does_not_resolve_is_400(monkeypatch):
    def fail(host, port):
        raise OSError(f"[Errno -2] Name or service not known: {host}")

    monkeypatch.setattr(callbacks, "resolve_host", fail)
    api = Api()
    assert api.load().status_code == 200
    url = "http://no-such-host.invalid/"
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1), callback=url))
    assert rv.status_code == 400 and "does not resolve" in rv.json["error"]


def test_multipart_takes_one_callback_and_infer_takes_none(receiver):
    api, hook = Api(settings=LOCAL), receiver()
    assert api.load().status_code == 200
    image = ("a.npy", npy_bytes(images(1)[0]))
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        data={"images": [(_io(image[1]), image[0])], "callback": hook.url},
        content_type="multipart/form-data",
    )
    assert rv.status_code == 202, rv.json
    assert job(api, rv.json["id"])["callback"]["url"] == hook.url
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        data={"images": [(_io(image[1]), image[0])], "callback": [hook.url, hook.url]},
        content_type="multipart/form-data",
    )
    assert rv.status_code == 400 and rv.json["field"] == "callback"
    rv = api.client.post(
        "/v2/models/tiny/jobs",
        data={"images": [(_io(image[1]), image[0])], "callback": "http://10.0.0.1/"},
        content_type="multipart/form-data",
    )
    assert rv.status_code == 400 and "internal address" in rv.json["error"]
    rv = api.client.post("/v2/models/tiny/infer", json=v2_json(images(1), callback=hook.url))
    assert rv.status_code == 400 and rv.json["field"] == "callback"
    assert api.queue_keys() == 1


def _io(data: bytes):
    import io

    return io.BytesIO(data)


def test_redirects_are_not_followed_even_to_a_listening_internal_address(receiver):
    inside = receiver(host="127.0.0.2")  # loopback too, but not in CONVQ_CALLBACK_ALLOW
    hook = receiver(answers=((302, inside.url),))
    api = keyed_api(callback_attempts=2, callback_backoff=0.05)
    job_id = submit(api, hook.url, A)
    api.burst()
    dispatch(api, lambda: job(api, job_id, A)["callback"]["state"] == "failed")
    time.sleep(0.2)
    assert len(hook.calls) == 2 and inside.calls == []
    state = job(api, job_id, A)["callback"]
    assert state["last_status"] == 302 and "not followed" in state["last_error"]


def test_a_name_that_resolves_inside_at_delivery_is_not_connected_to(receiver, monkeypatch):
    """DNS rebinding: public at submit, loopback (where a receiver listens) at delivery."""
    hook = receiver()
    port = hook.server.server_port
    api = Api(settings={"callback_backoff": 0.05})
    assert api.load().status_code == 200
    monkeypatch.setattr(callbacks, "resolve_host", lambda host, port: ["93.184.216.34"])
    job_id = submit(api, f"http://hooks.example.com:{port}/hook")
    api.burst()
    monkeypatch.setattr(callbacks, "resolve_host", lambda host, port: ["127.0.0.1"])
    dispatch(api, lambda: job(api, job_id)["callback"]["state"] == "failed")
    state = job(api, job_id)["callback"]
    assert hook.calls == [] and state["attempts"] == 1  # refused for good, not retried
    assert "internal address" in state["last_error"]


def test_an_allowed_host_name_is_reached_at_its_address(receiver, monkeypatch):
    hook = receiver()
    port = hook.server.server_port
    api = Api(settings={"callback_allow": "hooks.internal"})
    assert api.load().status_code == 200
    monkeypatch.setattr(callbacks, "resolve_host", lambda host, port: ["127.0.0.1"])
    submit(api, f"http://hooks.internal:{port}/hook?x=1")
    api.burst()
    dispatch(api, lambda: hook.calls)
    call = hook.wait_calls(1)[0]
    assert call.path == "/hook?x=1" and call.headers["Host"] == f"hooks.internal:{port}"


@pytest.mark.parametrize(
    ("allow", "error"),
    [("10.0.0.0/33", "CIDR"), ("fd00::/200", "CIDR"), ("a b", "host name"), ("x/y", "CIDR")],
)
def test_a_bad_allow_list_stops_the_server(allow, error):
    with pytest.raises(ValueError, match=error):
        Api(settings={"callback_allow": allow})


def test_the_allow_list_takes_networks_and_names():
    allow = callbacks.Allow.parse(" 127.0.0.1/32, fd00::/8 ,Hooks.Internal., ")
    assert callbacks.check("http://127.0.0.1:1/", allow).port == 1
    assert callbacks.check("http://[fd00::5]/", allow).host == "fd00::5"
    with pytest.raises(callbacks.CallbackRefused):
        callbacks.check("http://127.0.0.2/", allow)
    target = callbacks.check("http://hooks.internal/", allow, lambda h, p: ["10.0.0.1"])
    assert target.host == "hooks.internal" and target.port == 80 and target.path == "/"
    with pytest.raises(callbacks.CallbackRefused, match="internal"):  # one of two is inside
        callbacks.check("https://mixed.example/", allow, lambda h, p: ["93.184.216.34", "10.0.0.1"])


def test_the_verify_snippet_in_the_docs_checks_our_signatures():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[2] / "docs/security.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/security.md", "exec"), scope)  # noqa: S102 - our own docs
    body = b'{"id":"ab","status":"finished"}'
    now = int(time.time())
    assert scope["verify"]("whsec_k", body, webhooks.sign("whsec_k", body, now))
    assert not scope["verify"]("whsec_k", body + b" ", webhooks.sign("whsec_k", body, now))
    assert not scope["verify"]("whsec_x", body, webhooks.sign("whsec_k", body, now))
    assert not scope["verify"]("whsec_k", body, webhooks.sign("whsec_k", body, now - 3600))
    assert not scope["verify"]("whsec_k", body, "garbage")


def test_a_receiver_dripping_its_answer_is_cut_at_twice_the_timeout():
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.1)  # each byte well inside the 0.5 s read timeout

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        api = keyed_api(callback_timeout=0.5, callback_attempts=1)
        job_id = submit(api, f"http://127.0.0.1:{listener.getsockname()[1]}/hook", A)
        api.burst()
        began = time.monotonic()
        Dispatcher(api.redis, api.settings).run_once()
        took = time.monotonic() - began
        state = job(api, job_id, A)["callback"]
        assert state["state"] == "failed" and state["last_error"] == "no answer within 1 s"
        assert 0.9 < took < 3.0
    finally:
        stop.set()
        listener.close()


def _queued(retries: int = 0):
    """A fakeredis with the tiny model and one queued job carrying a callback."""
    import fakeredis

    from tests.models import tiny_model
    from worker.contract.queue import make_queue, submit
    from worker.contract.store import Store

    redis = fakeredis.FakeRedis()
    store = Store(redis, result_ttl=300, input_ttl=600)
    queue = make_queue(redis)
    model = tiny_model(open_input=True)
    version = store.put_model("tiny", model.spec, model.to_safetensors(), owner=None)
    job_id = submit(
        queue,
        store,
        model="tiny",
        version=version,
        images=images(1),
        outputs=None,
        owner="key-1",
        meta={"model": "tiny", "callback": "http://93.184.216.34/hook"},
        retries=retries,
    )
    return redis, store, queue, job_id


def _recorded(redis, job_id) -> dict | None:
    raw = redis.hget(keys.webhook(job_id), "body")
    return None if raw is None else json.loads(raw)


def test_a_job_canceled_while_it_runs_is_reported_once_by_its_worker(monkeypatch):
    from worker import jobs
    from worker.contract.config import Settings
    from worker.runner import burst

    redis, store, queue, job_id = _queued()
    original = jobs._save_progress

    def cancel_at_layer_one(job, progress):
        original(job, progress)
        if progress and progress["layer"] == 1:
            store.mark_canceled(job.id)  # the mark alone: the worker must report it

    monkeypatch.setattr(jobs, "_save_progress", cancel_at_layer_one)
    monkeypatch.setattr(jobs, "PROGRESS_SECONDS", 0)
    burst(redis, Settings(threads=1))
    body = _recorded(redis, job_id)
    assert body is not None and body["status"] == "canceled" and body["outputs"] is None
    assert webhooks.due(redis, time.time() + 1, 10) == [job_id]
    assert redis.hget(keys.webhook(job_id), "owner") == b"key-1"


@pytest.mark.parametrize("retries", [0, 1])
def test_a_job_whose_worker_died_is_reported_failed_only_when_no_retry_is_left(retries):
    from rq.job import JobStatus
    from rq.registry import StartedJobRegistry

    from worker.reaper import reap_abandoned

    redis, store, queue, job_id = _queued(retries=retries)
    job = queue.fetch_job(job_id)
    redis.lrem(queue.key, 0, job_id)
    job.set_status(JobStatus.STARTED)
    redis.zadd(StartedJobRegistry(queue=queue).key, {f"{job_id}:deadbeef": time.time() - 5})
    assert reap_abandoned(queue, now=time.time() + 1) == [job_id]
    body = _recorded(redis, job_id)
    if retries:
        assert body is None  # re-queued: it has not ended
    else:
        assert body["status"] == "failed" and "worker died" in body["error"]


def _batch_of(api: Api, job_id: str) -> dict | None:
    from rq.job import Job
    from rq.serializers import JSONSerializer

    return Job.fetch(job_id, connection=api.redis, serializer=JSONSerializer).meta.get("batch")


def _calls_by_id(hook) -> dict[str, list]:
    calls: dict[str, list] = {}
    for call in hook.calls:
        calls.setdefault(json.loads(call.body)["id"], []).append(call)
    return calls


def test_batched_jobs_each_get_one_call_with_their_own_id_status_and_signature(receiver):
    api, hook = keyed_api(batch_wait_ms=0), receiver()
    store = api.app.extensions["convq"].store
    # each key has its own "tiny": A's three jobs are taken as one batch, B's runs alone
    jobs = [(submit(api, hook.url, h), h) for h in (A, A, B, A)]
    failing = jobs[1][0]
    api.redis.delete(store.input_key(failing))  # fails alone; its batch-mates run together
    api.burst()
    ran = [_batch_of(api, job_id) for job_id, _ in jobs]
    assert ran[1] is None and ran[2] is None and ran[0]["id"] == ran[3]["id"]
    dispatch(api, lambda: len(hook.calls) >= 4)
    dispatch(api, lambda: False, timeout=0.3)  # more rounds: nothing is sent again
    calls = _calls_by_id(hook)
    assert len(hook.calls) == 4 and set(calls) == {job_id for job_id, _ in jobs}
    secrets = {"A": secret(api, A), "B": secret(api, B)}
    for job_id, headers in jobs:
        (call,) = calls[job_id]
        own, other = (secrets["A"], secrets["B"]) if headers is A else (secrets["B"], secrets["A"])
        signature = call.headers[webhooks.SIGNATURE_HEADER]
        assert webhooks.verify(own, call.body, signature)
        assert not webhooks.verify(other, call.body, signature)
        body, status = json.loads(call.body), job(api, job_id, headers)
        assert call.headers["X-Convq-Job"] == job_id and body["status"] == status["status"]
        assert body["error"] == status["error"]
        assert status["callback"]["state"] == "delivered" and status["callback"]["attempts"] == 1
        if job_id == failing:
            assert body["status"] == "failed" and "input" in body["error"]
            assert body["outputs"] is None
        else:
            assert body["status"] == "finished" and body["error"] is None
            assert body["outputs"] == status["outputs"] == ["fc"]
            assert status["batch"] == (None if headers is B else {"jobs": 2, "images": 2})


@pytest.mark.parametrize("when", ["before", "during"])
def test_a_batch_with_a_canceled_job_still_calls_back_for_the_others(receiver, monkeypatch, when):
    import engine

    api, hook = keyed_api(batch_wait_ms=0), receiver()
    store = api.app.extensions["convq"].store
    ids = [submit(api, hook.url, A) for _ in range(3)]  # one key's: one batch
    canceled = ids[1]
    if when == "before":
        store.mark_canceled(canceled)  # what a cancel leaves for a job already taken
    else:
        run = engine.Model.run

        def canceling(self, *args, **kw):  # canceled while its batch runs
            store.mark_canceled(canceled)
            return run(self, *args, **kw)

        monkeypatch.setattr(engine.Model, "run", canceling)
    api.burst()
    dispatch(api, lambda: len(hook.calls) >= 3)
    dispatch(api, lambda: False, timeout=0.3)
    calls = _calls_by_id(hook)
    assert len(hook.calls) == 3 and set(calls) == set(ids)
    own = secret(api, A)
    for job_id in ids:
        (call,) = calls[job_id]
        assert webhooks.verify(own, call.body, call.headers[webhooks.SIGNATURE_HEADER])
        assert call.headers["X-Convq-Job"] == job_id
        body = json.loads(call.body)
        if job_id == canceled:
            assert body["status"] == "canceled" and body["outputs"] is None
            assert store.result_names(job_id) is None
        else:
            status = job(api, job_id, A)
            assert body["status"] == status["status"] == "finished"
            assert _batch_of(api, job_id)["id"] == _batch_of(api, ids[0])["id"]
            assert body["outputs"] == status["outputs"] and body["error"] is None
            assert store.result_names(job_id) == status["outputs"]
