"""10,000 connect/disconnect cycles against a real server process: nothing accumulates."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from .conftest import token
from .helpers import ServerProcess, free_port, python_server, server_env
from .test_faults import scrape

pytestmark = pytest.mark.slow
CYCLES = int(os.environ.get("SMARTSORT_SOAK_CYCLES", "10000"))


async def test_connect_disconnect_cycles_return_to_baseline(tmp_path, backends, make_group):
    group, _ = await make_group(["soak"])
    port = free_port()
    env = server_env(
        backends.database_url,
        backends.redis_url,
        tmp_path,
        LOG_LEVEL="WARNING",
        SMARTSORT_MAX_CONNECTIONS_PER_USER=1000,
    )
    server = ServerProcess(python_server("serve", "--port", str(port), "--workers", "0"), env)
    await server.start()
    url = f"http://127.0.0.1:{port}/ws?token={token('soak')}"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def cycle(i: int) -> None:
                # Half join a group (subscription and presence), half only say hello.
                ws = await session.ws_connect(url + (f"&group={group}" if i % 2 else ""))
                await ws.receive()
                if i % 2:
                    await ws.receive()  # joined
                await ws.close()

            async def run(n: int, parallel: int = 50) -> None:
                queue = iter(range(n))

                async def lane() -> None:
                    for i in queue:
                        await cycle(i)

                await asyncio.gather(*(lane() for _ in range(parallel)))

            await run(500)  # warm up: pools, caches, allocator arenas
            baseline = await settle(session, port)
            await run(CYCLES)
            after = await settle(session, port)
    finally:
        await server.stop()
    assert after["smartsort_ws_connections"] == baseline["smartsort_ws_connections"] == 0
    assert after["smartsort_asyncio_tasks"] <= baseline["smartsort_asyncio_tasks"]
    assert after["process_open_fds"] <= baseline["process_open_fds"]
    growth = after["process_resident_memory_bytes"] - baseline["process_resident_memory_bytes"]
    assert growth < 8 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over {CYCLES} cycles"


async def settle(session: aiohttp.ClientSession, port: int) -> dict[str, float]:
    """Metrics once no socket is open and the task count has been steady for three scrapes
    (a closed socket's cleanup may still be finishing when its count drops)."""
    steady: list[float] = []
    async with asyncio.timeout(30):
        while True:
            m = await scrape(session, port)
            steady = [*steady[-2:], m["smartsort_asyncio_tasks"]]
            if m["smartsort_ws_connections"] == 0 and len(steady) == 3 and len(set(steady)) == 1:
                return m
            await asyncio.sleep(0.05)
