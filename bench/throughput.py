"""Job throughput: sorts of 300-song playlists per minute, offline and with a fake OpenAI server
answering each call in 500 ms (the same fake the tests use, started here).

One `serve --workers 0` process and one `worker --concurrency 4` process; every group's songs
are new to the analysis cache, so each job pays for all its songs.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from bench.ack import SECRET, _port
from bench.fanout import Proc, _fresh_dir, _setup

SONGS = 300
CONCURRENCY = 4


async def _case(analyzer: str, jobs: int) -> dict[str, Any]:
    from server import db, demo
    from server.auth import issue_token
    from server.client import Client
    from tests.fake_openai import FakeOpenAI

    data = _fresh_dir(f"tp-{analyzer}")
    urls, env = await _setup(data)
    pool = await db.create_pool(urls.database_url, min_size=1, max_size=4)
    groups = [f"tp-{analyzer}-{i}" for i in range(jobs)]
    for g in groups:
        await demo.create_group(pool, g, ["tp"], SONGS, unique_titles=True)
    await pool.close()
    runner = None
    fake = FakeOpenAI()
    fake.latency_s = 0.5
    env = {
        **env,
        "SMARTSORT_SORTS_PER_MINUTE": "100000",
        "SMARTSORT_MESSAGES_PER_SECOND": "1000",
        "SMARTSORT_ANALYZER": analyzer,
    }
    if analyzer == "openai":
        runner = web.AppRunner(fake.app)
        await runner.setup()
        fake_port = _port()
        await web.TCPSite(runner, "127.0.0.1", fake_port).start()
        env |= {"OPENAI_API_KEY": "bench", "OPENAI_BASE_URL": f"http://127.0.0.1:{fake_port}/v1"}
    port = _port()
    web_proc = Proc(
        [sys.executable, "-m", "server", "serve", "--port", str(port), "--workers", "0"],
        env,
        Path(data) / "serve.log",
    )
    worker = Proc(
        [sys.executable, "-m", "server", "worker", "--concurrency", str(CONCURRENCY)],
        {**env, "LOG_LEVEL": "INFO"},  # it says it is ready in its log
        Path(data) / "worker.log",
    )
    try:
        await web_proc.wait_for("listening on")
        await worker.wait_for("worker process ready")
        async with Client(f"ws://127.0.0.1:{port}/ws", issue_token(SECRET, "tp")) as client:
            streams = {g: client.group(g).events() for g in groups}
            for stream in streams.values():
                await stream.until(lambda f: f["type"] == "state" and "snapshot" in f, 10)
            t0 = time.perf_counter()
            accepted = await asyncio.gather(*(client.group(g).sort() for g in groups))
            ids = {a["job"]["id"] for a in accepted}
            ends = await asyncio.gather(
                *(
                    s.until(
                        lambda f: (
                            f["type"] in ("job.completed", "job.failed") and f["job"]["id"] in ids
                        ),
                        600,
                    )
                    for s in streams.values()
                )
            )
            elapsed = time.perf_counter() - t0
    finally:
        web_proc.stop()
        worker.stop()
        if runner is not None:
            await runner.cleanup()
    completed = [e for e in ends if e["type"] == "job.completed"]
    calls = sum(e["job"]["result"]["stats"]["llm_calls"] for e in completed)
    return {
        "jobs": jobs,
        "completed": len(completed),
        "seconds": round(elapsed, 2),
        "per_minute": round(len(completed) / elapsed * 60, 1),
        "llm_calls": calls,
    }


def run(quick: bool = False) -> dict[str, Any]:
    jobs = 4 if quick else 12
    return {
        "songs": SONGS,
        "worker_concurrency": CONCURRENCY,
        "offline": asyncio.run(_case("offline", jobs)),
        "openai_500ms": asyncio.run(_case("openai", jobs)),
    }


def table(result: dict[str, Any]) -> str:
    rows = [
        f"| {result['songs']}-song sorts, worker --concurrency {result['worker_concurrency']} "
        "| jobs | completed | seconds | sorts/minute | LLM calls |",
        "|---|---|---|---|---|---|",
    ]
    for name, key in (
        ("offline analyser", "offline"),
        ("fake OpenAI, 500 ms a call", "openai_500ms"),
    ):
        r = result[key]
        rows.append(
            f"| {name} | {r['jobs']} | {r['completed']} | {r['seconds']} | {r['per_minute']} "
            f"| {r['llm_calls']} |"
        )
    return "\n".join(rows)
