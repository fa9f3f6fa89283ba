"""GET /v2/jobs: a key's own jobs, newest first, page by page, filtered by status and model."""

from __future__ import annotations

import pytest

from tests.integration.apikit import Api, images, v2_json

A = {"Authorization": "Bearer key-a-0123456789ab"}
B = {"Authorization": "Bearer key-b-0123456789ab"}


@pytest.fixture
def api():
    api = Api(API_KEYS="key-a-0123456789ab, key-b-0123456789ab")
    for headers in (A, B):
        assert api.load(headers=headers).status_code == 200
    return api


def submit(api, headers, name="tiny") -> str:
    rv = api.client.post(f"/v2/models/{name}/jobs", json=v2_json(images(1)), headers=headers)
    assert rv.status_code == 202, rv.json
    return rv.json["id"]


def listing(api, headers, **query) -> dict:
    rv = api.client.get("/v2/jobs", query_string=query, headers=headers)
    assert rv.status_code == 200, rv.json
    return rv.json


def every_page(api, headers, **query) -> list[dict]:
    items, cursor, pages = [], None, 0
    while True:
        page = listing(api, headers, **query, **({"cursor": cursor} if cursor else {}))
        items += page["jobs"]
        pages += 1
        cursor = page["next"]
        if cursor is None:
            return items
        assert pages < 100


def test_two_keys_never_see_each_others_jobs_newest_first(api):
    mine = [submit(api, A) for _ in range(3)]
    theirs = [submit(api, B) for _ in range(2)]
    a, b = listing(api, A), listing(api, B)
    assert [j["id"] for j in a["jobs"]] == mine[::-1] and a["next"] is None
    assert [j["id"] for j in b["jobs"]] == theirs[::-1]
    job = a["jobs"][0]
    assert set(job) == {"id", "model", "status", "created"}
    assert job["model"] == "tiny" and job["status"] == "queued"
    created = [j["created"] for j in a["jobs"]]
    assert created == sorted(created, reverse=True)


def test_pages_cover_every_job_once_even_with_jobs_added_between_pages(api):
    ids = [submit(api, A) for _ in range(7)]
    first = listing(api, A, limit=3)
    assert len(first["jobs"]) == 3 and first["next"]
    late = submit(api, A)  # newer than the cursor: on no later page, first on a fresh listing
    rest = []
    cursor = first["next"]
    while cursor:
        page = listing(api, A, limit=3, cursor=cursor)
        rest += [j["id"] for j in page["jobs"]]
        cursor = page["next"]
    assert [j["id"] for j in first["jobs"]] + rest == ids[::-1]
    assert [j["id"] for j in every_page(api, A, limit=3)] == [late, *ids[::-1]]


def test_equal_enqueue_times_are_paged_without_loss(api, monkeypatch):
    import worker.contract.queue as q

    monkeypatch.setattr(q.time, "time", lambda: 1_700_000_000.5)
    ids = [submit(api, A) for _ in range(5)]
    got = [j["id"] for j in every_page(api, A, limit=2)]
    assert sorted(got) == sorted(ids) and len(got) == 5


def test_filters_by_status_and_model(api):
    api.load(name="other", headers=A)
    done = [submit(api, A) for _ in range(2)]
    api.burst()
    waiting = submit(api, A)
    other = submit(api, A, name="other")
    assert [j["id"] for j in listing(api, A, status="finished")["jobs"]] == done[::-1]
    assert [j["id"] for j in listing(api, A, status="queued")["jobs"]] == [other, waiting]
    assert [j["id"] for j in listing(api, A, model="other")["jobs"]] == [other]
    assert [j["id"] for j in listing(api, A, model="tiny", status="queued")["jobs"]] == [waiting]
    assert listing(api, A, status="failed")["jobs"] == []
    # Filtered pages still cover every match exactly once.
    assert [j["id"] for j in every_page(api, A, model="tiny", limit=1)] == [waiting, *done[::-1]]


def test_deleted_jobs_drop_out_of_the_list(api):
    ids = [submit(api, A) for _ in range(3)]
    assert api.client.delete(f"/v2/jobs/{ids[1]}", headers=A).status_code == 200
    (key,) = api.redis.keys("convq:jobs:*")
    assert api.redis.zcard(key) == 3
    assert [j["id"] for j in listing(api, A)["jobs"]] == [ids[2], ids[0]]
    assert api.redis.zcard(key) == 2  # the gone job's id left the list as it was met


def test_list_key_carries_a_ttl(api):
    submit(api, A)
    (key,) = api.redis.keys("convq:jobs:*")
    ttl = api.redis.ttl(key)
    assert ttl >= api.settings.result_ttl + api.settings.input_ttl


def test_without_auth_every_callers_jobs_are_listed():
    api = Api()
    assert api.load().status_code == 200
    ids = [submit(api, {}) for _ in range(2)]
    assert [j["id"] for j in listing(api, {})["jobs"]] == ids[::-1]


@pytest.mark.parametrize(
    "query",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "-1"},
        {"limit": "ten"},
        {"limit": "1.5"},
        {"status": "done"},
        {"cursor": "!!!"},
        {"cursor": ""},
        {"cursor": "bm9wZQ"},  # "nope"
        {"cursor": "bmFuOmFi"},  # "nan:ab"
        {"model": "x" * 300},
        {"sort": "asc"},
        {"limit": ["1", "2"]},
    ],
)
def test_bad_query_values_are_400(api, query):
    rv = api.client.get("/v2/jobs", query_string=query, headers=A)
    assert rv.status_code == 400 and "error" in rv.json, (query, rv.json)


def test_listing_needs_a_key(api):
    assert api.client.get("/v2/jobs").status_code == 401


@pytest.mark.parametrize("scan", [1, 2, 3, 200])
@pytest.mark.parametrize("limit", [1, 2, 5])
def test_pages_across_read_batches_with_filters_and_gone_jobs(api, monkeypatch, scan, limit):
    import worker.contract.queue as q

    monkeypatch.setattr(q, "LIST_SCAN", scan)
    api.load(name="other", headers=A)
    ids = [submit(api, A, name="tiny" if i % 3 else "other") for i in range(10)]
    for gone in (ids[4], ids[7]):
        assert api.client.delete(f"/v2/jobs/{gone}", headers=A).status_code == 200
    live = [i for i in ids[::-1] if i not in (ids[4], ids[7])]
    tiny = [i for i in ids[::-1] if i in live and ids.index(i) % 3]
    assert [j["id"] for j in every_page(api, A, limit=limit)] == live
    assert [j["id"] for j in every_page(api, A, limit=limit, model="tiny")] == tiny
