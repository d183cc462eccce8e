"""Faults with real processes and real PostgreSQL and Redis: nothing lost, nothing done twice."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from server import demo

from .conftest import SECRET, auth, token
from .faults import PostgresServer, RedisServer, freeze, kill9, thaw, wait_for_output
from .helpers import ServerProcess, Socket, free_port, open_member, python_server, server_env

pytestmark = pytest.mark.slow

END = ("job.completed", "job.failed", "job.cancelled")


def env_for(database_url: str, redis_url: str, data_dir: Path, **extra: Any) -> dict[str, str]:
    """Short leases and slow steps, so faults land mid-job and recover quickly."""
    defaults: dict[str, Any] = {
        "SMARTSORT_LEASE_S": 2,
        "SMARTSORT_PROGRESS_INTERVAL_S": 0,
        "SMARTSORT_POLL_INTERVAL_S": 0.5,
        "SMARTSORT_ANALYSIS_BATCH_SIZE": 2,
        "SMARTSORT_STEP_DELAY_S": 0.2,
    }
    return server_env(database_url, redis_url, data_dir, **{**defaults, **extra})


@asynccontextmanager
async def running(*procs: tuple[ServerProcess, str]) -> AsyncIterator[None]:
    """Start processes together (waiting for each one's ready line) and always stop them."""
    try:
        await asyncio.gather(*(p.start(ready) for p, ready in procs))
        yield
    finally:
        for p, _ in procs:
            if p.proc is not None:
                await p.stop()


def web(env: dict[str, str], port: int) -> tuple[ServerProcess, str]:
    return ServerProcess(
        python_server("serve", "--port", str(port), "--workers", "0"), env
    ), "listening on"


def worker(env: dict[str, str]) -> tuple[ServerProcess, str]:
    return ServerProcess(python_server("worker"), env), "worker process ready"


member = open_member


def assert_gap_free(frames: list[dict[str, Any]], start: int = 1) -> None:
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(start, start + len(seqs))), seqs


async def stored(pool: asyncpg.Pool, group: str) -> list[str]:
    return [
        r["type"]
        for r in await pool.fetch(
            "SELECT type FROM group_events WHERE group_id = $1 ORDER BY seq", group
        )
    ]


async def owner_pid(pool: asyncpg.Pool, job: str) -> int:
    """The pid of the worker process holding a job's lease (owner is host:pid:nonce)."""
    async with asyncio.timeout(20):
        while True:
            owner = await pool.fetchval("SELECT lease_owner FROM jobs WHERE id = $1::uuid", job)
            if owner:
                return int(owner.split(":")[1])
            await asyncio.sleep(0.02)


def by_pid(procs: list[ServerProcess], pid: int) -> ServerProcess:
    return next(p for p in procs if p.proc is not None and p.proc.pid == pid)


async def test_kill_9_of_a_worker_mid_job_another_finishes_it_once(
    tmp_path, backends, pool, make_group
):
    group, songs = await make_group(["ava"], songs=16, unique=True)
    env = env_for(backends.database_url, backends.redis_url, tmp_path)
    port = free_port()
    w1, w2 = worker(env), worker(env)
    async with running(web(env, port), w1, w2), aiohttp.ClientSession() as session:
        s = await member(session, port, "ava", group)
        job = (await s.request("sort", group=group))["job"]["id"]
        await s.until(lambda f: f["type"] == "job.partial")
        kill9(by_pid([w1[0], w2[0]], await owner_pid(pool, job)))
        retrying = await s.until(lambda f: f["type"] == "job.retrying")
        assert retrying["error"]["code"] == "worker_lost"
        done = await s.until(lambda f: f["type"] in END)
        assert done["type"] == "job.completed" and done["job"]["attempt"] == 2
        assert sorted(done["job"]["result"]["order"]) == sorted(songs)
    assert_gap_free(s.durable(group))
    starts = [f["attempt"] for f in s.durable(group) if f["type"] == "job.started"]
    assert starts == [1, 2]
    log = await stored(pool, group)
    assert log.count("job.completed") == 1 and log[-1] == "job.completed"
    assert await pool.fetchval("SELECT playlist_version FROM groups WHERE id = $1", group) == 1


