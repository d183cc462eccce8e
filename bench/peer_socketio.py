"""The peer for the fan-out benchmark: python-socketio's AsyncServer on aiohttp with its
AsyncRedisManager (so several processes share rooms through Redis), one room per group.

    python -m bench.peer_socketio PORT REDIS_URL
"""

from __future__ import annotations

import sys

import socketio
from aiohttp import web


def main() -> None:
    port, redis_url = int(sys.argv[1]), sys.argv[2]
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=socketio.AsyncRedisManager(redis_url),
        cors_allowed_origins="*",
        transports=["websocket"],
    )

    @sio.on("join")  # type: ignore[misc]
    async def join(sid: str, group: str) -> bool:
        await sio.enter_room(sid, group)
        return True

    app = web.Application()
    sio.attach(app)

    def announce(_: str) -> None:
        print(f"peer listening on {port}", flush=True)

    web.run_app(app, host="127.0.0.1", port=port, print=announce, access_log=None)


if __name__ == "__main__":
    main()
