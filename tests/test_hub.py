"""The hub's ordering: events that cross on their way are put back in order from memory, a lost
one is read back from PostgreSQL, and events committed in a process reach its own members
without Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from server import events, hub
from server.events import PUBLISHER_KEY, Event
from server.metrics import METRICS

from .conftest import token
from .helpers import Socket


async def _append(pool: asyncpg.Pool, group: str, n: int) -> list[Event]:
    """Commit ``n`` events of the group, as the service does, without publishing them."""
    async with pool.acquire() as conn, conn.transaction():
        return [
            await events.append(conn, group, "playlist.updated", version=i, change="song_added")
            for i in range(n)
        ]


async def _member(aiohttp_client, app_factory, group: str, user: str) -> tuple[Socket, int]:
    """A joined socket on a fresh app (started after the test's own settings), and its seq."""
    client = await aiohttp_client(app_factory(workers=0))
    sock = Socket(await client.ws_connect(f"/ws?token={token(user)}"))
    assert (await sock.recv())["type"] == "hello"
    joined = await sock.request("join", group=group)
    return sock, joined["seq"]


def _fills() -> float:
    return METRICS.gap_fills._value.get()


async def test_events_that_cross_on_their_way_are_put_in_order_from_memory(
    aiohttp_client, app_factory, make_group, pool, redis, monkeypatch
):
    # Only the missing event's own arrival can close the gap: no wait runs out, no check runs.
    monkeypatch.setattr(hub, "GAP_WAIT_S", 3600)
    monkeypatch.setattr(hub, "CATCH_UP_EVERY_S", 3600)
    group, _ = await make_group(["ola"])
    sock, seq = await _member(aiohttp_client, app_factory, group, "ola")
    first, second = await _append(pool, group, 2)
    fills = _fills()
    await events.publish(redis, [second])  # the later event overtakes the earlier one
    await events.publish(redis, [first])
    got = [await sock.until(lambda f: f.get("seq", 0) > seq) for _ in range(2)]
    assert [f["seq"] for f in got] == [first.seq, second.seq]
    assert _fills() == fills  # put in order without reading PostgreSQL


async def test_a_lost_event_is_read_back_before_the_one_after_it(
    aiohttp_client, app_factory, make_group, pool, redis
):
    group, _ = await make_group(["pat"])
    sock, seq = await _member(aiohttp_client, app_factory, group, "pat")
    first, second = await _append(pool, group, 2)
    fills = _fills()
    await events.publish(redis, [second])  # `first` never arrives, as when pub/sub drops it
    got = [await sock.until(lambda f: f.get("seq", 0) > seq) for _ in range(2)]
    assert [f["seq"] for f in got] == [first.seq, second.seq]
    assert _fills() == fills + 1


async def test_members_on_the_committing_process_hear_of_it_without_redis(
    aiohttp_client, app_factory, make_group, monkeypatch, tmp_path: Path
):
    monkeypatch.setattr(hub, "CATCH_UP_EVERY_S", 3600)  # no periodic read-back either
    group, _ = await make_group(["quinn"])
    client = await aiohttp_client(app_factory(workers=0))
    sock = Socket(await client.ws_connect(f"/ws?token={token('quinn')}"))
    await sock.recv()
    seq = (await sock.request("join", group=group))["seq"]
    # From here on every publish of this process fails (softly, as when Redis is down).
    app = client.server.app
    nowhere = aioredis.from_url(f"unix://{tmp_path}/no-redis-here.sock")
    app[PUBLISHER_KEY].redis = nowhere
    try:
        accepted = await sock.request("sort", group=group)
        queued = await sock.until(lambda f: f["type"] == "job.queued")
        assert queued["job"]["id"] == accepted["job"]["id"] and queued["seq"] == seq + 1
        types = [f["type"] for f in sock.frames]
        assert types.index("sort.accepted") < types.index("job.queued")  # the reply first
    finally:
        await nowhere.aclose()


async def test_a_big_groups_fan_out_lets_other_groups_through_and_keeps_its_order(
    redis, pool, monkeypatch
):
    monkeypatch.setattr(hub, "FAN_OUT_CHUNK", 4)
    relay = hub.Hub(redis, pool)
    sent: list[tuple[str, bytes]] = []

    def feed_of(group: str, sockets: int) -> hub.Feed:
        feed = relay.feeds[group] = hub.Feed()
        feed.ready.set()
        for i in range(sockets):
            cursor = hub.Cursor(lambda data, key, who=f"{group}/{i}": sent.append((who, data)))
            cursor.go_live(0)
            feed.subscribers.add(cursor)
        return feed

    big, small = feed_of("big", 10), feed_of("small", 1)
    relay.accept("big", big, 1, b"b1")
    relay.accept("big", big, 2, b"b2")  # waits behind b1, in order
    relay.accept("small", small, 1, b"s1")  # not behind the big group's 20 sends
    assert sent == [("small/0", b"s1")]
    await asyncio.sleep(0)  # the big group's task sends its first chunk, then lets others run
    assert len(sent) == 1 + 4
    relay.accept("small", small, 2, b"s2")
    await asyncio.gather(*relay.tasks)
    assert sent.index(("small/0", b"s2")) == 5  # between the big group's chunks
    for i in range(10):
        assert [data for who, data in sent if who == f"big/{i}"] == [b"b1", b"b2"]
    assert len(sent) == 2 + 20 and big.backlog is None
