"""Jobs: enqueue with database-enforced dedup, claim with SKIP LOCKED, fenced writes, cancel."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from . import events
from .db import ACQUIRE_TIMEOUT_S
from .events import Event
from .protocol import ProtocolError

log = logging.getLogger(__name__)

ACTIVE = ["queued", "running", "retrying"]
NOTIFY_CHANNEL = "ss_jobs"


class LeaseLost(Exception):
    """This worker no longer holds the job (cancelled, taken over or finished): write nothing."""


@dataclass(frozen=True, slots=True)
class Lease:
    job: str
    group: str
    attempt: int
    owner: str
    lease_s: float


def job_object(r: Mapping[str, Any]) -> dict[str, Any]:
    """The job as the protocol shows it (PROTOCOL.md §3)."""
    total, done = r["total"], r["done"]
    percent = (
        100.0 if r["status"] == "completed" else (round(100 * done / total, 1) if total else 0.0)
    )
    return {
        "id": str(r["id"]),
        "group": r["group_id"],
        "status": r["status"],
        "stage": r["stage"],
        "progress": {"done": done, "total": total, "percent": percent},
        "attempt": r["attempt"],
        "requested_by": r["requested_by"],
        "created_at": events.iso(r["created_at"]),
        "started_at": events.iso(r["started_at"]),
        "finished_at": events.iso(r["finished_at"]),
        "error": r["error"],
        "result": r["result"],
    }


def parse_job_id(job: str) -> uuid.UUID:
    try:
        return uuid.UUID(job)
    except ValueError:
        raise ProtocolError("not_found", "no such job") from None


# One statement, one round trip: count the user's sort in this minute's window, check
# membership, insert the job (unless the group has an active one, the key was used or the user is
# over the limit), take the group's next seq and append job.queued, notify the workers.
_ENQUEUE = (
    """
WITH r AS (
    INSERT INTO sort_windows (user_id, minute, n) VALUES ($3, $10, 1)
    ON CONFLICT (user_id, minute) DO UPDATE SET n = sort_windows.n + 1 RETURNING n
), m AS (
    SELECT EXISTS (SELECT 1 FROM members WHERE group_id = $2 AND user_id = $3) AS member
    FROM groups WHERE id = $2
), ins AS (
    INSERT INTO jobs (id, group_id, status, requested_by, idempotency_key, options,
                      created_at, run_after)
    SELECT $1, $2, 'queued', $3, $4, $5, $6, $6 FROM m, r WHERE m.member AND r.n <= $11
    ON CONFLICT DO NOTHING RETURNING id
), """
    + events.APPEND_CTES.format(
        group="$2",
        guard="AND EXISTS (SELECT 1 FROM ins)",
        type="'job.queued'",
        ts="$6",
        head="$7",
        tail="$8",
    )
    + """
SELECT (SELECT n FROM r) AS sorts, (SELECT member FROM m) AS member, (SELECT seq FROM e) AS seq,
       CASE WHEN EXISTS (SELECT 1 FROM e) THEN pg_notify($9, $2) END AS notified
