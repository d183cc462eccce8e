"""Fan-out: one Redis subscription per process, a gap-free stream per group, local subscribers.

Events reach a group's feed from the relay (the only reader of the subscription) and, for events
committed in this process, straight from its publisher (``deliver_local``), so members here need
no Redis round trip. Either way ``accept`` decides, with no await in it, so delivery and
deduplication never race: the next seq is delivered, a repeat is dropped, and an event that
arrives ahead of a missing one is held. The missing one usually arrives a moment later (two
processes' publishes cross: a web process's job.queued and a worker's job.started); when it does
not within GAP_WAIT_S (Redis pub/sub is at-most-once), the gap is filled from PostgreSQL by a task
of its own, so no group's gap holds up another group's events. A (re)subscription and a periodic
check catch up any group whose newest events never arrived.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiohttp import web

from . import events
from .events import EPHEMERAL
from .metrics import METRICS
from .protocol import ProtocolError

log = logging.getLogger(__name__)

CONTROL_CHANNEL = "ss:hub"
CATCH_UP_EVERY_S = 5.0
# How long an event that arrived ahead of a missing one waits for it before PostgreSQL is read.
GAP_WAIT_S = 0.05
# At most this many such events are held per group (a job.completed frame can be 100 KB);
# beyond it the fill reads them back. A gap normally closes or is filled within GAP_WAIT_S.
MAX_HELD = 256
# A group with more local sockets than this is sent to this many at a time by a task of its own.
FAN_OUT_CHUNK = 128


Sink = Callable[[bytes, "bytes | None"], None]


class Cursor:
    """One subscriber's position in a group's stream: buffers while it syncs, then drops repeats.

    The sink gets each frame's bytes and its coalescing key (the job id of a job.progress).
    """

    __slots__ = ("sink", "seq", "buffer")

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.seq = 0
        self.buffer: list[tuple[int, bytes, bytes | None]] | None = []

    def push(self, seq: int, data: bytes, key: bytes | None = None) -> None:
        if self.buffer is not None:
            self.buffer.append((seq, data, key))
        elif seq == EPHEMERAL:
            self.sink(data, None)
        elif seq > self.seq:
            self.seq = seq
            self.sink(data, key)

    def go_live(self, seq: int) -> None:
        """Everything up to ``seq`` has been sent; release what arrived meanwhile."""
        self.seq = seq
        buffered, self.buffer = self.buffer or [], None
        for s, d, k in buffered:
            self.push(s, d, k)


class Feed:
    __slots__ = (
        "subscribers",
        "last_seq",
        "confirmed",
        "ready",
        "held",
        "unheld",
        "filler",
        "backlog",
    )

    def __init__(self) -> None:
        self.subscribers: set[Cursor] = set()
        self.last_seq = 0
        self.confirmed = asyncio.Event()
        self.ready = asyncio.Event()
        # Events that arrived ahead of a missing one, by seq; and the task that fills the gap.
        self.held: dict[int, bytes] = {}
        self.unheld = 0  # the newest such event not held (MAX_HELD reached): the fill reads it
        self.filler: asyncio.Task[None] | None = None
        # A big group's events waiting for its fan-out task (None while it has none running).
        self.backlog: deque[tuple[int, bytes, bytes | None]] | None = None


class Hub:
    def __init__(self, redis: aioredis.Redis, pool: asyncpg.Pool) -> None:
        self.redis = redis
        self.pool = pool
        self.feeds: dict[str, Feed] = {}
        self.pubsub: aioredis.client.PubSub | None = None
        self.connected = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()  # gap fillers and fan-outs; close() ends them

    # -- subscribers -------------------------------------------------------------------------

    async def subscribe(self, group: str, cursor: Cursor, timeout: float = 5.0) -> None:
        """Add a subscriber once the group's Redis subscription is confirmed and positioned."""
        feed = self.feeds.get(group)
        try:
            if feed is None:
                feed = self.feeds[group] = Feed()
                await asyncio.wait_for(self.connected.wait(), timeout)
                assert self.pubsub is not None
                await self.pubsub.subscribe(events.channel(group))
                await asyncio.wait_for(feed.confirmed.wait(), timeout)
                # Anything published before this read is already counted in last_seq.
                feed.last_seq = (
                    await self.pool.fetchval("SELECT last_seq FROM groups WHERE id = $1", group)
                    or 0
                )
                feed.ready.set()
            else:
                await asyncio.wait_for(feed.ready.wait(), timeout)
        except (TimeoutError, OSError, aioredis.RedisError, asyncpg.PostgresError) as err:
            if feed is not None and not feed.ready.is_set() and self.feeds.get(group) is feed:
                del self.feeds[group]
            log.warning("subscribing to group %s failed: %r", group, err)
            raise ProtocolError("unavailable", "live updates are unavailable; retry") from None
        feed.subscribers.add(cursor)

    async def unsubscribe(self, group: str, cursor: Cursor) -> None:
        feed = self.feeds.get(group)
        if feed is None:
            return
        feed.subscribers.discard(cursor)
        if not feed.subscribers and feed.ready.is_set():
            del self.feeds[group]
            if self.pubsub is not None:
                try:
                    await asyncio.wait_for(self.pubsub.unsubscribe(events.channel(group)), 2)
                except (TimeoutError, OSError, aioredis.RedisError) as err:
                    log.debug("unsubscribe %s failed: %r", group, err)

    # -- the relay task ----------------------------------------------------------------------

    async def relay(self) -> None:
        """Listen for published events forever, reconnecting with capped exponential backoff."""
        backoff = 0.05
        while True:
            try:
                await self._listen()
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - reconnect whatever went wrong
                log.warning("redis subscription lost (%r); reconnecting in %.2fs", err, backoff)
            self.connected.clear()
            await self._close_pubsub()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _close_pubsub(self) -> None:
        ps, self.pubsub = self.pubsub, None
        if ps is not None:
            try:
                # Closing a pub/sub connection to a dead server can hang: bound it.
                await asyncio.wait_for(ps.aclose(), 2)
            except Exception as err:  # noqa: BLE001
                log.debug("closing pubsub: %r", err)

    async def _listen(self) -> None:
        ps = self.redis.pubsub()
        self.pubsub = ps
        await ps.subscribe(CONTROL_CHANNEL, *(events.channel(g) for g in self.feeds))
        self.connected.set()
        prefix = events.CHANNEL_PREFIX.encode()
        next_check = time.monotonic() + CATCH_UP_EVERY_S
        while True:
            msg = await ps.get_message(timeout=1.0)
            if msg is not None:
                kind = msg["type"]
                chan: bytes = msg["channel"]
                if chan.startswith(prefix):
                    group = chan[len(prefix) :].decode()
                    feed = self.feeds.get(group)
                    if feed is not None:
                        if kind == "message":
                            if feed.ready.is_set():  # else its position, read later, counts it
                                seq, data = events.parse_wire(msg["data"])
                                self.accept(group, feed, seq, data)
                        elif kind == "subscribe":
                            if feed.ready.is_set():
                                await self._catch_up(group, feed)  # resubscribed after a reconnect
                            else:
                                feed.confirmed.set()
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + CATCH_UP_EVERY_S
                await self._catch_up_all()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def accept(self, group: str, feed: Feed, seq: int, data: bytes) -> None:
        """One arriving event of a ready feed: deliver it, drop a repeat, or hold it."""
        if seq == EPHEMERAL:
            self._deliver(feed, seq, data)
        elif seq == feed.last_seq + 1:
            feed.last_seq = seq
            self._deliver(feed, seq, data)
            if feed.held:
                self._release(feed)
        elif seq > feed.last_seq:
            if len(feed.held) < MAX_HELD:
                feed.held[seq] = data
            else:
                feed.unheld = max(feed.unheld, seq)
            if feed.filler is None:
                feed.filler = self._spawn(self._fill_gap(group, feed), "hub-gap")

    def _release(self, feed: Feed) -> None:
        """Deliver the held events that are next now, in order; forget the ones delivered."""
        held = feed.held
        while (seq := feed.last_seq + 1) in held:
            feed.last_seq = seq
            self._deliver(feed, seq, held.pop(seq))
        for seq in [s for s in held if s <= feed.last_seq]:
            del held[seq]

    async def _fill_gap(self, group: str, feed: Feed) -> None:
        """Give a missing event GAP_WAIT_S to arrive, then read it (and what follows) from
        PostgreSQL; retry while the gap stays open (e.g. the database is down)."""
        try:
            wait = GAP_WAIT_S
            while True:
                await asyncio.sleep(wait)
                if self.feeds.get(group) is not feed or (
                    not feed.held and feed.unheld <= feed.last_seq
                ):
                    return
                try:
                    await self._fill(group, feed, until=None)
                except Exception:  # noqa: BLE001 - keep trying; the held events are still owed
                    log.exception("filling a gap of group %s failed", group)
                wait = 1.0
        finally:
            feed.filler = None

    async def _fill(self, group: str, feed: Feed, until: int | None) -> None:
        """Read the stored events after last_seq (up to ``until``) from PostgreSQL and take
        them like any arriving event (so held events that become next go out too)."""
        try:
            missing = await asyncio.wait_for(
                events.read_since(self.pool, group, feed.last_seq, until), 5
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as err:
            log.warning("gap fill for %s failed (%r); will retry", group, err)
            return
        if missing:
            METRICS.gap_fills.inc()
        for ev in missing:
            self.accept(group, feed, ev.seq, ev.data)

    async def _catch_up(self, group: str, feed: Feed) -> None:
        await self._fill(group, feed, until=None)

    async def _catch_up_all(self) -> None:
        """Fill groups whose newest events never arrived (a lost final publish)."""
        ready = {g: f for g, f in self.feeds.items() if f.ready.is_set()}
        if not ready:
            return
        try:
            rows = await asyncio.wait_for(
                self.pool.fetch(
                    "SELECT id, last_seq FROM groups WHERE id = ANY($1::text[])", list(ready)
                ),
                5,
            )
        except (TimeoutError, OSError, asyncpg.PostgresError) as err:
            log.warning("catch-up check failed: %r", err)
            return
        for r in rows:
            feed = ready[r["id"]]
            if r["last_seq"] > feed.last_seq and self.feeds.get(r["id"]) is feed:
                await self._fill(r["id"], feed, until=r["last_seq"])

    def deliver_local(self, evs: Sequence[events.Event]) -> None:
        """Events committed by this process, to its own members without a Redis round trip;
        their copies from Redis are then repeats."""
        for ev in evs:
            if ev.seq == EPHEMERAL:
                continue  # not deduplicated by seq: the relay delivers it, once
            feed = self.feeds.get(ev.group)
            if feed is not None and feed.ready.is_set():
                self.accept(ev.group, feed, ev.seq, ev.data)

    def _deliver(self, feed: Feed, seq: int, data: bytes) -> None:
        """Hand an event to the group's local subscribers, in order.

        A small group gets it now. A big one gets it from a task of its own, FAN_OUT_CHUNK
        sockets at a time, so that an event to thousands of sockets does not hold up the other
        groups' events (the relay reads on between chunks); the group's next events wait behind
        it, in order.
        """
        key = events.progress_key(data)  # once per event, not once per socket
        if feed.backlog is not None:
            feed.backlog.append((seq, data, key))
        elif len(feed.subscribers) > FAN_OUT_CHUNK:
            feed.backlog = deque([(seq, data, key)])
            self._spawn(self._fan_out(feed, feed.backlog), "hub-fan-out")
        else:
            for cursor in list(feed.subscribers):
                cursor.push(seq, data, key)
            self._delivered(seq, data, len(feed.subscribers))

    async def _fan_out(self, feed: Feed, backlog: deque[tuple[int, bytes, bytes | None]]) -> None:
        try:
            while backlog:
                seq, data, key = backlog.popleft()
                cursors = list(feed.subscribers)
                for start in range(0, len(cursors), FAN_OUT_CHUNK):
                    if start:
                        await asyncio.sleep(0)
                    for cursor in cursors[start : start + FAN_OUT_CHUNK]:
                        try:
                            cursor.push(seq, data, key)
                        except Exception:  # noqa: BLE001 - one socket must not cost the rest
                            log.exception("delivering to a socket of a big group failed")
                self._delivered(seq, data, len(cursors))
        finally:
            feed.backlog = None

    def _delivered(self, seq: int, data: bytes, n: int) -> None:
        METRICS.events_delivered.inc(n)
        if seq != EPHEMERAL:
            committed = events.event_time(data)
            if committed is not None:
                METRICS.fanout_lag.observe(max(0.0, time.time() - committed))

    def joined(self) -> int:
        return sum(len(feed.subscribers) for feed in self.feeds.values())


HUB_KEY = web.AppKey("hub", Hub)
