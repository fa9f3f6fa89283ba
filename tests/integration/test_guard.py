"""Auth off: foreign Hosts and cross-origin writes are refused; answers carry security headers."""

from __future__ import annotations

import pytest

from tests.integration.apikit import Api, images, v2_json

HOME = "http://localhost"


@pytest.fixture
def api():
    api = Api()
    assert api.load().status_code == 200
    return api


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "localhost.evil.example"])
def test_a_foreign_host_is_refused_with_auth_off(api, host):
    for method, path in [
        ("get", "/v2/models/tiny"),
        ("get", "/"),
        ("post", "/v2/repository/index"),
    ]:
        rv = getattr(api.client, method)(path, headers={"Host": host})
        assert rv.status_code == 400 and rv.json["field"] == "Host", (method, path)
    # Probes keep answering whatever Host they send.
    assert api.client.get("/v2/health/live", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:9", "[::1]:8000"])
def test_loopback_hosts_are_answered(api, host):
    assert api.client.get("/v2/models/tiny", headers={"Host": host}).status_code == 200


def test_allowed_hosts_are_configurable():
    api = Api(ALLOWED_HOSTS="convq.lan, Other.LAN")
    assert api.client.get("/v2", headers={"Host": "convq.lan:8000"}).status_code == 200
    assert api.client.get("/v2", headers={"Host": "other.lan"}).status_code == 200
    assert api.client.get("/v2", headers={"Host": "localhost"}).status_code == 400
    assert Api(ALLOWED_HOSTS="*").client.get("/v2", headers={"Host": "x.y"}).status_code == 200


@pytest.mark.parametrize(
    "header, value",
    [
        ("Origin", "http://evil.example"),
        ("Origin", "null"),
        ("Origin", "http://localhost:8001"),
        ("Origin", "https://localhost"),
        ("Referer", "http://evil.example/page.html"),
    ],
)
def test_cross_origin_writes_are_refused_with_auth_off(api, header, value):
    rv = api.client.post("/v2/repository/models/tiny/unload", headers={header: value})
    assert rv.status_code == 403 and rv.json["field"] == header
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1)), headers={header: value})
    assert rv.status_code == 403
    assert api.queue_keys() == 0
    assert api.client.get("/v2/models/tiny/ready").status_code == 200  # still loaded


def test_same_origin_and_non_browser_writes_pass(api):
    same = {"Origin": HOME, "Referer": HOME + "/"}
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1)), headers=same)
    assert rv.status_code == 202
    rv = api.client.post("/v2/models/tiny/jobs", json=v2_json(images(1)))  # curl: neither
    assert rv.status_code == 202
    # Reads carry no Origin check: a page cannot read another origin's answers anyway.
    assert api.client.get("/v2/models/tiny", headers={"Origin": "http://x"}).status_code == 200


def test_with_auth_on_the_key_is_the_guard():
    key = "key-a-0123456789ab"
    api = Api(API_KEYS=key)
    auth = {"Authorization": f"Bearer {key}", "Origin": "http://elsewhere", "Host": "api.lan"}
    assert api.client.post("/v2/repository/index", headers=auth).status_code == 200


def test_security_headers_on_the_page_and_the_api(api):
    page = api.client.get("/")
    page.close()
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp
    for rv in (api.client.get("/v2/models/tiny"), api.client.get("/v2/models/nope")):
        assert rv.headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in rv.headers["Content-Security-Policy"]
        assert rv.headers["X-Frame-Options"] == "DENY"