async def test_a_worker_frozen_past_its_lease_writes_nothing_when_it_wakes(
    tmp_path, backends, pool, make_group
):
    group, songs = await make_group(["bea"], songs=16, unique=True)
    env = env_for(backends.database_url, backends.redis_url, tmp_path)
    port = free_port()
    w1, w2 = worker(env), worker(env)
    async with running(web(env, port), w1, w2), aiohttp.ClientSession() as session:
        s = await member(session, port, "bea", group)
        job = (await s.request("sort", group=group))["job"]["id"]
        await s.until(lambda f: f["type"] == "job.partial")
        frozen = by_pid([w1[0], w2[0]], await owner_pid(pool, job))
        freeze(frozen)
        try:
            done = await s.until(lambda f: f["type"] in END, timeout=60)
            assert done["type"] == "job.completed" and done["job"]["attempt"] == 2
            head = await pool.fetchval("SELECT last_seq FROM groups WHERE id = $1", group)
        finally:
            thaw(frozen)
        # The woken worker's next write is fenced out: it says so and writes nothing.
        await wait_for_output(frozen, f"job {job[:8]}: lease lost")
        assert await pool.fetchval("SELECT last_seq FROM groups WHERE id = $1", group) == head
    log = await stored(pool, group)
    assert log.count("job.completed") == 1 and log[-1] == "job.completed"
    assert await pool.fetchval("SELECT playlist_version FROM groups WHERE id = $1", group) == 1
    positions = await pool.fetch("SELECT position FROM songs WHERE group_id = $1", group)
    assert sorted(r["position"] for r in positions) == list(range(len(songs)))


async def test_a_client_resumes_across_a_web_restart(tmp_path, backends, pool, make_group):
    group, _ = await make_group(["cy"], songs=16, unique=True)
    env = env_for(backends.database_url, backends.redis_url, tmp_path)
    port = free_port()
    front = web(env, port)
    async with running(front, worker(env)), aiohttp.ClientSession() as session:
        s = await member(session, port, "cy", group)
        await s.request("sort", group=group)
        await s.until(lambda f: f["type"] == "job.partial")
        assert await front[0].stop() == 0
        with pytest.raises(ConnectionError, match="1001"):
            await s.until(lambda f: False)
        before = s.durable(group)
        await front[0].start("listening on")
        again = await member(session, port, "cy", group, since=before[-1]["seq"])
        await again.until(lambda f: f["type"] in END)
        after = again.durable(group)
    assert_gap_free(before + after)
    assert [f["type"] for f in before + after] == await stored(pool, group)


async def test_members_miss_nothing_across_a_redis_restart(tmp_path, backends, pool, make_group):
    group, _ = await make_group(["dot", "eli"], songs=16, unique=True)
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    env = env_for(backends.database_url, redis.url, tmp_path)
    port = free_port()
    try:
        async with running(web(env, port), worker(env)), aiohttp.ClientSession() as session:
            a = await member(session, port, "dot", group)
            b = await member(session, port, "eli", group)
            await a.request("sort", group=group)
            await a.until(lambda f: f["type"] == "job.partial")
            redis.restart()
            for s in (a, b):
                await s.until(lambda f: f["type"] in END, timeout=60)
            # The sockets stayed open through it all.
            assert (await a.request("ping"))["type"] == "pong"
            # Publishing works again: a new event arrives live.
            resp = await session.post(
                f"http://127.0.0.1:{port}/api/groups/{group}/songs",
                headers=auth("dot"),
                json={"title": "After", "artist": "Redis"},
            )
            assert resp.status == 201
            for s in (a, b):
                await s.until(
                    lambda f: f["type"] == "playlist.updated" and f["change"] == "song_added"
                )
    finally:
        redis.stop()
    log = await stored(pool, group)
    for s in (a, b):
        assert_gap_free(s.durable(group))
        assert [f["type"] for f in s.durable(group)] == log


