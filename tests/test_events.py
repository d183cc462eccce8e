"""Event frames and the background publisher, on real Redis."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import orjson

from server import events
from server.events import Event, Publisher
from server.metrics import METRICS


def test_frame_parts_join_into_the_frame_with_the_protocols_field_order() -> None:
    now = datetime(2026, 12, 3, 16, 20, 0, 123456, tzinfo=UTC)
    fields = {"job": "8c1f", "stage": "analysis", "done": 1, "message": 'é "quoted"'}
    head, tail = events.frame_parts("demo", "job.progress", now, fields)
    ev = events.assembled("demo", 42, head, tail)
    body = {"type": "job.progress", "group": "demo", "seq": 42, "ts": events.iso(now), **fields}
    assert ev.data == orjson.dumps(body)
    assert ev.seq == 42 and events.progress_key(ev.data) == b"8c1f"
    # No fields at all still makes valid JSON.
    bare = events.assembled("demo", 7, *events.frame_parts("demo", "x", now, {}))
    assert orjson.loads(bare.data) == {"type": "x", "group": "demo", "seq": 7, "ts": body["ts"]}


async def _subscribed(redis, channel: str):  # type: ignore[no-untyped-def]
    ps = redis.pubsub()
    await ps.subscribe(channel)
    async with asyncio.timeout(5):
        while (await ps.get_message(timeout=1))["type"] != "subscribe":
            pass
    return ps


async def _received(ps, n: int) -> list[bytes]:  # type: ignore[no-untyped-def]
    got: list[bytes] = []
    async with asyncio.timeout(10):
        while len(got) < n:
            msg = await ps.get_message(timeout=1)
            if msg and msg["type"] == "message":
                got.append(msg["data"])
    return got


async def test_the_publisher_publishes_in_order_without_blocking_the_sender(redis) -> None:
    group = "pub-order"
    ps = await _subscribed(redis, events.channel(group))
    publisher = Publisher(redis)
    task = asyncio.create_task(publisher.run())
    try:
        evs = [Event(group, seq, b'{"seq":%d}' % seq) for seq in range(1, 301)]
        for i in range(0, 300, 7):  # many small hand-overs, as a busy worker makes them
            publisher.send(evs[i : i + 7])
        assert not publisher.idle.is_set()  # send() returned before anything was published
        await publisher.flush(10)
        assert publisher.idle.is_set() and not publisher.pending
        assert await _received(ps, 300) == [ev.wire() for ev in evs]
    finally:
        task.cancel()
        await ps.aclose()


async def test_a_full_publish_queue_lets_the_oldest_go_to_gap_filling(redis) -> None:
    group = "pub-full"
    ps = await _subscribed(redis, events.channel(group))
    publisher = Publisher(redis, max_pending=3)
    dropped = METRICS.publish_dropped._value.get()
    publisher.send(Event(group, seq, b"{}") for seq in range(1, 9))  # no task running yet
    assert [ev.seq for ev in publisher.pending] == [6, 7, 8]
    assert METRICS.publish_dropped._value.get() - dropped == 5
    task = asyncio.create_task(publisher.run())
    try:
        await publisher.flush(10)
        assert await _received(ps, 3) == [b"6 {}", b"7 {}", b"8 {}"]
    finally:
        task.cancel()
        await ps.aclose()
