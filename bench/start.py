"""Enqueue to start: sort.accepted -> job.started as a member sees it, idle and under load.

Two layouts: one `serve --workers 8` process (as `make run`, workers beside the sockets), and the
Procfile's `serve --workers 0` + `worker --concurrency 8`. Idle: one sort at a time. Under load:
8 groups sort at the same instant, round after round, while 1,000 other sockets of another group
(on the web process) receive a steady 45 events/s. Measured with the project's own Python client
(server/client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

from bench.ack import SECRET, _port, pct
from bench.fanout import USER, LoadGen, Proc, _fresh_dir, _setup, our_publisher

WORKERS = 8


def _parse_ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value).timestamp()  # 3.11 reads the protocol's trailing Z


async def _probe(client: Any, group: str) -> tuple[float, float, float]:
    """One sort: ms from its sort.accepted to its job.started, then wait for it to finish.

    Also where that time went (same machine, one clock): job created -> claimed (the job's
    created_at and started_at) and claimed -> this client had job.started (started_at -> now).
    """
    handle = client.group(group)
    stream = handle.events()
    try:
        if not handle.joined.is_set():
            await stream.until(lambda f: f["type"] == "state" and "snapshot" in f, 10)
        accepted = await handle.sort()
        t_accepted = time.perf_counter()
        job = accepted["job"]["id"]
        started = await stream.until(
            lambda f: f["type"] == "job.started" and f["job"]["id"] == job, 30
        )
        started_ms = (time.perf_counter() - t_accepted) * 1000
        now = time.time()
        claimed_at = _parse_ts(started["job"]["started_at"])
        claim_ms = (claimed_at - _parse_ts(started["job"]["created_at"])) * 1000
        deliver_ms = (now - claimed_at) * 1000
        await stream.until(
            lambda f: f["type"] in ("job.completed", "job.failed") and f["job"]["id"] == job, 60
        )
        return started_ms, claim_ms, deliver_ms
    finally:
        stream.close()


LAYOUTS = ("in_process", "procfile")


async def _run(quick: bool, layout: str) -> dict[str, Any]:
    from server import db, demo
    from server.auth import issue_token
    from server.client import Client

    data = _fresh_dir("start")
    urls, env = await _setup(data)
    pool = await db.create_pool(urls.database_url, min_size=1, max_size=4)
    groups = [f"start-{i}" for i in range(WORKERS)]
    for g in groups:
        await demo.create_group(pool, g, ["prober"], 30)
    port = _port()
    env = {**env, "SMARTSORT_SORTS_PER_MINUTE": "100000", "SMARTSORT_MESSAGES_PER_SECOND": "1000"}
    in_process = layout == "in_process"
    server = Proc(
        [sys.executable, "-m", "server", "serve", "--port", str(port)]
        + ["--workers", str(WORKERS if in_process else 0)],
        env,
        Path(data) / "serve.log",
    )
    worker = (
        None
        if in_process
        else Proc(
            [sys.executable, "-m", "server", "worker", "--concurrency", str(WORKERS)],
            {**env, "LOG_LEVEL": "INFO"},  # its ready line is an INFO log line
            Path(data) / "worker.log",
        )
    )
    url = f"ws://127.0.0.1:{port}/ws"
    idle: list[tuple[float, float, float]] = []
    loaded: list[tuple[float, float, float]] = []
    import redis.asyncio as aioredis

    redis = aioredis.from_url(urls.redis_url)
    gen = LoadGen("smartsort", [f"{url}?token={issue_token(SECRET, USER)}"], 1000)
    try:
        await server.wait_for("listening on")
        if worker is not None:
            await worker.wait_for("worker process ready")
        async with Client(url, issue_token(SECRET, "prober")) as client:
            for i in range(20 if quick else 60):
                idle.append(await _probe(client, groups[i % len(groups)]))

            await gen.start()
            stop = asyncio.Event()

            publish = our_publisher(pool, redis)

            async def background() -> None:
                # The other group's steady traffic: 45 events/s to 1,000 sockets.
                while not stop.is_set():
                    await publish(time.time() * 1000)
                    await asyncio.sleep(1 / 45)

            traffic = asyncio.create_task(background())
            try:
                for _ in range(3 if quick else 8):
                    loaded += await asyncio.gather(*(_probe(client, g) for g in groups))
            finally:
                stop.set()
                with contextlib.suppress(asyncio.CancelledError):
                    await traffic
    finally:
        await gen.stop()
        server.stop()
        if worker is not None:
            worker.stop()
        await pool.close()
        await redis.aclose()
    return {
        "workers": WORKERS,
        "idle_ms": _summary(idle),
        "load_ms": _summary(loaded),
    }


def _summary(samples: list[tuple[float, float, float]]) -> dict[str, Any]:
    total, claim, deliver = (list(column) for column in zip(*samples, strict=True))
    return {
        "samples": len(samples),
        "p50": pct(total, 50),
        "p99": pct(total, 99),
        # Where the slowest went: created -> claimed, claimed -> the member had job.started.
        "claim_p50": pct(claim, 50),
        "claim_p99": pct(claim, 99),
        "deliver_p50": pct(deliver, 50),
        "deliver_p99": pct(deliver, 99),
    }


def run(quick: bool = False) -> dict[str, Any]:
    return {layout: asyncio.run(_run(quick, layout)) for layout in LAYOUTS}


def table(result: dict[str, Any]) -> str:
    names = {
        "in_process": f"serve --workers {WORKERS}",
        "procfile": f"Procfile: serve + worker --concurrency {WORKERS}",
    }
    lines = [
        "| sort.accepted -> job.started | samples | p50 ms | p99 ms | target p99 | pass "
        "| queued -> claimed p50/p99 | claimed -> member p50/p99 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for layout in LAYOUTS:
        r = result[layout]
        for label, m in (
            ("idle, one sort at a time", r["idle_ms"]),
            (f"load: {r['workers']} sorts at once + 45k deliveries/s elsewhere", r["load_ms"]),
        ):
            lines.append(
                f"| {names[layout]}, {label} | {m['samples']} | {m['p50']} | {m['p99']} | <= 20 "
                f"| {m['p99'] <= 20} | {m['claim_p50']} / {m['claim_p99']} "
                f"| {m['deliver_p50']} / {m['deliver_p99']} |"
            )
    return "\n".join(lines)
