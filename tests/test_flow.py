"""A sort seen by the whole group: same events, same order, nothing lost, nothing leaked."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from server import jobs

from .conftest import auth

TERMINAL = ("job.completed", "job.failed", "job.cancelled")


def is_end(f):
    return f["type"] in TERMINAL


async def test_three_members_see_the_same_sort(client, connect, make_group):
    group, songs = await make_group(["ann", "ben", "cat"], songs=60)
    members = [await connect(u) for u in ("ann", "ben", "cat")]
    for m in members:
        await m.request("join", group=group)
    acc = await members[1].request("sort", group=group)
    job_id = acc["job"]["id"]
    for m in members:
        await m.until(is_end)
    streams = [m.durable(group) for m in members]
    assert streams[0] == streams[1] == streams[2]
    seqs = [f["seq"] for f in streams[0]]
    assert seqs == list(range(1, len(seqs) + 1))
    types = [f["type"] for f in streams[0]]
    assert types[0] == "job.queued" and types[1] == "job.started" and types[-1] == "job.completed"
    assert {"job.progress", "job.partial", "playlist.updated"} <= set(types)
    stages = [f["stage"] for f in streams[0] if f["type"] == "job.progress"]
    assert stages.index("metadata") < stages.index("analysis") < stages.index("saving")
    partial_songs = [
        s["song"] for f in streams[0] if f["type"] == "job.partial" for s in f["songs"]
    ]
    assert sorted(partial_songs) == sorted(songs)

    result = streams[0][-1]["job"]["result"]
    assert streams[0][-1]["job"]["id"] == job_id
    assert sorted(result["order"]) == sorted(songs)
    assert sorted(s for c in result["categories"] for s in c["songs"]) == sorted(songs)
    assert (
        result["stats"]["songs"] == 60
        and result["stats"]["analysed"] + result["stats"]["cached"] == 60
    )

    resp = await client.get(f"/api/groups/{group}/playlist", headers=auth("cat"))
    playlist = await resp.json()
    assert [s["id"] for s in playlist["songs"]] == result["order"]
    assert [s["position"] for s in playlist["songs"]] == list(range(60))
    assert playlist["version"] == 1
    one = result["categories"][0]
    resp = await client.get(
        f"/api/groups/{group}/playlist?category={one['name']}", headers=auth("cat")
    )
    assert [s["id"] for s in (await resp.json())["songs"]] == [
        s for s in result["order"] if s in set(one["songs"])
    ]


async def test_join_since_replays_exactly_the_missed_events(connect, make_group):
    group, _ = await make_group(["dee", "eve"], songs=8)
    dee = await connect("dee")
    await dee.request("join", group=group)
    await dee.request("sort", group=group)
    await dee.until(is_end)
    seen = dee.durable(group)
    cut = seen[3]["seq"]
    eve = await connect("eve")
    joined = await eve.request("join", group=group, since=cut)
    assert joined["recovered"] is True and joined["seq"] == seen[-1]["seq"]
    replayed = [await eve.recv() for _ in range(len(seen) - 4)]
    assert replayed == seen[4:]
    # And live events continue right after, with no gap and no repeat.
    await dee.request("sort", group=group)
    await eve.until(is_end)
    seqs = [f["seq"] for f in eve.durable(group)]
    assert seqs == list(range(cut + 1, seqs[-1] + 1))


async def test_join_since_ahead_of_the_store_is_not_recovered(connect, make_group):
    group, _ = await make_group(["fay"])
    s = await connect("fay")
    joined = await s.request("join", group=group, since=999)
    assert joined["recovered"] is False and joined["seq"] == 0
    current = await s.request("join", group=group, since=0)
    assert current["recovered"] is True


@pytest.mark.workers(0)
async def test_twenty_concurrent_sorts_make_one_job(client, connect, make_group):
    users = ["gus", "hal", "ida", "jay"]
    group, _ = await make_group(users)
    socks = [await connect(u) for u in users]
    replies = await asyncio.gather(
        *(socks[i % 4].request("sort", group=group) for i in range(16)),
        *(client.post(f"/api/groups/{group}/smart-sort", headers=auth(users[i])) for i in range(4)),
    )
    ws_jobs = [r["job"]["id"] for r in replies[:16]]
    http = [await r.json() for r in replies[16:]]
    ids = set(ws_jobs) | {h["job"]["id"] for h in http}
    assert len(ids) == 1
    flags = [r["deduplicated"] for r in replies[:16]] + [h["deduplicated"] for h in http]
    assert flags.count(False) == 1
    resp = await client.get(f"/api/groups/{group}/jobs", headers=auth("gus"))
    assert [j["id"] for j in (await resp.json())["jobs"]] == list(ids)


@pytest.mark.workers(0)
async def test_idempotency_key_returns_the_same_job_whatever_its_state(client, connect, make_group):
    group, _ = await make_group(["kim"])
    s = await connect("kim")
    first = await s.request("sort", group=group, idempotency_key="k-1")
    await s.request("cancel", job=first["job"]["id"])
    again = await s.request("sort", group=group, idempotency_key="k-1")
    assert again["job"]["id"] == first["job"]["id"] and again["deduplicated"] is True
    assert again["job"]["status"] == "cancelled"
    resp = await client.post(
        f"/api/groups/{group}/smart-sort", headers={**auth("kim"), "Idempotency-Key": "k-1"}
    )
    assert (await resp.json())["job"]["id"] == first["job"]["id"]
    fresh = await s.request("sort", group=group, idempotency_key="k-2")
    assert fresh["job"]["id"] != first["job"]["id"] and fresh["deduplicated"] is False


async def test_members_never_receive_another_groups_events(connect, make_group):
    g1, _ = await make_group(["lou"], songs=6)
    g2, _ = await make_group(["max"], songs=6)
    lou, mx = await connect("lou"), await connect("max")
    await lou.request("join", group=g1)
    await mx.request("join", group=g2)
    assert (await mx.request("join", group=g1))["code"] == "forbidden"
    await lou.request("sort", group=g1)
    await mx.request("sort", group=g2)
    await lou.until(is_end)
    await mx.until(is_end)
    assert all(f.get("group") in (None, g1) for f in lou.frames)
    assert all(f.get("group") in (None, g2) for f in mx.frames)
    assert g1 not in str([f for f in mx.frames if f["type"] != "error"])


@pytest.mark.workers(0)
async def test_songs_added_during_a_sort_are_kept(
    client, connect, make_group, aiohttp_client, app_factory
):
    slow = await aiohttp_client(app_factory(workers=1, step_delay_s=0.3, analysis_batch_size=2))
    # Unique titles: nothing is cached, so the sort is still analysing when the playlist changes.
    group, songs = await make_group(["ned"], songs=6, unique=True)
    s = await connect("ned", tc=slow)
    await s.request("join", group=group)
    await s.request("sort", group=group)
    await s.until(lambda f: f["type"] == "job.partial")
    resp = await slow.post(
        f"/api/groups/{group}/songs",
        headers=auth("ned"),
        json={"title": "Late Arrival", "artist": "Tardy"},
    )
    assert resp.status == 201
    late = (await resp.json())["songs"][0]["id"]
    await slow.delete(f"/api/groups/{group}/songs/{songs[0]}", headers=auth("ned"))
    done = await s.until(is_end)
    order = done["job"]["result"]["order"]
    assert sorted(order) == sorted([*songs[1:], late])
    assert order[-1] == late
    assert done["job"]["result"]["categories"][-1] == {"name": "Just added", "songs": [late]}


async def test_a_repeat_sort_pays_for_nothing_twice(connect, make_group):
    group, _ = await make_group(["oz"], songs=30, unique=True)
    s = await connect("oz")
    await s.request("join", group=group)
    await s.request("sort", group=group)
    first = (await s.until(is_end))["job"]["result"]["stats"]
    assert (first["analysed"], first["cached"]) == (30, 0)
    await s.request("sort", group=group)
    second = (await s.until(is_end))["job"]["result"]["stats"]
    assert (second["analysed"], second["cached"]) == (0, 30)


async def test_events_past_retention_are_pruned_and_resume_says_not_recovered(
    connect, make_group, pool
):
    from server import events

    group, _ = await make_group(["pru"])
    async with pool.acquire() as conn, conn.transaction():
        for i in range(3):
            await events.append(conn, group, "playlist.updated", version=i, change="song_added")
    await pool.execute(
        "UPDATE group_events SET ts = now() - interval '8 days' WHERE group_id = $1 AND seq <= 2",
        group,
    )
    assert await events.prune(pool, 7 * 86400) == 2
    s = await connect("pru")
    gone = await s.request("join", group=group, since=0)
    assert gone["recovered"] is False and gone["seq"] == 3
    kept = await s.request("join", group=group, since=2)
    assert kept["recovered"] is True
    replayed = await s.until(lambda f: f["type"] == "playlist.updated")
    assert replayed["seq"] == 3


@pytest.mark.workers(0)
async def test_the_one_statement_enqueue_stores_exactly_what_it_publishes(
    client, connect, make_group, pool
):
    group, _ = await make_group(["one-ann", "one-bob"], songs=2)
    s = await connect("one-bob")
    await s.request("join", group=group)
    accepted = await s.request("sort", group=group, options={"mode": "flow"})
    queued = await s.until(lambda f: f["type"] == "job.queued")
    # The job in the reply, in the event, and in the database agree.
    assert queued["job"] == accepted["job"]
    row = await pool.fetchrow(
        "SELECT data FROM group_events WHERE group_id = $1 AND seq = $2", group, queued["seq"]
    )
    stored = orjson.loads(row["data"])
    assert stored == queued
    assert list(stored) == ["type", "group", "seq", "ts", "job"]  # events.append's field order
    job = await pool.fetchrow("SELECT * FROM jobs WHERE id = $1::uuid", accepted["job"]["id"])
    assert jobs.job_object(job) == accepted["job"]
    assert job["options"] == {"mode": "flow"} and job["requested_by"] == "one-bob"
    # Refusals come from the same statement, and leave nothing behind.
    stranger = await connect("one-eve")
    refused = await stranger.request("sort", group=group)
    assert refused["code"] == "forbidden"
    missing = await stranger.request("sort", group="no-such-group-here")
    assert missing["code"] == "not_found"
    count = await pool.fetchval("SELECT count(*) FROM jobs WHERE group_id = $1", group)
    assert count == 1
