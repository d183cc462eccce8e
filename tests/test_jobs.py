"""The one-statement job writes: what SQL assembles is what Python would have (real PostgreSQL)."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest

from server import jobs
from server.jobs import Lease, LeaseLost
from server.protocol import SERVER_FRAME_ADAPTER

ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
FAILURE = {"code": "unavailable", "message": 'a "quoted" message, é and \\', "retryable": True}
RESULT = {
    "categories": [{"name": "Chill", "songs": ["s1"]}],
    "order": ["s1"],
    "stats": {"songs": 1},
}

# status, stage, done, total, attempt, error, result, started, finished
SHAPES: list[tuple[Any, ...]] = [
    ("queued", None, 0, 0, 0, None, None, False, False),
    ("running", "analysis", 120, 300, 1, None, None, True, False),
    ("running", "metadata", 1, 3, 2, None, None, True, False),
    ("retrying", "analysis", 2, 3, 1, FAILURE, None, True, False),
    ("completed", "saving", 44, 44, 1, None, RESULT, True, True),
    ("failed", "analysis", 7, 10, 3, {**FAILURE, "retryable": False}, None, True, True),
    ("cancelled", None, 0, 0, 0, None, None, False, True),
]


async def _insert_job(pool: Any, group: str, user: str, shape: tuple[Any, ...]) -> uuid.UUID:
    status, stage, done, total, attempt, error, result, started, finished = shape
    # Microseconds past the millisecond: both sides must truncate, not round.
    t = datetime(2026, 12, 3, 16, 20, 0, 123999, tzinfo=UTC)
    job = uuid.uuid4()
    await pool.execute(
        "INSERT INTO jobs (id, group_id, status, stage, done, total, attempt, requested_by,"
        " created_at, started_at, finished_at, error, result)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
        job,
        group,
        status,
        stage,
        done,
        total,
        attempt,
        user,
        t,
        t + timedelta(seconds=1) if started else None,
        t + timedelta(seconds=9) if finished else None,
        error,
        result,
    )
    return job


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{s[0]}-{s[2]}of{s[3]}" for s in SHAPES])
async def test_the_sql_job_object_is_the_python_one(pool, make_group, shape):
    user = 'sql-ann "the first" ü'
    group, _ = await make_group([user])  # a group each: one active job per group
    job = await _insert_job(pool, group, user, shape)
    row = await pool.fetchrow("SELECT j.*, ss_job_json(j) AS json FROM jobs j WHERE id = $1", job)
    expected = jobs.job_object(row)
    assert orjson.loads(row["json"]) == expected
    if row["error"] is None and row["result"] is None:
        # jsonb prints itself with spaces; everything else is byte for byte orjson's.
        assert row["json"].encode() == orjson.dumps(expected)
    assert expected["created_at"] == "2026-12-03T16:20:00.123Z"  # .123999 truncated, not rounded


async def _lone_claim(pool: Any, job: str) -> tuple[Lease, Any, list[Any]]:
    """Claim ``job`` even if other tests left runnable jobs behind: make it the oldest."""
    await pool.execute("UPDATE jobs SET run_after = '2000-01-01' WHERE id = $1::uuid", job)
    claimed = await jobs.claim(pool, "test-host:1:abc123", 30)
    assert claimed is not None and claimed[0].job == job
    return claimed


async def test_a_claim_stores_and_returns_the_job_started_frame(pool, make_group):
    group, _ = await make_group(["claim-ann"])
    queued, dedup, _ = await jobs.enqueue(pool, group, "claim-ann", {}, None, 100)
    assert not dedup
    lease, row, [ev] = await _lone_claim(pool, queued["id"])
    assert (lease.group, lease.attempt, lease.owner) == (group, 1, "test-host:1:abc123")
    frame = orjson.loads(ev.data)
    SERVER_FRAME_ADAPTER.validate_python(frame)
    assert list(frame) == ["type", "group", "seq", "ts", "job", "attempt"]
    assert frame == {
        "type": "job.started",
        "group": group,
        "seq": ev.seq,
        "ts": frame["ts"],
        "job": jobs.job_object(row),
        "attempt": 1,
    }
    assert ISO_MS.match(frame["ts"]) and frame["job"]["status"] == "running"
    stored = await pool.fetchrow(
        "SELECT type, data FROM group_events WHERE group_id = $1 AND seq = $2", group, ev.seq
    )
    assert stored["type"] == "job.started" and stored["data"].encode() == ev.data
    assert await pool.fetchval("SELECT last_seq FROM groups WHERE id = $1", group) == ev.seq


async def test_fenced_progress_is_one_event_or_nothing(pool, make_group):
    group, _ = await make_group(["fence-ann"])
    queued, _, _ = await jobs.enqueue(pool, group, "fence-ann", {}, None, 100)
    lease, _, [started] = await _lone_claim(pool, queued["id"])
    [ev] = await jobs.progress(pool, lease, "analysis", 10, 40, "Analysed 10 of 40 songs", 3.04)
    assert ev.seq == started.seq + 1
    frame = orjson.loads(ev.data)
    SERVER_FRAME_ADAPTER.validate_python(frame)
    assert (frame["job"], frame["percent"], frame["eta_s"]) == (lease.job, 25.0, 3.0)
    row = await pool.fetchrow("SELECT stage, done, total FROM jobs WHERE id = $1::uuid", lease.job)
    assert tuple(row) == ("analysis", 10, 40)
    stored = await pool.fetchval(
        "SELECT data FROM group_events WHERE group_id = $1 AND seq = $2", group, ev.seq
    )
    assert stored.encode() == ev.data
    # Another attempt's lease writes nothing: no job change, no event, no seq taken.
    stale = Lease(lease.job, group, lease.attempt + 1, lease.owner, lease.lease_s)
    with pytest.raises(LeaseLost):
        await jobs.progress(pool, stale, "analysis", 20, 40, "stale", None)
    with pytest.raises(LeaseLost):
        await jobs.partial(pool, stale, [{"song": "x", "category": "Chill", "analysis": {}}])
    assert await pool.fetchval("SELECT last_seq FROM groups WHERE id = $1", group) == ev.seq
    assert await pool.fetchval("SELECT done FROM jobs WHERE id = $1::uuid", lease.job) == 10


async def test_the_sort_rate_window_counts_every_attempt_and_old_windows_are_pruned(
    pool, make_group
):
    group, _ = await make_group(["rate-ann"])
    replies = []
    for _ in range(3):
        try:
            replies.append((await jobs.enqueue(pool, group, "rate-ann", {}, None, 2))[1])
        except jobs.ProtocolError as err:
            replies.append(err.code)
    assert replies == [False, True, "rate_limited"]  # queued, deduplicated, refused
    await pool.execute("INSERT INTO sort_windows (user_id, minute, n) VALUES ('rate-ann', 1, 5)")
    await jobs.prune_sort_windows(pool)
    left = await pool.fetch("SELECT minute, n FROM sort_windows WHERE user_id = 'rate-ann'")
    assert [r["n"] for r in left] == [3]  # this minute's window stays, minute 1 is gone


async def test_a_released_connection_costs_no_reset_round_trip_and_keeps_no_transaction(
    backends,
) -> None:
    """Every write here is one statement; the pool must not add a second one on release."""
    from server import db

    pool = await db.create_pool(backends.database_url, min_size=1, max_size=1)
    sent: list[str] = []
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: sent.append(record.query))
            left_open = conn.transaction()
            await left_open.start()  # a careless caller: asyncpg still rolls this back
            await conn.execute("CREATE TEMP TABLE IF NOT EXISTS t_release (n int)")
        async with pool.acquire() as conn:  # the same connection (max_size=1)
            assert not conn.is_in_transaction()
            assert (
                await conn.fetchval("SELECT count(*) FROM pg_tables WHERE tablename = 't_release'")
                == 0
            )
    finally:
        await pool.close()
    assert not any("RESET ALL" in q or "UNLISTEN" in q for q in sent), sent
    assert "ROLLBACK" in sent


async def test_the_apps_pool_is_opened_whole_and_plans_each_statement_once(client) -> None:
    """A burst must not wait for connections to be made, nor re-plan its statements on them."""
    from server.config import SETTINGS_KEY
    from server.db import POOL_KEY

    app = client.server.app
    pool = app[POOL_KEY]
    assert pool.get_size() == app[SETTINGS_KEY].db_pool_size  # every connection made at start
    async with pool.acquire() as conn:
        await conn.execute("PREPARE plan_probe(text) AS SELECT id FROM songs WHERE group_id = $1")
        try:
            plan = "\n".join(r[0] for r in await conn.fetch("EXPLAIN EXECUTE plan_probe('g')"))
        finally:
            await conn.execute("DEALLOCATE plan_probe")
    # PostgreSQL's default plans the first five runs for their values ('g'::text); ours is the
    # one generic plan, made once.
    assert "$1" in plan and "'g'" not in plan, plan
