"""The hub's ordering: events that cross on their way are put back in order from memory, a lost
one is read back from PostgreSQL, and events committed in a process reach its own members
without Redis."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server import db, demo, events, hub
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


async def _member(
    aiohttp_client, app_factory, group: str, user: str
) -> tuple[TestClient, Socket, int]:
    """A joined socket on a fresh app (started after the test's own settings), and its seq."""
    client = await aiohttp_client(app_factory(workers=0))
    sock = Socket(await client.ws_connect(f"/ws?token={token(user)}"))
    assert (await sock.recv())["type"] == "hello"
    joined = await sock.request("join", group=group)
    return client, sock, joined["seq"]


_MAX_HELD = hub.MAX_HELD


def _fills() -> float:
    return METRICS.gap_fills._value.get()


async def test_events_that_cross_on_their_way_are_put_in_order_from_memory(
    aiohttp_client, app_factory, make_group, pool, redis, monkeypatch
):
    # Only the missing event's own arrival can close the gap: no wait runs out, no check runs.
    monkeypatch.setattr(hub, "GAP_WAIT_S", 3600)
    monkeypatch.setattr(hub, "CATCH_UP_EVERY_S", 3600)
    group, _ = await make_group(["ola"])
    _, sock, seq = await _member(aiohttp_client, app_factory, group, "ola")
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
    _, sock, seq = await _member(aiohttp_client, app_factory, group, "pat")
    first, second = await _append(pool, group, 2)
    fills = _fills()
    await events.publish(redis, [second])  # `first` never arrives, as when pub/sub drops it
    got = [await sock.until(lambda f: f.get("seq", 0) > seq) for _ in range(2)]
    assert [f["seq"] for f in got] == [first.seq, second.seq]
    assert _fills() == fills + 1


async def test_events_past_the_hold_limit_are_read_back_in_order_too(
    aiohttp_client, app_factory, make_group, pool, redis, monkeypatch
):
    monkeypatch.setattr(hub, "MAX_HELD", 2)
    monkeypatch.setattr(hub, "CATCH_UP_EVERY_S", 3600)  # only the gap's own fill reads back
    group, _ = await make_group(["rio"])
    _, sock, seq = await _member(aiohttp_client, app_factory, group, "rio")
    evs = await _append(pool, group, 5)
    await events.publish(redis, evs[1:])  # ahead of the first: two are held, two are not
    await events.publish(redis, evs[:1])  # the gap closes, yet the two not held are missing
    got = [await sock.until(lambda f: f.get("seq", 0) > seq) for _ in range(5)]
    assert [f["seq"] for f in got] == [ev.seq for ev in evs]


async def test_members_on_the_committing_process_hear_of_it_without_redis(
    aiohttp_client, app_factory, make_group, monkeypatch, tmp_path: Path
):
    monkeypatch.setattr(hub, "CATCH_UP_EVERY_S", 3600)  # no periodic read-back either
    group, _ = await make_group(["quinn"])
    client, sock, seq = await _member(aiohttp_client, app_factory, group, "quinn")
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


class _Relay:
    """A real Hub (its own loop, a real pool for fills), fed events the way the relay and the
    publisher feed it, in whatever order the test draws."""

    def __init__(self, dsn: str, redis_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(db.create_pool(dsn, min_size=1, max_size=2))
        self.redis = aioredis.from_url(redis_url)
        self.hub = hub.Hub(self.redis, self.pool)

    def close(self) -> None:
        self.loop.run_until_complete(self.hub.close())
        self.loop.run_until_complete(self.pool.close())
        self.loop.run_until_complete(self.redis.aclose())
        self.loop.close()


@pytest.fixture(scope="module")
def relay(backends) -> Iterator[_Relay]:
    r = _Relay(backends.database_url, backends.redis_url)
    yield r
    r.close()


@settings(
    max_examples=int(os.environ.get("SMARTSORT_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    n=st.integers(1, 12),
    sockets=st.integers(1, 5),
    data=st.data(),
)
def test_any_arrival_order_with_losses_and_repeats_reaches_every_socket_once_in_order(
    relay: _Relay, monkeypatch, n: int, sockets: int, data: st.DataObject
) -> None:
    # Lost events are read back only by the periodic check (called below), so that events that
    # all arrive, in whatever order, must be put in order from memory alone.
    monkeypatch.setattr(hub, "GAP_WAIT_S", 3600)
    monkeypatch.setattr(hub, "FAN_OUT_CHUNK", 2)  # more than 2 sockets: the chunked path
    held_at_most = data.draw(st.sampled_from([2, _MAX_HELD]))  # 2: the rest is read back
    monkeypatch.setattr(hub, "MAX_HELD", held_at_most)
    # Which events arrive (some never: pub/sub lost them), in which order, some twice.
    arrivals = data.draw(st.lists(st.integers(0, n - 1), max_size=3 * n))
    yields = data.draw(st.lists(st.booleans(), min_size=len(arrivals), max_size=len(arrivals)))
    fills = _fills()
    got = relay.loop.run_until_complete(_feed(relay, n, sockets, arrivals, yields))
    assert all(seqs == list(range(1, n + 1)) for seqs in got), got
    if set(arrivals) == set(range(n)) and held_at_most > n:
        assert _fills() == fills  # nothing lost: no PostgreSQL read


async def _feed(
    relay: _Relay, n: int, sockets: int, arrivals: list[int], yields: list[bool]
) -> list[list[int]]:
    group = f"h-{uuid.uuid4().hex[:10]}"
    await demo.create_group(relay.pool, group, ["hub"], 1)
    evs = await _append(relay.pool, group, n)  # seqs 1..n, all committed
    seq_of = {ev.data: ev.seq for ev in evs}
    got: list[list[int]] = [[] for _ in range(sockets)]
    feed = relay.hub.feeds[group] = hub.Feed()
    feed.ready.set()
    for i in range(sockets):
        cursor = hub.Cursor(lambda data, key, mine=got[i]: mine.append(seq_of[data]))
        cursor.go_live(0)
        feed.subscribers.add(cursor)
    try:
        for index, pause in zip(arrivals, yields, strict=True):
            relay.hub.accept(group, feed, evs[index].seq, evs[index].data)
            if pause:
                await asyncio.sleep(0)
        await relay.hub._catch_up_all()  # the periodic check: reads back what never arrived
        async with asyncio.timeout(10):
            while any(len(seqs) < n for seqs in got) or feed.backlog is not None:
                await asyncio.sleep(0.001)
    finally:
        del relay.hub.feeds[group]
        if feed.filler is not None:
            feed.filler.cancel()
    return got
