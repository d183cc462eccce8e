"""The socket: authenticate before the upgrade, then a read loop and one writer per socket."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from . import events, groups, jobs, service
from .auth import AuthError, bearer, origin_allowed, verify_token
from .config import SETTINGS_KEY
from .db import ACQUIRE_TIMEOUT_S, POOL_KEY, UNAVAILABLE_ERRORS
from .hub import HUB_KEY, Cursor
from .metrics import METRICS
from .outbox import Outbox
from .presence import PRESENCE_KEY
from .protocol import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOKEN_EXPIRED,
    CLOSE_TRY_AGAIN,
    PROTOCOL_VERSION,
    CancelCommand,
    Command,
    JobGetCommand,
    JoinCommand,
    LeaveCommand,
    PingCommand,
    ProtocolError,
    SortCommand,
    parse_command,
)

log = logging.getLogger(__name__)

# A close frame with code 1013, written raw when the socket's writer may be blocked.
_CLOSE_1013 = b"\x88\x02" + CLOSE_TRY_AGAIN.to_bytes(2, "big")
MAX_REPLAY = 10_000
# A socket whose transport holds more unsent bytes than this takes the queued path (and its
# deadline), so the direct write never buffers without bound for a peer that stopped reading.
DIRECT_WRITE_MAX_BUFFERED = 32 * 1024

_last_payload: bytes | None = None
_last_frame = b""


def text_frame(payload: bytes) -> bytes:
    """The whole server-to-client WebSocket text frame (unmasked, uncompressed) of ``payload``.

    The hub hands the same bytes object to every subscriber of an event, one after another, so
    remembering the last one builds each event's frame once, not once per socket.
    """
    global _last_payload, _last_frame
    if payload is _last_payload:
        return _last_frame
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    _last_payload, _last_frame = payload, header + payload
    return _last_frame


# How long a closed socket keeps reading (and dropping) what its peer still sends, so the peer
# reads our close frame instead of a reset.
LINGER_S = 2.0


class LingeringResponse(web.WebSocketResponse):
    """A WebSocket response whose transport closes the way a careful server closes.

    aiohttp closes the transport right after writing its close frame. When the peer is still
    sending (the rest of a frame over ``max_message_bytes``, say), closing a socket with unread
    data makes the kernel answer with a reset, and a peer writing at that moment loses the
    connection before it reads the close frame: a 1009 arrives as an abrupt close, and a client
    that stops on 1009 reconnects and tries again. Here the close frame is followed by a FIN
    (the peer reads the frame, then end of stream), reading goes on and what arrives is dropped,
    and the handler closes the transport once the peer has closed or after ``LINGER_S``.
    """

    lingering = False

    def _close_transport(self) -> None:
        request = self._req
        transport = request.transport if request is not None else None
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            super()._close_transport()
            return
        self.lingering = True
        transport.write_eof()

    async def linger(self, transport: asyncio.BaseTransport | None) -> None:
        """If lingering: wait (at most LINGER_S) for the peer to close, then close."""
        if not self.lingering or transport is None:
            return
        deadline = time.monotonic() + LINGER_S
        while not transport.is_closing() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # rare path (server-initiated closes): a poll is enough
        transport.close()


def json_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"success": False, "error": message, "code": code}, status=status)


class Connection:
    """One socket: its bounded send queue and writer, its joined groups and its rate limit."""

    __slots__ = (
        "ws",
        "user",
        "app",
        "outbox",
        "queue_max",
        "finished",
        "cursors",
        "close_code",
        "dropped",
        "send_timeout_s",
        "writer",
        "tokens",
        "rate",
        "last_refill",
        "strikes",
        "last_active",
        "transport",
        "busy",
        "__weakref__",
    )

    def __init__(
        self,
        app: web.Application,
        ws: LingeringResponse,
        user: str,
        transport: asyncio.Transport | None,
    ) -> None:
        settings = app[SETTINGS_KEY]
        self.app = app
        self.ws = ws
        self.user = user
        self.transport = transport
        self.busy = False  # the writer task holds frames not yet written
        self.finished = False  # the writer closed the socket, or found the peer gone
        # Created on first use: most sockets only ever take the direct path.
        self.outbox: Outbox | None = None
        self.queue_max = settings.send_queue_max
        self.cursors: dict[str, Cursor] = {}
        self.close_code: int | None = None
        self.dropped = False
        self.send_timeout_s = settings.send_timeout_s
        self.writer: asyncio.Task[None] | None = None
        self.rate = settings.messages_per_second
        self.tokens = self.rate
        self.last_refill = time.monotonic()
        self.strikes = 0
        self.last_active = time.monotonic()

    # -- sending -----------------------------------------------------------------------------

    def send(self, data: bytes | list[bytes], key: bytes | None = None) -> None:
        """Send a frame (or a replay); never blocks. A socket that overflows is dropped.

        The fast path: with nothing queued or in flight and a transport that keeps up, the frame
        is written straight to the transport (the same bytes for every socket of the event), no
        task wakes up. Otherwise it is queued for this socket's writer, which owns the deadline,
        the coalescing and the 1013.
        """
        if self.close_code is not None:
            return
        transport = self.transport
        if (
            not self.busy
            and (self.outbox is None or not self.outbox.items)
            and type(data) is bytes
            and transport is not None
            and transport.get_write_buffer_size() <= DIRECT_WRITE_MAX_BUFFERED
            and not transport.is_closing()
            and not self.ws.closed
        ):
            transport.write(text_frame(data))
            return
        if self.outbox is None:
            self.outbox = Outbox(self.queue_max)
        if not self.outbox.put(data, key):
            self.drop("its send queue overflowed")
            return
        self._kick()

    def _kick(self) -> None:
        """Start the writer task if it is not running: it exists only while there is work, so an
        idle socket costs no task (and most sockets never need one: see send)."""
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._write(), name=f"ws-send-{self.user}")

    def reply(self, frame: dict[str, Any]) -> None:
        self.send(orjson.dumps(frame))

    def close(self, code: int) -> None:
        """Ask the writer to close with ``code`` after what is already queued."""
        if self.close_code is None:
            self.close_code = code
            if not self.dropped:
                self._kick()

    def drop(self, why: str) -> None:
        """Close a socket that fell behind with 1013 at once, without waiting on the peer.

        The writer may be stuck waiting for the peer to read, so it is cancelled, the close
        frame goes straight to the transport, and the transport is aborted after a grace period
        in case the peer never reads it. The client resumes with ``since``.
        """
        if self.dropped:
            return
        self.dropped = True
        self.close_code = CLOSE_TRY_AGAIN
        if self.outbox is not None:
            self.outbox.clear()
        METRICS.slow_closes.inc()
        log.info("dropping socket of %s (1013): %s", self.user, why)
        if self.writer is not None and not self.writer.done():
            self.writer.cancel()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_CLOSE_1013)
            transport.close()  # flushes what it can, then closes
            asyncio.get_running_loop().call_later(self.send_timeout_s, transport.abort)

    async def _write(self) -> None:
        """The socket's writer while it has work: the queue in order, then the close if asked.

        The only place that waits on the peer, always under a deadline; when the deadline passes
        the socket is dropped (1013).
        """
        ws = self.ws
        outbox = self.outbox  # None when only a close was asked for
        timeout = self.send_timeout_s
        self.busy = True
        try:
            while outbox:
                item = outbox.get()
                frames = item if isinstance(item, list) else (item,)
                for data in frames:
                    # A peer that never reads would block this send forever: a deadline.
                    await asyncio.wait_for(ws.send_frame(data, WSMsgType.TEXT), timeout)
                METRICS.frames_queued.inc(len(frames))
            if self.close_code is not None and not self.finished:
                self.finished = True
                await asyncio.wait_for(ws.close(code=self.close_code), timeout)
        except TimeoutError:
            # The peer stopped reading and the kernel buffers are full.
            self.finished = True
            self.drop("the send deadline passed")
        except (ConnectionError, RuntimeError) as err:
            self.finished = True
            log.debug("socket of %s gone while sending: %r", self.user, err)
        finally:
            self.busy = False

    # -- rate limit (token bucket) -----------------------------------------------------------

    def allow(self) -> float | None:
        """None if the message may proceed, else seconds until it would."""
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last_refill) * self.rate)
        self.last_refill = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.strikes = 0
            return None
        self.strikes += 1
        return (1 - self.tokens) / self.rate


CONNECTIONS_KEY: web.AppKey[set[Connection]] = web.AppKey("connections")
PER_USER_KEY: web.AppKey[Counter[str]] = web.AppKey("connections_per_user")


async def websocket_handler(request: web.Request) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS_KEY]
    if not origin_allowed(request.headers.get("Origin"), request.host, settings.origins()):
        return json_error(403, "forbidden", "origin not allowed")
    try:
        identity = verify_token(
            settings.secret(),
            bearer(request.headers.get("Authorization")) or request.query.get("token"),
        )
    except AuthError as err:
        return json_error(401, "unauthorized", str(err))
    per_user = app[PER_USER_KEY]
    if per_user[identity.user] >= settings.max_connections_per_user:
        return json_error(
            429,
            "rate_limited",
            f"too many open sockets for this user (at most {settings.max_connections_per_user})",
        )

    ws = LingeringResponse(
        heartbeat=settings.heartbeat_s,
        max_msg_size=settings.max_message_bytes,
        compress=False,
        decode_text=False,
    )
    await ws.prepare(request)
    conn = Connection(app, ws, identity.user, request.transport)
    app[CONNECTIONS_KEY].add(conn)
    per_user[identity.user] += 1
    METRICS.connections.inc()
    log.info("socket open: user %s", identity.user)
    expiry = asyncio.get_running_loop().call_later(
        max(0.0, identity.expires_at - time.time()), conn.close, CLOSE_TOKEN_EXPIRED
    )
    conn.reply(
        {
            "type": "hello",
            "user": identity.user,
            "protocol": PROTOCOL_VERSION,
            "heartbeat_s": settings.heartbeat_s,
            "limits": {
                "max_message_bytes": settings.max_message_bytes,
                "messages_per_second": settings.messages_per_second,
            },
        }
    )
    try:
        if "group" in request.query:
            await _join_from_query(conn, request)
        await _read_loop(conn)
    except Exception:
        log.exception("socket of %s failed", identity.user)
        conn.close(CLOSE_INTERNAL)
    finally:
        expiry.cancel()
        # Bookkeeping first and synchronously: a cancelled handler must not leak its slot.
        app[CONNECTIONS_KEY].discard(conn)
        per_user[identity.user] -= 1
        if per_user[identity.user] <= 0:
            del per_user[identity.user]
        METRICS.connections.dec()
        # The rest must finish even if aiohttp cancels this handler (handler_cancellation).
        await asyncio.shield(_finish(conn, request))
    return ws


async def _finish(conn: Connection, request: web.Request) -> None:
    """Leave every group, let the writer flush and close, then let go of the transport."""
    await _leave_all(conn)
    conn.close(conn.close_code or 1000)
    writer = conn.writer
    if writer is not None and not writer.done():
        # asyncio.wait, not wait_for: a writer cancelled by drop() must not raise here.
        await asyncio.wait({writer}, timeout=conn.send_timeout_s)
        writer.cancel()
    ws = conn.ws
    if not ws.closed and not conn.dropped and request.transport is not None:
        request.transport.abort()
    elif not conn.dropped:
        await ws.linger(request.transport)
    log.info("socket closed: user %s (code %s)", conn.user, conn.close_code or ws.close_code)


async def _join_from_query(conn: Connection, request: web.Request) -> None:
    raw: dict[str, Any] = {"type": "join", "group": request.query["group"]}
    if "since" in request.query:
        try:
            raw["since"] = int(request.query["since"])
        except ValueError:
            conn.reply(ProtocolError("bad_request", "query 'since' must be an integer").frame())
            return
    await _handle(conn, orjson.dumps(raw))


async def _read_loop(conn: Connection) -> None:
    ws = conn.ws
    async for msg in ws:
        if conn.finished:
            break
        conn.last_active = time.monotonic()
        if msg.type == WSMsgType.TEXT:
            METRICS.messages_in.inc()
            wait = conn.allow()
            if wait is not None:
                if conn.strikes > 3 * conn.rate:
                    conn.close(CLOSE_POLICY)
                    break
                _error(
                    conn,
                    ProtocolError(
                        "rate_limited",
                        "too many messages",
                        ref=ref_of(msg.data),
                        retry_after_s=wait,
                    ),
                )
                continue
            await _handle(conn, msg.data)
        elif msg.type == WSMsgType.BINARY:
            _error(
                conn,
                ProtocolError("bad_request", "binary frames are not supported; send JSON text"),
            )
        elif msg.type == WSMsgType.ERROR:
            # aiohttp has already closed the socket, with 1009 for a frame over max_msg_size.
            break


def ref_of(raw: bytes) -> str | None:
    """The frame's ref, if it has a valid one, so even a refused frame's reply can carry it."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    ref = obj.get("ref") if isinstance(obj, dict) else None
    return ref if isinstance(ref, str) and len(ref) <= 64 else None


