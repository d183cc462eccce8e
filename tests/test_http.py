"""HTTP routes: the old front end's smart-sort, polling, SSE, the playlist, health and metrics."""

from __future__ import annotations

import asyncio
import io

import orjson
import pytest

from .conftest import auth, token


async def test_smart_sort_answers_like_the_quick_fix_and_more(client, make_group):
    group, songs = await make_group(["oli"], songs=5)
    resp = await client.post(f"/api/groups/{group}/smart-sort", headers=auth("oli"))
    assert resp.status == 202
    data = await resp.json()
    assert data["success"] is True
    assert data["message"] == "Smart sort started. Processing in background..."
    assert data["deduplicated"] is False and data["job"]["group"] == group
    job_id = data["job"]["id"]
    # Poll like an old client would, until the worker is done.
    async with asyncio.timeout(20):
        while True:
            job = await (await client.get(f"/api/jobs/{job_id}", headers=auth("oli"))).json()
            if job["status"] == "completed":
                break
            await asyncio.sleep(0.05)
    assert sorted(job["result"]["order"]) == sorted(songs)


async def test_old_front_end_reads_data_error_on_failure(client, make_group):
    group, _ = await make_group(["pat"])
    cases = [
        (client.post(f"/api/groups/{group}/smart-sort"), 401, "unauthorized"),
        (
            client.post(f"/api/groups/{group}/smart-sort", headers=auth("stranger")),
            403,
            "forbidden",
        ),
        (client.post("/api/groups/nope/smart-sort", headers=auth("pat")), 404, "not_found"),
        (
            client.post(f"/api/groups/{group}/smart-sort", headers=auth("pat"), data=b"[1]"),
            400,
            "bad_request",
        ),
        (
            client.post(f"/api/groups/{group}/smart-sort", headers=auth("pat"), data=b"{bad"),
            400,
            "bad_request",
        ),
        (client.get("/api/jobs/123", headers=auth("pat")), 404, "not_found"),
        (client.get("/api/nothing/here", headers=auth("pat")), 404, "not_found"),
        (
            client.post(
                f"/api/groups/{group}/songs",
                headers=auth("pat"),
                data=io.BytesIO(b"x" * (1024 * 1024 + 10)),
            ),
            413,
            "too_large",
        ),
    ]
    for request, status, code in cases:
        resp = await request
        body = await resp.json()
        assert (resp.status, body["code"], body["success"]) == (status, code, False), body
        assert isinstance(body["error"], str) and body["error"]


async def test_non_members_are_refused_on_every_route(client, make_group, connect):
    group, songs = await make_group(["quin"], songs=2)
    acc = await (await client.post(f"/api/groups/{group}/smart-sort", headers=auth("quin"))).json()
    job = acc["job"]["id"]
    out = auth("mallory")
    for method, path in [
        ("POST", f"/api/groups/{group}/smart-sort"),
        ("GET", f"/api/groups/{group}/jobs"),
        ("GET", f"/api/groups/{group}/events"),
        ("GET", f"/api/groups/{group}/playlist"),
        ("POST", f"/api/groups/{group}/songs"),
        ("DELETE", f"/api/groups/{group}/songs/{songs[0]}"),
    ]:
        resp = await client.request(method, path, headers=out, json={"title": "x", "artist": "y"})
        assert resp.status == 403, (method, path)
        assert (await resp.json())["code"] == "forbidden"
    for method, path in [("GET", f"/api/jobs/{job}"), ("POST", f"/api/jobs/{job}/cancel")]:
        resp = await client.request(method, path, headers=out)
        body = await resp.json()
        assert resp.status == 404 and job not in str(body) and group not in str(body)
    m = await connect("mallory")
    for kind, fields in (
        ("join", {"group": group}),
        ("sort", {"group": group}),
        ("job.get", {"job": job}),
        ("cancel", {"job": job}),
    ):
        reply = await m.request(kind, **fields)
        assert reply["type"] == "error" and reply["code"] in ("forbidden", "not_found")
        assert "snapshot" not in reply and "job" not in reply


@pytest.mark.workers(0)
async def test_cancel_and_recent_jobs(client, make_group):
    group, _ = await make_group(["rae", "sam"])
    first = await (await client.post(f"/api/groups/{group}/smart-sort", headers=auth("rae"))).json()
    resp = await client.post(f"/api/jobs/{first['job']['id']}/cancel", headers=auth("sam"))
    assert resp.status == 200 and (await resp.json())["job"]["status"] == "cancelled"
    second = await (
        await client.post(f"/api/groups/{group}/smart-sort", headers=auth("sam"))
    ).json()
    jobs = (
        await (await client.get(f"/api/groups/{group}/jobs?limit=5", headers=auth("rae"))).json()
    )["jobs"]
    assert [j["id"] for j in jobs] == [second["job"]["id"], first["job"]["id"]]
    one = (
        await (await client.get(f"/api/groups/{group}/jobs?limit=1", headers=auth("rae"))).json()
    )["jobs"]
    assert len(one) == 1
    bad = await client.get(f"/api/groups/{group}/jobs?limit=0", headers=auth("rae"))
    assert bad.status == 400


