"""What the socket and HTTP routes share: each action checked for membership, then done."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from aiohttp import web

from . import groups, jobs
from .config import SETTINGS_KEY
from .db import POOL_KEY
from .events import PUBLISHER_KEY
from .metrics import METRICS
from .protocol import ProtocolError

log = logging.getLogger(__name__)


async def start_sort(
    app: web.Application, user: str, group: str, options: dict[str, Any], key: str | None
) -> tuple[dict[str, Any], bool]:
    # The rate limit, membership, dedup and the event are all one statement: the sort is
    # acknowledged after one round trip, and published after the reply is on its way.
    job, deduplicated, evs = await jobs.enqueue(
        app[POOL_KEY], group, user, options, key, app[SETTINGS_KEY].sorts_per_minute
    )
    app[PUBLISHER_KEY].send(evs)
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
    app[PUBLISHER_KEY].send(evs)
    return obj
