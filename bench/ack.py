"""Ack latency: sort -> sort.accepted over sockets and HTTP smart-sort -> 202, with 100 requesters
against one real `serve` process on embedded PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
RATE = 100.0  # sorts a second, all requesters together, in the paced phase


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_query(url: str, query: str | None) -> str:
    if not query:
        return url
    return f"{url}{'&' if '?' in url else '?'}{query}"


def pct(values: Iterable[float], p: float) -> float | None:
    """The p-th percentile (nearest rank, rounded to 0.01), or None without samples."""
    ordered = sorted(values)
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))], 2)


async def _run(requesters: int, rounds: int) -> dict[str, Any]:
    from server import db, demo, embedded
    from server.auth import issue_token

    data = Path(tempfile.mkdtemp(prefix="smartsort-bench-"))
    urls = embedded.ensure(None, None, data)
    await db.migrate(urls.database_url)
    pool = await db.create_pool(urls.database_url, min_size=1, max_size=4)
    groups = [f"bench-{i}" for i in range(requesters)]
    for i, g in enumerate(groups):
        await demo.create_group(pool, g, [f"u{i}"], 5)
    await pool.close()
    port = _port()
    env = {
        **os.environ,
        # e.g. SMARTSORT_BENCH_DB_QUERY="synchronous_commit=off" to see what WAL flushes cost
        # (asyncpg passes unknown DSN query parameters on as server settings).
        "DATABASE_URL": _with_query(urls.database_url, os.environ.get("SMARTSORT_BENCH_DB_QUERY")),
        "REDIS_URL": urls.redis_url,
        "SMARTSORT_JWT_SECRET": SECRET,
        "LOG_LEVEL": "WARNING",
    }
    log = data / "serve.log"
    with open(log, "wb") as out:  # a file, not a pipe: nobody drains a pipe during the run
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--port", str(port), "--workers", "0"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    async with asyncio.timeout(60):
        while b"listening on" not in log.read_bytes():
            if proc.poll() is not None:
                raise RuntimeError("server exited:\n" + log.read_text())
            await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    ws_ms: list[float] = []
    http_ms: list[float] = []
    try:
        # limit=0: 100 sockets would otherwise take every slot of the default connector.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            tokens = [issue_token(SECRET, f"u{i}") for i in range(requesters)]
            sockets = [await session.ws_connect(f"{base}/ws?token={t}") for t in tokens]
            for ws in sockets:
                await ws.receive()  # hello

            async def one_ws(i: int, r: int) -> None:
                ws = sockets[i]
                t0 = time.perf_counter()
                await ws.send_str(
                    orjson.dumps({"type": "sort", "group": groups[i], "ref": str(r)}).decode()
                )
                while True:
                    msg = orjson.loads((await ws.receive()).data)
                    if msg.get("ref") == str(r):
                        break
                ws_ms.append((time.perf_counter() - t0) * 1000)
                await ws.send_str(
                    orjson.dumps(
                        {"type": "cancel", "job": msg["job"]["id"], "ref": f"c{r}"}
                    ).decode()
                )
                while orjson.loads((await ws.receive()).data).get("ref") != f"c{r}":
                    pass

            async def one_http(i: int, r: int) -> None:
                t0 = time.perf_counter()
                async with session.post(
                    f"{base}/api/groups/{groups[i]}/smart-sort",
                    headers={"Authorization": f"Bearer {tokens[i]}"},
                ) as resp:
                    body = await resp.json()
                    assert resp.status == 202, body
                http_ms.append((time.perf_counter() - t0) * 1000)
                async with session.post(
                    f"{base}/api/jobs/{body['job']['id']}/cancel",
                    headers={"Authorization": f"Bearer {tokens[i]}"},
                ):
                    pass

            # Paced: each requester sends a sort at random (exponential) intervals, together
            # RATE a second: the latency one request sees on a busy service.
            async def paced(one: Any, samples: list[float], per: int) -> None:
                async def requester(i: int) -> None:
                    for r in range(per):
                        await asyncio.sleep(random.expovariate(RATE / requesters))
                        await one(i, r)

                await asyncio.gather(*(requester(i) for i in range(requesters)))

            # Burst: all requesters at the same instant (queueing shows; reported, no target).
            # The sockets go first: nobody reads them during the HTTP phases, so they would
            # miss the server's heartbeat and be closed.
            await paced(one_ws, ws_ms, rounds)
            paced_ws = ws_ms[:]
            ws_ms.clear()
            for r in range(rounds, rounds + 3):
                await asyncio.gather(*(one_ws(i, r) for i in range(requesters)))
            await paced(one_http, http_ms, rounds)
            paced_http = http_ms[:]
            http_ms.clear()
            for r in range(rounds, rounds + 3):
                await asyncio.gather(*(one_http(i, r) for i in range(requesters)))
            for ws in sockets:
                await ws.close()
    finally:
        proc.terminate()
        proc.wait()

    def summary(values: list[float]) -> dict[str, float]:
        return {
            "p50": pct(values, 50),
            "p99": pct(values, 99),
            "mean": round(statistics.mean(values), 2),
        }

    return {
        "requesters": requesters,
        "rate_per_s": RATE,
        "samples": len(paced_ws),
        "ws_ack_ms": summary(paced_ws),
        "http_ack_ms": summary(paced_http),
        "burst_ws_ack_ms": summary(ws_ms),
        "burst_http_ack_ms": summary(http_ms),
    }


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(100, 3 if quick else 10))


def table(result: dict[str, Any]) -> str:
    ws, http = result["ws_ack_ms"], result["http_ack_ms"]
    bws, bhttp = result["burst_ws_ack_ms"], result["burst_http_ack_ms"]
    head = (
        f"{result['requesters']} requesters, {result['rate_per_s']:.0f} sorts/s together, "
        f"{result['samples']} samples"
    )
    return "\n".join(
        [
            f"| ack ({head}) | p50 ms | p99 ms | target p99 | pass |",
            "|---|---|---|---|---|",
            f"| socket sort -> sort.accepted | {ws['p50']} | {ws['p99']} | <= 10 "
            f"| {ws['p99'] <= 10} |",
            f"| HTTP smart-sort -> 202 | {http['p50']} | {http['p99']} | <= 10 "
            f"| {http['p99'] <= 10} |",
            f"| burst: all 100 at once, socket | {bws['p50']} | {bws['p99']} | – | |",
            f"| burst: all 100 at once, HTTP | {bhttp['p50']} | {bhttp['p99']} | – | |",
        ]
    )