async def test_songs_single_and_bulk_broadcast_one_event_each(client, connect, make_group):
    group, _ = await make_group(["tia"], songs=0)
    s = await connect("tia")
    await s.request("join", group=group)
    resp = await client.post(
        f"/api/groups/{group}/songs",
        headers=auth("tia"),
        json={"title": "Solo", "artist": "One", "metadata": {"genre": "jazz"}},
    )
    assert resp.status == 201
    solo = (await resp.json())["songs"][0]
    assert solo["title"] == "Solo" and solo["added_by"] == "tia" and solo["category"] is None
    ev = await s.until(lambda f: f["type"] == "playlist.updated")
    assert ev["change"] == "song_added" and ev["song"] == solo["id"] and ev["version"] == 1
    bulk = [{"title": f"T{i}", "artist": "Many"} for i in range(300)]
    resp = await client.post(
        f"/api/groups/{group}/songs", headers=auth("tia"), json={"songs": bulk}
    )
    added = (await resp.json())["songs"]
    assert resp.status == 201 and [a["title"] for a in added] == [b["title"] for b in bulk]
    ev = await s.until(lambda f: f["type"] == "playlist.updated")
    assert ev["version"] == 2 and ev["songs"] == [a["id"] for a in added]
    too_many = await client.post(
        f"/api/groups/{group}/songs",
        headers=auth("tia"),
        json={"songs": [{"title": "x", "artist": "y"}] * 1001},
    )
    assert too_many.status == 400
    bad = await client.post(
        f"/api/groups/{group}/songs", headers=auth("tia"), json={"title": 5, "artist": "y"}
    )
    assert bad.status == 400 and "title" in (await bad.json())["error"]
    resp = await client.delete(f"/api/groups/{group}/songs/{solo['id']}", headers=auth("tia"))
    assert resp.status == 204
    ev = await s.until(lambda f: f["type"] == "playlist.updated")
    assert ev == {**ev, "change": "song_removed", "song": solo["id"], "version": 3}
    again = await client.delete(f"/api/groups/{group}/songs/{solo['id']}", headers=auth("tia"))
    assert again.status == 404
    playlist = await (await client.get(f"/api/groups/{group}/playlist", headers=auth("tia"))).json()
    assert playlist["version"] == 3 and len(playlist["songs"]) == 300


async def read_sse(resp, count):
    """Parse ``count`` SSE events (id, event, data) from a streaming response."""
    out, current = [], {}
    while len(out) < count:
        line = (await resp.content.readline()).decode().rstrip("\n")
        if line == "":
            if "data" in current:
                out.append(current)
            current = {}
        elif not line.startswith(":"):
            key, _, value = line.partition(": ")
            current[key] = value
    return out


async def test_sse_streams_and_resumes_from_last_event_id(client, connect, make_group):
    group, _ = await make_group(["uma"], songs=4)
    s = await connect("uma")
    await s.request("join", group=group)
    resp = await client.get(f"/api/groups/{group}/events?token={token('uma')}")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    await s.request("sort", group=group)
    await s.until(lambda f: f["type"] == "job.completed")
    sock_events = s.durable(group)
    streamed = await asyncio.wait_for(read_sse(resp, len(sock_events)), 20)
    assert [orjson.loads(e["data"]) for e in streamed] == sock_events
    assert [int(e["id"]) for e in streamed] == [f["seq"] for f in sock_events]
    assert [e["event"] for e in streamed] == [f["type"] for f in sock_events]
    resp.close()
    resumed = await client.get(
        f"/api/groups/{group}/events",
        headers={**auth("uma"), "Last-Event-ID": str(sock_events[2]["seq"])},
    )
    rest = await asyncio.wait_for(read_sse(resumed, len(sock_events) - 3), 20)
    assert [orjson.loads(e["data"]) for e in rest] == sock_events[3:]
    resumed.close()


async def test_health_ready_metrics_and_the_demo_page(client):
    assert (await client.get("/healthz")).status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json()) == {"ok": True}
    metrics = await (await client.get("/metrics")).text()
    assert "smartsort_ws_connections" in metrics and "smartsort_jobs_queued_total" in metrics
    page = await client.get("/")
    assert page.status == 200 and "Smart Sort Live" in await page.text()


async def test_readyz_names_the_failed_backend(aiohttp_client, app_factory, tmp_path):
    c = await aiohttp_client(app_factory(workers=0, redis_url=f"unix://{tmp_path}/none.sock"))
    resp = await c.get("/readyz")
    body = await resp.json()
    assert resp.status == 503 and body["success"] is False and "redis" in body["failed"]
    assert "postgres" not in body["failed"]


async def test_demo_token_only_in_demo_mode(aiohttp_client, app_factory):
    demo = await aiohttp_client(app_factory(workers=0))
    resp = await demo.post("/api/demo/token", json={"user": "alice"})
    tok = (await resp.json())["token"]
    ws = await demo.ws_connect(f"/ws?token={tok}")
    assert (await ws.receive_json())["user"] == "alice"
    await ws.close()
    plain = await aiohttp_client(app_factory(workers=0, demo=False))
    resp = await plain.post("/api/demo/token", json={"user": "alice"})
    assert resp.status == 404