"""
)


async def enqueue(
    pool: asyncpg.Pool,
    group: str,
    user: str,
    options: Mapping[str, Any],
    idempotency_key: str | None,
    sorts_per_minute: int,
) -> tuple[dict[str, Any], bool, list[Event]]:
    """Queue a sort for a member, or return the group's active job (or the key's job) as
    deduplicated. rate_limited past ``sorts_per_minute`` (every attempt counts, on every
    process), not_found for an unknown group, forbidden for a non-member."""
    job_id = uuid.uuid4()
    now = datetime.now(UTC)
    minute = int(now.timestamp() // 60)
    job = new_job_object(job_id, group, user, now)
    head, tail = events.frame_parts(group, "job.queued", now, {"job": job})
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        row = await conn.fetchrow(
            _ENQUEUE,
            job_id,
            group,
            user,
            idempotency_key,
            dict(options),
            now,
            head,
            tail,
            NOTIFY_CHANNEL,
            minute,
            sorts_per_minute,
        )
    if row["sorts"] > sorts_per_minute:
        raise ProtocolError(
            "rate_limited",
            f"too many sorts: at most {sorts_per_minute} a minute",
            retry_after_s=(minute + 1) * 60 - now.timestamp(),
        )
    if row["member"] is None:
        raise ProtocolError("not_found", f"no such group '{group}'")
    if not row["member"]:
        raise ProtocolError("forbidden", f"you are not a member of group '{group}'")
    if row["seq"] is not None:
        return job, False, [events.assembled(group, row["seq"], head, tail)]
    # Not inserted: the group has an active job, or the key was used. Find it (slow path).
    return await _existing_or_retry(pool, group, user, options, idempotency_key)


async def prune_sort_windows(pool: asyncpg.Pool) -> None:
    """Forget sort-rate windows older than the previous minute."""
    await pool.execute(
        "DELETE FROM sort_windows"
        " WHERE minute < floor(extract(epoch FROM clock_timestamp()) / 60) - 1"
    )


def new_job_object(job_id: uuid.UUID, group: str, user: str, now: datetime) -> dict[str, Any]:
    """The protocol's job object of a job just queued (the columns' defaults)."""
    return job_object(
        {
            "id": job_id,
            "group_id": group,
            "status": "queued",
            "stage": None,
            "done": 0,
            "total": 0,
            "attempt": 0,
            "requested_by": user,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "error": None,
            "result": None,
        }
    )


async def _existing_or_retry(
    pool: asyncpg.Pool,
    group: str,
    user: str,
    options: Mapping[str, Any],
    idempotency_key: str | None,
) -> tuple[dict[str, Any], bool, list[Event]]:
    for _ in range(3):
        async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
            if idempotency_key:
                row = await conn.fetchrow(
                    "SELECT * FROM jobs WHERE requested_by = $1 AND idempotency_key = $2",
                    user,
                    idempotency_key,
                )
                if row is not None:
                    return job_object(row), True, []
            # ON CONFLICT DO NOTHING covers both partial unique indexes: a concurrent sort for the
            # same group waits here for the winner's commit, then finds its job below.
            row = await conn.fetchrow(
                "INSERT INTO jobs (id, group_id, status, requested_by, idempotency_key, options)"
                " VALUES ($1, $2, 'queued', $3, $4, $5) ON CONFLICT DO NOTHING RETURNING *",
                uuid.uuid4(),
                group,
                user,
                idempotency_key,
                dict(options),
            )
            if row is None:
                row = await conn.fetchrow(
                    "SELECT * FROM jobs WHERE (group_id = $1 AND status = ANY($2::text[]))"
                    " OR (requested_by = $3 AND idempotency_key = $4) LIMIT 1",
                    group,
                    ACTIVE,
                    user,
                    idempotency_key,
                )
                if row is None:
                    continue  # the job we collided with finished meanwhile: try again
                return job_object(row), True, []
            job = job_object(row)
            ev = await events.append(conn, group, "job.queued", job=job)
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, group)
            return job, False, [ev]
    raise ProtocolError("conflict", "could not queue the sort; try again")


async def fetch(db: asyncpg.Pool | asyncpg.Connection, job: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT * FROM jobs WHERE id = $1", parse_job_id(job)
    )
    return row


async def recent(pool: asyncpg.Pool, group: str, limit: int) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT * FROM jobs WHERE group_id = $1 ORDER BY created_at DESC LIMIT $2", group, limit
    )
    return [job_object(r) for r in rows]


async def active_counts(db: asyncpg.Pool | asyncpg.Connection) -> dict[str, int]:
    """How many jobs are queued, running and retrying (the queue depth is 'queued')."""
    rows = await db.fetch(
        "SELECT status, count(*) AS n FROM jobs WHERE status = ANY($1::text[]) GROUP BY status",
        ACTIVE,
    )
    return {r["status"]: r["n"] for r in rows}


async def recent_for_operators(
    db: asyncpg.Pool | asyncpg.Connection, limit: int
) -> list[dict[str, Any]]:
    """Unfinished jobs, then the latest finished ones; no results or song data, only the run."""
    columns = (
        "SELECT id, group_id, status, stage, done, total, attempt, requested_by, error,"
        "  lease_owner, created_at, started_at, finished_at,"
        "  extract(epoch FROM coalesce(finished_at, clock_timestamp()) - started_at) AS run_s,"
        "  extract(epoch FROM started_at - created_at) AS wait_s FROM jobs"
    )
    # Two index-backed halves (jobs_one_active, jobs_recent), never a sort of the whole table.
    rows = await db.fetch(
        f"({columns} WHERE status = ANY($1::text[]) ORDER BY created_at DESC LIMIT $2)"
        f" UNION ALL ({columns} WHERE NOT status = ANY($1::text[])"
        "  ORDER BY created_at DESC LIMIT $2)",
        ACTIVE,
        limit,
    )
    rows = rows[:limit]
    return [
        {
            "id": str(r["id"]),
            "group": r["group_id"],
            "status": r["status"],
            "stage": r["stage"],
            "progress": {"done": r["done"], "total": r["total"]},
            "attempt": r["attempt"],
            "requested_by": r["requested_by"],
            "worker": r["lease_owner"],
            "error": r["error"],
            "created_at": events.iso(r["created_at"]),
            "started_at": events.iso(r["started_at"]),
            "finished_at": events.iso(r["finished_at"]),
            "wait_s": None if r["wait_s"] is None else round(float(r["wait_s"]), 3),
            "run_s": None if r["run_s"] is None else round(float(r["run_s"]), 3),
        }
        for r in rows
    ]


async def active(db: asyncpg.Pool | asyncpg.Connection, group: str) -> dict[str, Any] | None:
    """The group's queued or running job, else its newest one, for snapshots."""
    row = await db.fetchrow(
        "SELECT * FROM jobs WHERE group_id = $1"
        " ORDER BY (status = ANY($2::text[])) DESC, created_at DESC LIMIT 1",
        group,
        ACTIVE,
    )
    return job_object(row) if row else None