def _error(conn: Connection, err: ProtocolError) -> None:
    METRICS.errors_out.labels(err.code).inc()
    conn.reply(err.frame())


async def _handle(conn: Connection, raw: bytes | str) -> None:
    ref: str | None = None
    try:
        cmd = parse_command(raw)
        ref = cmd.ref
        await _dispatch(conn, cmd)
    except ProtocolError as err:
        if err.ref is None and ref is not None:
            err.ref = ref
        _error(conn, err)
    except UNAVAILABLE_ERRORS as err:
        log.warning("backend unavailable for %s: %r", conn.user, err)
        _error(conn, ProtocolError("unavailable", "a backend is unavailable; retry", ref=ref))
    except Exception:
        log.exception("handling a frame from %s failed", conn.user)
        _error(conn, ProtocolError("internal", "internal error", ref=ref))


def _answer(conn: Connection, ref: str | None, frame: dict[str, Any]) -> None:
    """Replies go only to frames that carry a ref (PROTOCOL.md §2); errors always go."""
    if ref is not None:
        frame["ref"] = ref
        conn.reply(frame)


async def _dispatch(conn: Connection, cmd: Command) -> None:
    app = conn.app
    match cmd:
        case PingCommand():
            _answer(conn, cmd.ref, {"type": "pong"})
        case JoinCommand():
            await _join(conn, cmd)
        case LeaveCommand():
            await _leave(conn, cmd.group)
            _answer(conn, cmd.ref, {"type": "left", "group": cmd.group})
        case SortCommand():
            job, dedup = await service.start_sort(
                app, conn.user, cmd.group, cmd.options, cmd.idempotency_key
            )
            _answer(conn, cmd.ref, {"type": "sort.accepted", "job": job, "deduplicated": dedup})
        case CancelCommand():
            job = await service.cancel_job(app, conn.user, cmd.job)
            _answer(conn, cmd.ref, {"type": "cancel.accepted", "job": job})
        case JobGetCommand():
            job = await service.get_job(app, conn.user, cmd.job)
            _answer(conn, cmd.ref, {"type": "job", "job": job})


