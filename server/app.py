"""The aiohttp application: the one place that wires everything together."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from . import db, demo, embedded
from .config import SETTINGS_KEY, Settings
from .db import POOL_KEY
from .events import PUBLISHER_KEY, REDIS_KEY, Publisher
from .http import CLIENT_DIR, errors_middleware, routes
from .hub import HUB_KEY, Hub
from .presence import PRESENCE_KEY, Presence
from .protocol import CLOSE_GOING_AWAY, CLOSE_POLICY
from .worker import WorkerPool
from .ws import CONNECTIONS_KEY, PER_USER_KEY, Connection, websocket_handler

log = logging.getLogger(__name__)

DSN_KEY = web.AppKey("dsn", str)
WORKERS_KEY = web.AppKey("workers", WorkerPool)
MAX_BODY_BYTES = 1024 * 1024


class AccessLogger(AbstractAccessLogger):
    """Method, path and status only: query strings may carry tokens and are never logged."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %.1fms", request.method, request.path, response.status, time * 1000
        )


async def cancel_and_wait(task: asyncio.Task[None], timeout: float = 5.0) -> None:
    task.cancel()
    try:
        await asyncio.wait_for(task, timeout)
    except (asyncio.CancelledError, TimeoutError):
        pass
    except Exception:  # noqa: BLE001
        log.exception("task %s failed while stopping", task.get_name())


async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    urls = await asyncio.to_thread(
        embedded.ensure, settings.database_url, settings.redis_url, settings.data_dir
    )
    await db.migrate(urls.database_url)
    app[DSN_KEY] = urls.database_url
    # Fixed size, all opened at start: a burst never waits for new connections to be made and
    # warmed (each new one pays its set-up and its first plan of every statement).
    size = settings.db_pool_size
    pool = app[POOL_KEY] = await db.create_pool(urls.database_url, min_size=size, max_size=size)
    redis = app[REDIS_KEY] = aioredis.from_url(
        urls.redis_url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=10
    )
    if settings.demo:
        await demo.seed(pool)
    yield
    await redis.aclose()
    await asyncio.wait_for(pool.close(), 10)


async def publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER_KEY] = Publisher(app[REDIS_KEY])
    task = asyncio.create_task(publisher.run(), name="publisher")
    yield
    # Workers and sockets have stopped: publish what they left, briefly.
    await publisher.flush(2.0)
    await cancel_and_wait(task)


async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
    hub = app[HUB_KEY] = Hub(app[REDIS_KEY], app[POOL_KEY])
    app[PUBLISHER_KEY].local = hub.deliver_local
    presence = app[PRESENCE_KEY] = Presence(app[REDIS_KEY], app[SETTINGS_KEY].presence_ttl_s)
    relay = asyncio.create_task(hub.relay(), name="hub-relay")
    refresh = asyncio.create_task(presence.refresh_forever(), name="presence-refresh")
    yield
    app[PUBLISHER_KEY].local = None
    await cancel_and_wait(refresh)
    await cancel_and_wait(relay)
    await hub.close()
    await hub._close_pubsub()


def worker_ctx(n: int):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if n <= 0:
            yield
            return
        workers = app[WORKERS_KEY] = WorkerPool(
            app[DSN_KEY], app[POOL_KEY], app[PUBLISHER_KEY], app[SETTINGS_KEY], n
        )
        workers.start()
        yield
        await workers.stop()

    return ctx


async def sweep_idle_sockets(app: web.Application) -> None:
    """Close sockets that joined no group and said nothing for SMARTSORT_IDLE_TIMEOUT_S."""
    idle = app[SETTINGS_KEY].idle_timeout_s
    connections: set[Connection] = app[CONNECTIONS_KEY]
    while True:
        await asyncio.sleep(max(0.05, idle / 4))
        cutoff = time.monotonic() - idle
        for conn in list(connections):
            if not conn.cursors and conn.last_active < cutoff and conn.close_code is None:
                log.info("closing idle socket of %s (no group joined)", conn.user)
                conn.close(CLOSE_POLICY)


async def sockets_ctx(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(sweep_idle_sockets(app), name="idle-sweep")
    yield
    await cancel_and_wait(task)


async def close_sockets(app: web.Application) -> None:
    """On shutdown: tell every socket to reconnect elsewhere (1001), iterating over a copy."""
    connections: set[Connection] = app[CONNECTIONS_KEY]
    for conn in list(connections):
        conn.close(CLOSE_GOING_AWAY)


def create_app(settings: Settings, workers: int = 1) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=MAX_BODY_BYTES)
    app[SETTINGS_KEY] = settings
    connections: set[Connection] = set()
    app[CONNECTIONS_KEY] = connections
    app[PER_USER_KEY] = Counter()
    app.cleanup_ctx.extend([backends_ctx, publisher_ctx, hub_ctx, sockets_ctx, worker_ctx(workers)])
    app.on_shutdown.append(close_sockets)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_routes(routes)
    app.router.add_static("/static/", CLIENT_DIR, name="static")
    return app