async def cancel(pool: asyncpg.Pool, job: str, by: str) -> tuple[dict[str, Any], list[Event]]:
    """Cancel a queued or running job at once; its worker's next fenced write fails."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE jobs SET status = 'cancelled', finished_at = clock_timestamp(),"
            " lease_owner = NULL, lease_expires_at = NULL"
            " WHERE id = $1 AND status = ANY($2::text[]) RETURNING *",
            parse_job_id(job),
            ACTIVE,
        )
        if row is None:
            current = await fetch(conn, job)
            if current is None:
                raise ProtocolError("not_found", "no such job")
            raise ProtocolError("conflict", f"job is already {current['status']}")
        obj = job_object(row)
        ev = await events.append(conn, row["group_id"], "job.cancelled", job=obj, by=by)
    log.info("job %s cancelled by %s", job, by)
    return obj, [ev]


# Claim the oldest runnable job under a lease and append its job.started, in one statement. The
# frame's parts are built in SQL (ss_job_json, migration 004) because the job is only known in
# there; the seq and the stored event are APPEND_CTES, as for every other event.
_CLAIM = (
    """
WITH next AS (
    SELECT id FROM jobs WHERE status IN ('queued', 'retrying') AND run_after <= clock_timestamp()
    ORDER BY run_after, created_at FOR UPDATE SKIP LOCKED LIMIT 1
), c AS (
    UPDATE jobs j SET status = 'running', attempt = j.attempt + 1, lease_owner = $1,
        lease_expires_at = clock_timestamp() + make_interval(secs => $2),
        started_at = coalesce(j.started_at, clock_timestamp()), error = NULL
    FROM next WHERE j.id = next.id RETURNING j.*, ss_job_json(j) AS job_json
), f AS (
    SELECT group_id,
        '{"type":"job.started","group":' || to_json(group_id)::text || ',"seq":' AS head,
        ',"ts":"' || ss_iso($3) || '","job":' || job_json || ',"attempt":' || attempt || '}'
            AS tail
    FROM c
), """
    + events.APPEND_CTES.format(
        group="(SELECT group_id FROM f)",
        guard="",
        type="'job.started'",
        ts="$3",
        head="(SELECT head FROM f)",
        tail="(SELECT tail FROM f)",
    )
    + """
SELECT c.*, e.seq AS event_seq, f.head AS event_head, f.tail AS event_tail FROM c, e, f
"""
)


async def claim(
    pool: asyncpg.Pool, owner: str, lease_s: float
) -> tuple[Lease, asyncpg.Record, list[Event]] | None:
    """Take the oldest runnable job, if any, under a lease (one round trip)."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        row = await conn.fetchrow(_CLAIM, owner, lease_s, datetime.now(UTC))
    if row is None:
        return None
    group = row["group_id"]
    lease = Lease(str(row["id"]), group, row["attempt"], owner, lease_s)
    return (
        lease,
        row,
        [events.assembled(group, row["event_seq"], row["event_head"], row["event_tail"])],
    )


_FENCE = (
    " lease_expires_at = clock_timestamp() + make_interval(secs => $4)"
    " WHERE id = $1 AND lease_owner = $2 AND attempt = $3 AND status = 'running'"
)


async def _fenced_update(
    conn: asyncpg.Connection, lease: Lease, sets: str, *args: Any
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"UPDATE jobs SET {sets}{',' if sets else ''}{_FENCE} RETURNING *",
        uuid.UUID(lease.job),
        lease.owner,
        lease.attempt,
        lease.lease_s,
        *args,
    )
    if row is None:
        raise LeaseLost(lease.job)
    return row


