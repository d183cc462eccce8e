"""Real PostgreSQL and Redis (embedded, or DATABASE_URL / REDIS_URL), never mocks."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from server import db, demo, embedded
from server.app import create_app
from server.auth import issue_token
from server.config import Settings

from .helpers import Socket

SECRET = "test-secret-please-ignore-0123456789abcdef"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smartsort")


@pytest.fixture(scope="session")
def backends(data_dir: Path) -> embedded.Endpoints:
    urls = embedded.ensure(os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"), data_dir)
    asyncio.run(db.migrate(urls.database_url))
    return urls


@pytest.fixture
def settings(backends: embedded.Endpoints, data_dir: Path) -> Settings:
    return Settings(
        DATABASE_URL=backends.database_url,
        REDIS_URL=backends.redis_url,
        SMARTSORT_JWT_SECRET=SECRET,
        SMARTSORT_DATA_DIR=data_dir,
        SMARTSORT_ANALYZER="offline",
        SMARTSORT_PROGRESS_INTERVAL_S=0,
        SMARTSORT_POLL_INTERVAL_S=0.5,
        SMARTSORT_DEMO=True,
    )


@pytest.fixture
async def pool(backends: embedded.Endpoints) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(backends.database_url, min_size=1, max_size=4)
    yield p
    await p.close()


@pytest.fixture
async def redis(backends: embedded.Endpoints) -> AsyncIterator[aioredis.Redis]:
    r = aioredis.from_url(backends.redis_url)
    yield r
    await r.aclose()


def token(user: str, ttl_s: float = 3600) -> str:
    return issue_token(SECRET, user, ttl_s)


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


MakeGroup = Callable[..., Awaitable[tuple[str, list[str]]]]


@pytest.fixture
def make_group(pool: asyncpg.Pool) -> MakeGroup:
    """Create a fresh group: returns (group id, song ids). Members get unique-per-test names."""

    async def create(
        members: list[str], songs: int = 12, unique: bool = False
    ) -> tuple[str, list[str]]:
        gid = f"g-{uuid.uuid4().hex[:10]}"
        ids = await demo.create_group(pool, gid, members, songs, unique_titles=unique)
        return gid, ids

    return create


@pytest.fixture
def app_factory(settings: Settings) -> Callable[..., Any]:
    def factory(workers: int = 1, **overrides: Any) -> Any:
        s = settings.model_copy(update=overrides)
        return create_app(s, workers=workers)

    return factory


@pytest.fixture
async def client(
    aiohttp_client: Any, app_factory: Callable[..., Any], request: pytest.FixtureRequest
) -> TestClient:
    """The app under test; ``@pytest.mark.workers(0)`` runs it without worker coroutines."""
    marker = request.node.get_closest_marker("workers")
    return await aiohttp_client(app_factory(workers=marker.args[0] if marker else 1))


Connect = Callable[..., Awaitable[Socket]]


@pytest.fixture
async def connect(client: TestClient) -> AsyncIterator[Connect]:
    """Open a member's socket (hello already consumed) against the test app."""
    opened: list[Socket] = []

    async def open_socket(user: str, query: str = "", tc: TestClient | None = None) -> Socket:
        c = tc or client
        ws = await c.ws_connect(f"/ws?token={token(user)}{query}")
        sock = Socket(ws)
        hello = await sock.recv()
        assert hello["type"] == "hello" and hello["user"] == user
        opened.append(sock)
        return sock

    yield open_socket
    for s in opened:
        await s.close()
