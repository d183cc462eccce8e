"""The group event log: append in the caller's transaction (the outbox), publish after commit."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .metrics import METRICS

log = logging.getLogger(__name__)

CHANNEL_PREFIX = "ss:g:"
# Redis payload: b"<seq> <json>"; seq 0 marks an ephemeral event (presence), never replayed.
EPHEMERAL = 0


def channel(group: str) -> str:
    return CHANNEL_PREFIX + group


def iso(dt: datetime | None) -> str | None:
    """ISO 8601 UTC with milliseconds and a Z, as every time in the protocol."""
    if dt is None:
        return None
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Event:
    group: str
    seq: int
    data: bytes  # the exact frame every client receives, encoded once

    def wire(self) -> bytes:
        return b"%d " % self.seq + self.data


def frame_parts(group: str, type_: str, now: datetime, fields: dict[str, Any]) -> tuple[str, str]:
    """A durable event's frame split around its seq: ``head + str(seq) + tail``.

    The seq is only known inside the database statement that takes it, so SQL joins the parts;
    the field order (type, group, seq, ts, then ``fields``) is what progress_key relies on.
    """
    head = orjson.dumps({"type": type_, "group": group})[:-1] + b',"seq":'
    rest = orjson.dumps(fields)[1:-1]
    tail = b',"ts":"' + (iso(now) or "").encode() + b'"' + (b"," + rest if rest else b"") + b"}"
    return head.decode(), tail.decode()


def assembled(group: str, seq: int, head: str, tail: str) -> Event:
    """The Event whose frame SQL stored as ``head || seq || tail``."""
    return Event(group, seq, f"{head}{seq}{tail}".encode())


# Take the group's next seq and store the frame as two CTEs (s, then e RETURNING seq), for one
# statement to do it all; callers add CTEs before them (``guard`` may refer to those) and their
# own final SELECT. Placeholders name the statement's parameters.
APPEND_CTES = """s AS (
    UPDATE groups SET last_seq = last_seq + 1 WHERE id = {group} {guard} RETURNING last_seq
), e AS (
    INSERT INTO group_events (group_id, seq, type, ts, data)
    SELECT {group}, s.last_seq, {type}, {ts}, {head} || s.last_seq::text || {tail} FROM s
    RETURNING seq
)"""
_APPEND = (
    "WITH "
    + APPEND_CTES.format(group="$1", guard="", type="$2", ts="$3", head="$4", tail="$5")
    + " SELECT seq FROM e"
)


async def append(conn: asyncpg.Connection, group: str, type_: str, **fields: Any) -> Event:
    """Append a durable event with the group's next seq; call inside the change's transaction.

    One round trip: the seq is taken and the frame stored by a single statement.
    """
    now = datetime.now(UTC)
    head, tail = frame_parts(group, type_, now, fields)
    seq = await conn.fetchval(_APPEND, group, type_, now, head, tail)
    if seq is None:
        raise LookupError(f"group {group!r} does not exist")
    return assembled(group, seq, head, tail)


def ephemeral(group: str, type_: str, **fields: Any) -> Event:
    """An event with no seq (presence): published, never stored or replayed."""
    return Event(group, EPHEMERAL, orjson.dumps({"type": type_, "group": group, **fields}))


async def publish(redis: aioredis.Redis, events: Iterable[Event]) -> None:
    """Publish committed events; failure is soft (they are in PostgreSQL and gaps get filled)."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            n = 0
            for ev in events:
                pipe.publish(channel(ev.group), ev.wire())
                n += 1
            if n:
                await pipe.execute()
                METRICS.events_published.inc(n)
    except (RedisError, OSError) as err:
        log.warning("publish failed (%s); subscribers will fill the gap from PostgreSQL", err)