async def renew(pool: asyncpg.Pool, lease: Lease) -> None:
    """Extend the lease; raises LeaseLost when it is gone."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        await _fenced_update(conn, lease, "")


def _fenced_append_sql(sets: str, n_set_args: int) -> str:
    """A fenced job update and the event it announces, in one statement (no event, and no
    update, when the lease is gone). Parameters: the fence's four, the sets', then the event's
    group, type, ts, head and tail."""
    first = 5 + n_set_args
    group, type_, ts, head, tail = (f"${first + i}" for i in range(5))
    return (
        f"WITH f AS (UPDATE jobs SET {sets}{',' if sets else ''}{_FENCE} RETURNING 1), "
        + events.APPEND_CTES.format(
            group=group,
            guard="AND EXISTS (SELECT 1 FROM f)",
            type=type_,
            ts=ts,
            head=head,
            tail=tail,
        )
        + " SELECT seq FROM e"
    )


_PROGRESS = _fenced_append_sql("stage = $5, done = $6, total = $7", 3)
_PARTIAL = _fenced_append_sql("", 0)


async def _fenced_append(
    pool: asyncpg.Pool,
    lease: Lease,
    sql: str,
    set_args: Sequence[Any],
    type_: str,
    fields: dict[str, Any],
) -> list[Event]:
    now = datetime.now(UTC)
    head, tail = events.frame_parts(lease.group, type_, now, fields)
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn:
        seq = await conn.fetchval(
            sql,
            uuid.UUID(lease.job),
            lease.owner,
            lease.attempt,
            lease.lease_s,
            *set_args,
            lease.group,
            type_,
            now,
            head,
            tail,
        )
    if seq is None:
        raise LeaseLost(lease.job)
    return [events.assembled(lease.group, seq, head, tail)]


async def progress(
    pool: asyncpg.Pool,
    lease: Lease,
    stage: str,
    done: int,
    total: int,
    message: str,
    eta_s: float | None,
) -> list[Event]:
    percent = round(100 * done / total, 1) if total else 100.0
    fields: dict[str, Any] = {
        "job": lease.job,
        "stage": stage,
        "done": done,
        "total": total,
        "percent": percent,
        "message": message,
    }
    if eta_s is not None:
        fields["eta_s"] = round(eta_s, 1)
    return await _fenced_append(
        pool, lease, _PROGRESS, (stage, done, total), "job.progress", fields
    )


async def partial(
    pool: asyncpg.Pool, lease: Lease, songs: Sequence[Mapping[str, Any]]
) -> list[Event]:
    return await _fenced_append(
        pool, lease, _PARTIAL, (), "job.partial", {"job": lease.job, "songs": list(songs)}
    )


async def complete(
    pool: asyncpg.Pool,
    lease: Lease,
    categories: list[dict[str, Any]],
    order: list[str],
    analyses: Mapping[str, Mapping[str, Any]],
    stats: dict[str, Any],
) -> tuple[dict[str, Any], list[Event]]:
    """Save placements, bump the playlist version and finish the job, all in one transaction.

    Songs removed while the sort ran are dropped; songs added meanwhile go last, in 'Just added'.
    """
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        # Lock order everywhere: job row, then group row, then songs.
        await _fenced_update(conn, lease, "")
        version = await conn.fetchval(
            "UPDATE groups SET playlist_version = playlist_version + 1 WHERE id = $1"
            " RETURNING playlist_version",
            lease.group,
        )
        current = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM songs WHERE group_id = $1 ORDER BY added_at, id FOR UPDATE",
                lease.group,
            )
        ]
        present = set(current)
        order = [s for s in order if s in present]
        cats = [
            {"name": c["name"], "songs": [s for s in c["songs"] if s in present]}
            for c in categories
        ]
        cats = [c for c in cats if c["songs"]]
        placed = set(order)
        late = [s for s in current if s not in placed]
        if late:
            order += late
            cats.append({"name": "Just added", "songs": late})
        category_of = {s: c["name"] for c in cats for s in c["songs"]}
        await conn.execute(
            "UPDATE songs s SET category = v.category, position = v.position, analysis = v.analysis"
            " FROM unnest($1::text[], $2::text[], $3::int[], $4::jsonb[])"
            "   AS v(id, category, position, analysis)"
            " WHERE s.id = v.id AND s.group_id = $5",
            order,
            [category_of[s] for s in order],
            list(range(len(order))),
            [analyses.get(s) for s in order],
            lease.group,
        )
        stats = {**stats, "songs": len(order)}
        result = {"categories": cats, "order": order, "stats": stats}
        row = await conn.fetchrow(
            "UPDATE jobs SET status = 'completed', stage = 'saving', done = total, result = $2,"
            " finished_at = clock_timestamp(), lease_owner = NULL, lease_expires_at = NULL"
            " WHERE id = $1 RETURNING *",
            uuid.UUID(lease.job),
            result,
        )
        job = job_object(row)
        evs = [
            await events.append(
                conn, lease.group, "playlist.updated", version=version, change="sorted"
            ),
            await events.append(conn, lease.group, "job.completed", job=job),
        ]
    return job, evs


async def _announce_retry(
    conn: asyncpg.Connection,
    group: str,
    job: str,
    attempt: int,
    delay: float,
    error: Mapping[str, Any],
) -> Event:
    """Append job.retrying and wake the workers (delivered when the transaction commits)."""
    ev = await events.append(
        conn,
        group,
        "job.retrying",
        job=job,
        attempt=attempt,
        retry_in_s=round(delay, 2),
        error=dict(error),
    )
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, group)
    return ev


def backoff_s(attempt: int, base: float = 1.0, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter."""
    return float(random.uniform(0.5, 1.0) * min(cap, base * 2 ** (attempt - 1)))


