"""Test helpers: a protocol-checking socket client and subprocess control."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from server.protocol import SERVER_FRAME_ADAPTER

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0


class Socket:
    """A member's socket: checks every frame against the protocol models, keeps them all."""

    _refs = itertools.count(1)

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []  # everything received, in order
        self.pending: list[dict[str, Any]] = []  # received but not yet taken by recv/until
        self._reading = asyncio.Lock()  # several tasks may wait on one socket

    async def _receive(self) -> dict[str, Any]:
        msg = await self.ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket closed: {msg.type} {msg.data!r} {msg.extra!r}")
        frame = orjson.loads(msg.data)
        SERVER_FRAME_ADAPTER.validate_python(frame)  # every frame must match the contract
        self.frames.append(frame)
        return frame

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The oldest frame not yet taken."""
        return await self.until(lambda f: True, timeout)

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, dict):
            await self.ws.send_str(orjson.dumps(frame).decode())
        elif isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame)

    async def until(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """Take the first frame that matches, leaving the others for later."""
        async with asyncio.timeout(timeout):
            while True:
                for i, frame in enumerate(self.pending):
                    if pred(frame):
                        return self.pending.pop(i)
                async with self._reading:
                    if not self.pending or not any(pred(f) for f in self.pending):
                        self.pending.append(await self._receive())

    async def request(self, type_: str, **fields: Any) -> dict[str, Any]:
        """Send with a fresh ref and return the reply that carries it."""
        ref = f"r{next(self._refs)}"
        await self.send({"type": type_, "ref": ref, **fields})
        return await self.until(lambda f: f.get("ref") == ref)

    def durable(self, group: str | None = None) -> list[dict[str, Any]]:
        return [
            f
            for f in self.frames
            if "seq" in f
            and f["type"] not in ("joined",)
            and (group is None or f["group"] == group)
        ]

    async def close(self) -> None:
        await self.ws.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -m server ...` as a real subprocess; waits for its announcement, not a sleep."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        self.args = args
        self.env = {**os.environ, **env}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.output: list[str] = []
        self._changed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, ready_text: str = "listening on", timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            self.args,
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so stop() reaches children too (make run -> python)
        )
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = (await loop.run_in_executor(None, stdout.readline)).decode()
                    if not line:
                        raise RuntimeError("server exited:\n" + "".join(self.output))
                    self.output.append(line)
                    if ready_text in line:
                        break
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            stdout.close()
            raise
        self._loop = loop
        self._changed = asyncio.Event()
        self._drain = loop.run_in_executor(None, self._pump)

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.output.append(raw.decode(errors="replace"))
            if self._loop is not None and self._changed is not None:
                try:
                    self._loop.call_soon_threadsafe(self._changed.set)
                except RuntimeError:  # the test's loop is already closed
                    pass

    async def output_changed(self) -> None:
        """Wait for the next line of output."""
        assert self._changed is not None
        await self._changed.wait()
        self._changed.clear()

    async def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        loop = asyncio.get_running_loop()
        try:
            rc = await asyncio.wait_for(loop.run_in_executor(None, self.proc.wait), timeout)
        except TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = await loop.run_in_executor(None, self.proc.wait)
        await self._drain
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rc


def python_server(*args: str) -> list[str]:
    return [sys.executable, "-m", "server", *args]


def server_env(
    database_url: str, redis_url: str, data_dir: object, **extra: object
) -> dict[str, str]:
    """Environment for a server subprocess on the test backends; extra SMARTSORT_* as keywords."""
    from .conftest import SECRET

    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "SMARTSORT_JWT_SECRET": SECRET,
        "SMARTSORT_DATA_DIR": str(data_dir),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


async def open_member(
    session: aiohttp.ClientSession, port: int, user: str, group: str, since: int | None = None
) -> Socket:
    """A member's socket joined to ``group`` by query string (hello and joined consumed)."""
    from .conftest import token

    q = f"&since={since}" if since is not None else ""
    ws = await session.ws_connect(
        f"http://127.0.0.1:{port}/ws?token={token(user)}&group={group}{q}"
    )
    s = Socket(ws)
    assert (await s.recv())["type"] == "hello"
    assert (await s.until(lambda f: f["type"] == "joined"))["group"] == group
    return s