async def test_postgres_outage_gives_unavailable_and_the_job_completes_after(
    tmp_path, backends, make_group
):
    pg = PostgresServer(tmp_path / "db")
    from server import db

    await db.migrate(pg.url)
    own = await db.create_pool(pg.url, min_size=1, max_size=2)
    try:
        group = "outage"
        await demo.create_group(own, group, ["fin"], 12, unique_titles=True)
    finally:
        await own.close()
    env = env_for(pg.url, backends.redis_url, tmp_path)
    port = free_port()
    front, back = web(env, port), worker(env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with running(front, back), aiohttp.ClientSession() as session:
            s = await member(session, port, "fin", group)
            job = (await s.request("sort", group=group))["job"]["id"]
            await s.until(lambda f: f["type"] == "job.partial")
            pg.stop()
            try:
                resp = await session.get(f"{base}/api/jobs/{job}", headers=auth("fin"))
                body = await resp.json()
                assert (resp.status, body["code"], body["success"]) == (503, "unavailable", False)
                assert (await s.request("job.get", job=job))["code"] == "unavailable"
                ready = await session.get(f"{base}/readyz")
                assert ready.status == 503 and "postgres" in (await ready.json())["failed"]
            finally:
                pg.start()
            done = await s.until(lambda f: f["type"] in END, timeout=60)
            assert done["type"] == "job.completed"
            assert front[0].proc.poll() is None and back[0].proc.poll() is None
            assert (await session.get(f"{base}/readyz")).status == 200
    finally:
        pg.stop()


async def test_a_dropped_redis_subscription_is_refilled(
    aiohttp_client, app_factory, make_group, redis, pool
):
    group, _ = await make_group(["gil"], songs=12, unique=True)
    client = await aiohttp_client(app_factory(workers=1, step_delay_s=0.2, analysis_batch_size=2))
    ws = await client.ws_connect(f"/ws?token={token('gil')}&group={group}")
    s = Socket(ws)
    await s.recv()
    await s.recv()
    await s.request("sort", group=group)
    await s.until(lambda f: f["type"] == "job.partial")
    killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
    assert killed >= 1
    await s.until(lambda f: f["type"] in END, timeout=60)
    assert_gap_free(s.durable(group))
    assert [f["type"] for f in s.durable(group)] == await stored(pool, group)
    await ws.close()


async def flood(
    pool: asyncpg.Pool, redis: Any, group: str, count: int, size: int, readers: list[Socket]
) -> int:
    """Append and publish ``count`` events of about ``size`` bytes, as the service does.

    Paced by the healthy ``readers``: each batch of 250 goes out once they have the last one,
    so only a peer that does not read can fall behind.
    """
    from server import events

    pad = "x" * size
    last = 0
    for start in range(0, count, 250):
        async with pool.acquire() as conn, conn.transaction():
            evs = [
                await events.append(
                    conn,
                    group,
                    "playlist.updated",
                    version=i,
                    change="song_added",
                    song=f"s{i}",
                    note=pad,
                )
                for i in range(start, min(count, start + 250))
            ]
        await events.publish(redis, evs)
        last = evs[-1].seq
        for r in readers:
            await r.until(lambda f, last=last: f.get("seq") == last, timeout=60)
    return last


async def scrape(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    text = await (await session.get(f"http://127.0.0.1:{port}/metrics")).text()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_a_client_that_stops_reading_is_closed_1013_and_slows_no_one(
    tmp_path, backends, pool, redis, make_group
):
    from .faults import parse_frames, raw_ws, read_until_closed

    group, _ = await make_group(["hal", "ivy", "jo"], songs=1)
    env = env_for(backends.database_url, backends.redis_url, tmp_path, SMARTSORT_SEND_TIMEOUT_S=30)
    port = free_port()
    loop = asyncio.get_running_loop()
    async with running(web(env, port)), aiohttp.ClientSession() as session:
        slow, rest = await loop.run_in_executor(
            None, raw_ws, port, f"/ws?token={token('hal')}&group={group}"
        )
        while len(parse_frames(rest)[0]) < 2:  # hello and joined; then it stops reading
            rest += await loop.run_in_executor(None, slow.recv, 4096)
        others = [await member(session, port, u, group) for u in ("ivy", "jo")]
        before = await scrape(session, port)
        await flood(pool, redis, group, 5000, 2000, others)
        for s in others:
            mine = [f for f in s.durable(group) if f["type"] == "playlist.updated"]
            assert len(mine) == 5000
            assert_gap_free(s.durable(group), start=mine[0]["seq"])
        after = await scrape(session, port)
        frames = await loop.run_in_executor(None, read_until_closed, slow, rest)
        slow.close()
    close = [payload for op, payload in frames if op == 0x8]
    assert close and int.from_bytes(close[0][:2], "big") == 1013
    assert after["smartsort_ws_slow_closes_total"] == before["smartsort_ws_slow_closes_total"] + 1
    # 10 MB went to each socket; the one that stopped reading did not make the server hold it.
    growth = after["process_resident_memory_bytes"] - before["process_resident_memory_bytes"]
    assert growth < 8 * 2**20, growth


FROZEN_CLIENT = """
import sys, time
sys.path.insert(0, {root!r})
from tests.faults import raw_ws, parse_frames
sock, rest = raw_ws({port}, {path!r})
while len(parse_frames(rest)[0]) < 2:
    rest += sock.recv(4096)
print("joined", flush=True)
time.sleep(600)
"""


async def test_a_frozen_client_process_is_freed_after_the_send_deadline(
    tmp_path, backends, pool, redis, make_group
):
    group, _ = await make_group(["kit", "lee"], songs=1)
    env = env_for(
        backends.database_url,
        backends.redis_url,
        tmp_path,
        SMARTSORT_SEND_TIMEOUT_S=1,
        SMARTSORT_SEND_QUEUE_MAX=1000000,
    )
    port = free_port()
    root = str(Path(__file__).resolve().parent.parent)
    script = FROZEN_CLIENT.format(
        root=root, port=port, path=f"/ws?token={token('kit')}&group={group}"
    )
    client = ServerProcess([os.sys.executable, "-c", script], {})
    async with running(web(env, port)), aiohttp.ClientSession() as session:
        watcher = await member(session, port, "lee", group)
        baseline = await scrape(session, port)
        await client.start("joined")
        try:
            joined = await scrape(session, port)
            assert joined["smartsort_ws_connections"] == baseline["smartsort_ws_connections"] + 1
            freeze(client)
            await flood(pool, redis, group, 2000, 4000, [watcher])
            async with asyncio.timeout(30):
                while True:  # the server frees the socket once its send deadline passes
                    now = await scrape(session, port)
                    if (
                        now["smartsort_ws_connections"] == baseline["smartsort_ws_connections"]
                        and now["smartsort_asyncio_tasks"] <= baseline["smartsort_asyncio_tasks"]
                    ):
                        break
                    await asyncio.sleep(0.1)
        finally:
            thaw(client)
            await client.stop()
        assert now["smartsort_asyncio_tasks"] <= baseline["smartsort_asyncio_tasks"]
        assert now["process_open_fds"] == baseline["process_open_fds"]
        growth = now["process_resident_memory_bytes"] - baseline["process_resident_memory_bytes"]
        assert growth < 16 * 2**20, growth
        assert (
            now["smartsort_ws_slow_closes_total"] == baseline["smartsort_ws_slow_closes_total"] + 1
        )


async def test_fifty_sorts_over_ten_groups_while_workers_are_killed(
    tmp_path, backends, pool, make_group
):
    groups = [await make_group([f"m{i}"], songs=8, unique=True) for i in range(10)]
    env = env_for(
        backends.database_url,
        backends.redis_url,
        tmp_path,
        SMARTSORT_STEP_DELAY_S=0.1,
        SMARTSORT_ANALYSIS_CONCURRENCY=1,
        SMARTSORT_MAX_ATTEMPTS=20,
    )
    port = free_port()
    fleet = [worker(env) for _ in range(3)]
    lock = asyncio.Lock()
    kills = 0

    async def kill_owner(job: str) -> None:
        """kill -9 the worker running ``job`` (if it still runs) and start a replacement."""
        nonlocal kills
        owner = await pool.fetchval(
            "SELECT lease_owner FROM jobs WHERE id = $1::uuid AND status = 'running'", job
        )
        if owner is None:
            return
        async with lock:
            for i, (proc, _) in enumerate(fleet):
                if proc.proc is not None and proc.proc.pid == int(owner.split(":")[1]):
                    kill9(proc)
                    await proc.stop()
                    kills += 1
                    fleet[i] = worker(env)
                    await fleet[i][0].start(fleet[i][1])

    async def five_sorts(session: aiohttp.ClientSession, i: int) -> tuple[Socket, list[str]]:
        group, _ = groups[i]
        s = await member(session, port, f"m{i}", group)
        ids = []
        for n in range(5):
            job = (await s.request("sort", group=group))["job"]["id"]
            ids.append(job)
            if n % 2 == 1:  # sorts 2 and 4 of every group lose their worker mid-job
                await s.until(lambda f, job=job: f["type"] == "job.partial" and f["job"] == job)
                await kill_owner(job)
            await s.until(
                lambda f, job=job: f["type"] in END and f["job"]["id"] == job, timeout=120
            )
        return s, ids

    async with running(web(env, port), *fleet), aiohttp.ClientSession() as session:
        try:
            results = await asyncio.gather(*(five_sorts(session, i) for i in range(10)))
        finally:
            for proc, _ in fleet:
                if proc.proc is not None and proc.proc.poll() is None:
                    await proc.stop()
    assert kills >= 5
    for (group, _), (s, ids) in zip(groups, results, strict=True):
        frames = s.durable(group)
        assert_gap_free(frames)
        ends = Counter(f["job"]["id"] for f in frames if f["type"] in END)
        assert ends == Counter(ids)  # every job ended exactly once
        assert [f["type"] for f in frames] == await stored(pool, group)
        completed = sum(1 for f in frames if f["type"] == "job.completed")
        version = await pool.fetchval("SELECT playlist_version FROM groups WHERE id = $1", group)
        assert version == completed  # each completion saved the playlist exactly once


async def test_sigterm_of_a_worker_hands_its_job_to_another(tmp_path, pool, make_group, backends):
    group, songs = await make_group(["vic"], songs=20, unique=True)
    env = {
        "DATABASE_URL": backends.database_url,
        "REDIS_URL": backends.redis_url,
        "SMARTSORT_JWT_SECRET": SECRET,
        "SMARTSORT_DATA_DIR": str(tmp_path),
        "SMARTSORT_STEP_DELAY_S": "0.5",
        "SMARTSORT_ANALYSIS_BATCH_SIZE": "2",
        "SMARTSORT_PROGRESS_INTERVAL_S": "0",
    }
    port = free_port()
    web = ServerProcess(python_server("serve", "--port", str(port), "--workers", "0"), env)
    first = ServerProcess(python_server("worker"), env)
    await asyncio.gather(web.start(), first.start("worker process ready"))
    second = None
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(
                f"http://127.0.0.1:{port}/ws?token={token('vic')}&group={group}"
            )
            s = Socket(ws)
            await s.recv()
            await s.recv()
            await s.request("sort", group=group)
            await s.until(lambda f: f["type"] == "job.partial")
            assert await first.stop() == 0
            handed = await s.until(lambda f: f["type"] == "job.retrying")
            assert handed["error"]["code"] == "worker_shutdown" and handed["retry_in_s"] == 0
            second = ServerProcess(python_server("worker"), env)
            await second.start("worker process ready")
            restarted = await s.until(lambda f: f["type"] == "job.started")
            assert restarted["attempt"] == 1
            done = await s.until(lambda f: f["type"] in ("job.completed", "job.failed"))
            assert done["type"] == "job.completed"
            stats = done["job"]["result"]["stats"]
            # Titles are unique to this group, so anything cached was paid by the first worker,
            # and the second re-paid none of it.
            assert stats["cached"] >= 2 and stats["cached"] + stats["analysed"] == 20
            await ws.close()
    finally:
        await web.stop()
        if second is not None:
            await second.stop()


async def test_a_database_session_ended_mid_step_is_a_retryable_failure(pool, backends):
    """What a worker sees after the server ended its session (frozen, restarted, killed)."""
    from server.worker import _classify

    conn = await asyncpg.connect(backends.database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("SELECT 1")
        await pool.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
        with pytest.raises(Exception) as lost:
            await conn.execute("SELECT 1")
    finally:
        conn.terminate()
    failure = _classify(lost.value)
    assert (failure.code, failure.retryable) == ("unavailable", True), repr(lost.value)
    assert _classify(ValueError("bad data")).retryable is False