async def fail_or_retry(
    pool: asyncpg.Pool, lease: Lease, error: dict[str, Any], max_attempts: int
) -> tuple[dict[str, Any], list[Event]]:
    """After a failed attempt: schedule the next one, or fail the job for good."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        if error.get("retryable") and lease.attempt < max_attempts:
            delay = backoff_s(lease.attempt)
            row = await _fenced_update(
                conn,
                lease,
                "status = 'retrying', error = $5, lease_owner = NULL,"
                " run_after = clock_timestamp() + make_interval(secs => $6)",
                error,
                delay,
            )
            ev = await _announce_retry(conn, lease.group, lease.job, lease.attempt, delay, error)
        else:
            if error.get("retryable"):
                # Out of attempts: say so, in words a person understands.
                error = {
                    **error,
                    "message": f"Smart sort failed after {lease.attempt} attempts: "
                    + str(error["message"]),
                    "retryable": False,
                }
            row = await _fenced_update(
                conn,
                lease,
                "status = 'failed', error = $5, lease_owner = NULL,"
                " finished_at = clock_timestamp()",
                error,
            )
            ev = await events.append(conn, lease.group, "job.failed", job=job_object(row))
    return job_object(row), [ev]


async def hand_back(pool: asyncpg.Pool, lease: Lease) -> list[Event]:
    """Give a running job back to the queue at once (worker shutting down); not a failed attempt."""
    error = {
        "code": "worker_shutdown",
        "message": "the worker running this sort is restarting; another one resumes it",
        "retryable": True,
    }
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        await _fenced_update(
            conn,
            lease,
            "status = 'retrying', attempt = attempt - 1, lease_owner = NULL,"
            " run_after = clock_timestamp()",
        )
        ev = await _announce_retry(conn, lease.group, lease.job, lease.attempt, 0.0, error)
    return [ev]


async def requeue_expired(pool: asyncpg.Pool, max_attempts: int) -> list[Event]:
    """Requeue jobs whose worker stopped renewing its lease (or fail them when out of tries)."""
    out: list[Event] = []
    error = {
        "code": "worker_lost",
        "message": "the worker running this sort stopped responding; it will be resumed",
        "retryable": True,
    }
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT * FROM jobs WHERE status = 'running' AND lease_expires_at < clock_timestamp()"
            " FOR UPDATE SKIP LOCKED"
        )
        for r in rows:
            if r["attempt"] >= max_attempts:
                final = {
                    **error,
                    "message": f"the sort's worker stopped responding {r['attempt']} times",
                    "retryable": False,
                }
                row = await conn.fetchrow(
                    "UPDATE jobs SET status = 'failed', error = $2, lease_owner = NULL,"
                    " finished_at = clock_timestamp() WHERE id = $1 RETURNING *",
                    r["id"],
                    final,
                )
                out.append(
                    await events.append(conn, r["group_id"], "job.failed", job=job_object(row))
                )
            else:
                await conn.execute(
                    "UPDATE jobs SET status = 'retrying', error = $2, lease_owner = NULL,"
                    " run_after = clock_timestamp() WHERE id = $1",
                    r["id"],
                    error,
                )
                out.append(
                    await _announce_retry(
                        conn, r["group_id"], str(r["id"]), r["attempt"], 0.0, error
                    )
                )
            log.warning("job %s lost its worker (attempt %d)", r["id"], r["attempt"])
    return out
