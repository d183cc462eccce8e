"""The group event log: append in the caller's transaction (the outbox), publish after commit."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
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


async def append(conn: asyncpg.Connection, group: str, type_: str, **fields: Any) -> Event:
    """Append a durable event with the group's next seq; call inside the change's transaction."""
    seq = await conn.fetchval(
        "UPDATE groups SET last_seq = last_seq + 1 WHERE id = $1 RETURNING last_seq", group
    )
    if seq is None:
        raise LookupError(f"group {group!r} does not exist")
    now = datetime.now(UTC)
    body = {"type": type_, "group": group, "seq": seq, "ts": iso(now), **fields}
    data = orjson.dumps(body)
    await conn.execute(
        "INSERT INTO group_events (group_id, seq, type, ts, data) VALUES ($1, $2, $3, $4, $5)",
        group,
        seq,
        type_,
        now,
        data.decode(),
    )
    return Event(group, seq, data)


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