async def _join(conn: Connection, cmd: JoinCommand) -> None:
    app = conn.app
    pool = app[POOL_KEY]
    group = cmd.group
    await groups.require_member(pool, group, conn.user)
    if group in conn.cursors:
        await _leave(conn, group)
    cursor = Cursor(conn.send)
    # Subscribe first, so every event after the position read below reaches the cursor.
    await app[HUB_KEY].subscribe(group, cursor)
    conn.cursors[group] = cursor
    await app[PRESENCE_KEY].enter(group, conn.user)
    replay: list[bytes] = []
    recovered = True
    async with (
        pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as db,
        db.transaction(isolation="repeatable_read", readonly=True),
    ):
        seq, version = await groups.state(db, group)
        job = await jobs.active(db, group)
        since = cmd.since
        if since is not None and since != seq:
            oldest = await events.oldest_retained(db, group)
            if since > seq or seq - since > MAX_REPLAY or oldest is None or oldest > since + 1:
                recovered = False
            else:
                replay = [e.data for e in await events.read_since(db, group, since, seq)]
    online = await app[PRESENCE_KEY].online(group)
    # `joined` is sent even without a ref: it marks where this socket's stream of the group
    # starts (replayed events follow it), and the ?group= join of a bare wscat needs it.
    joined: dict[str, Any] = {
        "type": "joined",
        "group": group,
        "seq": seq,
        "recovered": recovered,
        "snapshot": {"job": job, "online": online, "playlist_version": version},
    }
    if cmd.ref is not None:
        joined["ref"] = cmd.ref
    if since is not None:
        METRICS.resumes.labels("true" if recovered else "false").inc()
    conn.reply(joined)
    if replay:
        conn.send(replay)
    cursor.go_live(seq)


async def _leave(conn: Connection, group: str) -> None:
    cursor = conn.cursors.pop(group, None)
    if cursor is not None:
        await conn.app[HUB_KEY].unsubscribe(group, cursor)
        await conn.app[PRESENCE_KEY].leave(group, conn.user)


async def _leave_all(conn: Connection) -> None:
    for group in list(conn.cursors):
        try:
            await _leave(conn, group)
        except Exception:  # noqa: BLE001 - leaving must not stop the others
            log.exception("leaving %s failed", group)
