"""Ack latency: sort -> sort.accepted over sockets and HTTP smart-sort -> 202, with 100 requesters
against one real `serve` process on embedded PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

SECRET = "bench-secret-0123456789abcdef0123456789abcdef"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p / 100 * len(values)))], 2)


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
        "DATABASE_URL": urls.database_url,
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

            for r in range(rounds):
                await asyncio.gather(*(one_ws(i, r) for i in range(requesters)))
            for r in range(rounds):
                await asyncio.gather(*(one_http(i, r) for i in range(requesters)))
            for ws in sockets:
                await ws.close()
    finally:
        proc.terminate()
        proc.wait()
    return {
        "requesters": requesters,
        "samples": len(ws_ms),
        "ws_ack_ms": {
            "p50": pct(ws_ms, 50),
            "p99": pct(ws_ms, 99),
            "mean": round(statistics.mean(ws_ms), 2),
        },
        "http_ack_ms": {
            "p50": pct(http_ms, 50),
            "p99": pct(http_ms, 99),
            "mean": round(statistics.mean(http_ms), 2),
        },
    }


def run(quick: bool = False) -> dict[str, Any]:
    return asyncio.run(_run(100, 3 if quick else 10))


def table(result: dict[str, Any]) -> str:
    ws, http = result["ws_ack_ms"], result["http_ack_ms"]
    head = f"{result['requesters']} concurrent requesters, {result['samples']} samples"
    return "\n".join(
        [
            f"| ack ({head}) | p50 ms | p99 ms | target p99 |",
            "|---|---|---|---|",
            f"| socket sort -> sort.accepted | {ws['p50']} | {ws['p99']} | <= 10 |",
            f"| HTTP smart-sort -> 202 | {http['p50']} | {http['p99']} | <= 10 |",
        ]
    )