class Publisher:
    """Publishes committed events from one background task, in order, many per round trip.

    Whoever commits an event hands it over and moves on: a sort is acknowledged, and a worker
    takes its next step, without waiting for Redis. Publishing was always best effort (Redis
    pub/sub is at-most-once; the hub fills gaps from PostgreSQL), so when Redis is slow or down
    the oldest pending events beyond ``max_pending`` are let go rather than held.
    """

    def __init__(self, redis: aioredis.Redis, max_pending: int = 10_000, batch: int = 500) -> None:
        self.redis = redis
        self.max_pending = max_pending
        self.batch = batch
        self.pending: deque[Event] = deque()
        # This process's own subscribers (the hub): members on the process that committed an
        # event hear of it without a Redis round trip, nor a wait behind the previous publish.
        self.local: Callable[[Sequence[Event]], None] | None = None
        self.more = asyncio.Event()
        self.idle = asyncio.Event()
        self.idle.set()

    def send(self, events: Iterable[Event]) -> None:
        """Queue events for publishing, and for this process's own members; never blocks.

        Local delivery runs soon, not now: the sender finishes what it is doing first (a sort's
        requester gets sort.accepted before job.queued, as from any other process).
        """
        evs = events if isinstance(events, list) else list(events)
        if not evs:
            return
        if self.local is not None:
            asyncio.get_running_loop().call_soon(self._deliver_local, evs)
        self.pending.extend(evs)
        excess = len(self.pending) - self.max_pending
        if excess > 0:
            for _ in range(excess):
                self.pending.popleft()
            METRICS.publish_dropped.inc(excess)
            log.warning("publish queue full: %d events left to gap filling", excess)
        self.idle.clear()
        self.more.set()

    async def run(self) -> None:
        """The publishing task: drain the queue, one pipeline per batch."""
        pending = self.pending
        while True:
            await self.more.wait()
            self.more.clear()
            while pending:
                n = min(len(pending), self.batch)
                await publish(self.redis, [pending.popleft() for _ in range(n)])
            self.idle.set()

    def _deliver_local(self, events: Sequence[Event]) -> None:
        if self.local is not None:
            try:
                self.local(events)
            except Exception:  # noqa: BLE001 - Redis still carries them to everyone
                log.exception("local delivery failed")

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until everything queued so far has been handed to Redis."""
        try:
            await asyncio.wait_for(self.idle.wait(), timeout)
        except TimeoutError:
            log.warning("%d events not published at shutdown", len(self.pending))


async def read_since(
    db: asyncpg.Pool | asyncpg.Connection, group: str, since: int, until: int | None = None
) -> list[Event]:
    """Stored events with since < seq <= until, in order."""
    rows: Sequence[asyncpg.Record] = await db.fetch(
        "SELECT seq, data FROM group_events WHERE group_id = $1 AND seq > $2"
        " AND ($3::bigint IS NULL OR seq <= $3) ORDER BY seq",
        group,
        since,
        until,
    )
    return [Event(group, r["seq"], r["data"].encode()) for r in rows]


async def prune(pool: asyncpg.Pool, retention_s: float) -> int:
    """Delete events older than ``retention_s``; joins from before them get recovered=false."""
    status: str = await pool.execute(
        "DELETE FROM group_events WHERE ts < clock_timestamp() - make_interval(secs => $1)",
        retention_s,
    )
    return int(status.rpartition(" ")[2] or 0)


async def oldest_retained(db: asyncpg.Pool | asyncpg.Connection, group: str) -> int | None:
    """The smallest seq still stored for the group (None when none are)."""
    value: int | None = await db.fetchval(
        "SELECT min(seq) FROM group_events WHERE group_id = $1", group
    )
    return value


_PROGRESS_HEAD = b'{"type":"job.progress",'
_JOB_FIELD = b'"job":"'


_TS_FIELD = b'"ts":"'


def event_time(data: bytes) -> float | None:
    """The commit timestamp of an encoded durable event (epoch seconds), for lag metrics."""
    start = data.find(_TS_FIELD)
    if start < 0:
        return None
    start += len(_TS_FIELD)
    try:
        return datetime.fromisoformat(data[start : start + 24].decode()).timestamp()
    except ValueError:
        return None


def progress_key(data: bytes) -> bytes | None:
    """The job id of a job.progress frame (its coalescing key), else None.

    Cheap on purpose (called once per event per process): append() encodes the fields in a fixed
    order, so the type comes first and the job id is the first ``"job":"…"`` string.
    """
    if not data.startswith(_PROGRESS_HEAD):
        return None
    start = data.find(_JOB_FIELD)
    if start < 0:
        return None
    start += len(_JOB_FIELD)
    end = data.find(b'"', start)
    return data[start:end] if end > start else None


def parse_wire(payload: bytes) -> tuple[int, bytes]:
    """Split a Redis payload into (seq, frame bytes)."""
    head, _, data = payload.partition(b" ")
    return int(head), data


from aiohttp import web  # noqa: E402

REDIS_KEY = web.AppKey("redis", aioredis.Redis)
PUBLISHER_KEY = web.AppKey("publisher", Publisher)
