"""What the socket and HTTP routes share: each action checked for membership, then done."""

from __future__ import annotations

import logging
import time
from typing import Any

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from . import events, groups, jobs
from .config import SETTINGS_KEY
from .db import POOL_KEY
from .events import REDIS_KEY
from .metrics import METRICS
from .protocol import ProtocolError

log = logging.getLogger(__name__)


async def limit_sorts(app: web.Application, user: str) -> None:
    """Per-user sort rate across every process: a fixed one-minute window in Redis.

    Fails open: if Redis cannot count, the sort goes ahead (the database still dedups it).
    """
    limit = app[SETTINGS_KEY].sorts_per_minute
    now = time.time()
    window = int(now // 60)
    key = f"ss:rl:sort:{user}:{window}"
    try:
        async with app[REDIS_KEY].pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            count, _ = await pipe.execute()
    except (RedisError, OSError) as err:
        log.warning("sort rate limit unavailable (%r); allowing", err)
        return
    if int(count) > limit:
        raise ProtocolError(
            "rate_limited",
            f"too many sorts: at most {limit} a minute",
            retry_after_s=(window + 1) * 60 - now,
        )


async def start_sort(
    app: web.Application, user: str, group: str, options: dict[str, Any], key: str | None
) -> tuple[dict[str, Any], bool]:
    pool = app[POOL_KEY]
    await limit_sorts(app, user)
    # Membership is checked inside the enqueue statement: one round trip for the common case.
    job, deduplicated, evs = await jobs.enqueue(pool, group, user, options, key)
    await events.publish(app[REDIS_KEY], evs)
    if not deduplicated:
        METRICS.jobs_queued.inc()
        log.info("job %s queued for group %s by %s", job["id"], group, user)
    return job, deduplicated


async def visible_job(pool: asyncpg.Pool, job: str, user: str) -> asyncpg.Record:
    """The job, if the user is a member of its group; otherwise not_found (never its data)."""
    row = await jobs.fetch(pool, job)
    if row is None or not await groups.is_member(pool, row["group_id"], user):
        raise ProtocolError("not_found", "no such job")
    return row


async def get_job(app: web.Application, user: str, job: str) -> dict[str, Any]:
    return jobs.job_object(await visible_job(app[POOL_KEY], job, user))


async def cancel_job(app: web.Application, user: str, job: str) -> dict[str, Any]:
    pool = app[POOL_KEY]
    await visible_job(pool, job, user)
    obj, evs = await jobs.cancel(pool, job, user)
    await events.publish(app[REDIS_KEY], evs)
    return obj
