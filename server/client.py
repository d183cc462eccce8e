"""Smart Sort Live client on asyncio: the same model as ``client_demo/smartsort.js``.

    async with connect("ws://localhost:8080/ws", token) as client:
        demo = client.group("demo")
        events = demo.events()          # subscribe first, then act: nothing is missed
        accepted = await demo.sort()
        async for ev in events:
            if ev["type"] == "job.progress":
                print(ev["percent"])
            if ev["type"] in ("job.completed", "job.failed", "job.cancelled"):
                break

It reconnects with exponential backoff and jitter, asks ``get_token`` for a fresh token when the
server closes with 4401, rejoins every group with ``since`` = the last ``seq`` it saw, drops
repeated seqs, and puts a ``{"type": "state", "state": "gap-reload", "snapshot": ...}`` item in
the stream when the server could not replay what was missed. Requests return the reply with the
same ``ref`` or raise :class:`SmartSortError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson

log = logging.getLogger(__name__)

TOKEN_EXPIRED = 4401
NO_RECONNECT = frozenset({1008, 1009})  # policy and too-big: looping would not help
TERMINAL = frozenset({"job.completed", "job.failed", "job.cancelled"})

Frame = dict[str, Any]
TokenSource = Callable[[], Awaitable[str]]


class SmartSortError(Exception):
    """An error frame in reply to a request, a timeout, or a client that was closed."""

    def __init__(self, code: str, message: str, frame: Frame | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.frame = frame


class EventStream:
    """One subscriber's events of one group, in seq order; registered when created."""

    def __init__(self, group: Group) -> None:
        self._group = group
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        group._streams.add(self)

    def _put(self, frame: Frame | None) -> None:
        self._queue.put_nowait(frame)

    def close(self) -> None:
        self._group._streams.discard(self)
        self._put(None)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Frame:
        frame = await self._queue.get()
        if frame is None:
            self._group._streams.discard(self)
            raise StopAsyncIteration
        return frame

    async def until(self, pred: Callable[[Frame], bool], timeout: float | None = None) -> Frame:
        """The first item that matches (skipping the others)."""
        async with asyncio.timeout(timeout):
            async for frame in self:
                if pred(frame):
                    return frame
        raise SmartSortError("closed", "the client was closed")


class Group:
    """A joined group: requests about it and the stream of its events."""

    def __init__(self, client: Client, group_id: str) -> None:
        self.client = client
        self.id = group_id
        self.seq: int | None = None  # the last durable seq seen: where a reconnect resumes
        self.snapshot: Frame | None = None
        self.joined = asyncio.Event()
        self._streams: set[EventStream] = set()

    def events(self) -> EventStream:
        """A new stream of this group's events and state changes, from now on."""
        return EventStream(self)

    async def sort(
        self, options: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> Frame:
        """Start (or join) the group's sort; returns the ``sort.accepted`` frame.

        A fresh idempotency key is used when none is given, so a request re-sent after a
        reconnect can never start a second job.
        """
        return await self.client.request(
            {
                "type": "sort",
                "group": self.id,
                "options": options or {},
                "idempotency_key": idempotency_key or uuid.uuid4().hex,
            }
        )

    async def cancel(self, job_id: str) -> Frame:
        reply = await self.client.request({"type": "cancel", "job": job_id})
        job: Frame = reply["job"]
        return job

    async def job(self, job_id: str) -> Frame:
        reply = await self.client.request({"type": "job.get", "job": job_id})
        job: Frame = reply["job"]
        return job

    async def leave(self) -> None:
        self.client.groups.pop(self.id, None)
        for stream in list(self._streams):
            stream.close()
        await self.client.request({"type": "leave", "group": self.id})

    def _publish(self, frame: Frame) -> None:
        for stream in list(self._streams):
            stream._put(frame)

    async def _join(self) -> None:
        frame: Frame = {"type": "join", "group": self.id}
        resuming = self.seq is not None
        if resuming:
            frame["since"] = self.seq
        try:
            joined = await self.client.request(frame)
        except SmartSortError as exc:
            if exc.code != "superseded":
                # A refused join (not a member, no such group) reaches whoever is listening.
                self._publish(
                    {"type": "error", "group": self.id, "code": exc.code, "message": exc.message}
                )
            raise
        self.snapshot = joined["snapshot"]
        if resuming and not joined["recovered"]:
            # The server could not replay what we missed: the snapshot is the truth.
            self.seq = joined["seq"]
            state = "gap-reload"
        else:
            if self.seq is None:
                self.seq = joined["seq"]
            state = "resumed" if resuming else "live"
        self.joined.set()
        self._publish({"type": "state", "state": state, "snapshot": joined["snapshot"]})

    def _event(self, frame: Frame) -> None:
        seq = frame.get("seq")
        if seq is not None:
            if self.seq is not None and seq <= self.seq:
                return  # already seen: drop
            self.seq = seq
        self._publish(frame)


class Client:
    """One socket to the server, shared by every group handle; reconnects by itself."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        get_token: TokenSource | None = None,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = 10.0,
        backoff_s: float = 0.25,
        max_backoff_s: float = 10.0,
    ) -> None:
        if token is None and get_token is None:
            raise ValueError("give a token or get_token")
        self.url = url
        self.token = token
        self.get_token = get_token
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.groups: dict[str, Group] = {}
        self.state = "connecting"
        self.hello: Frame | None = None
        self.error: SmartSortError | None = None  # why the client stopped, when it did
        self._session = session
        self._own_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._pending: dict[str, tuple[Frame, asyncio.Future[Frame]]] = {}
        self._refs = itertools.count(1)
        self._live = asyncio.Event()
        self._states: set[asyncio.Queue[str]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect; returns once the server said hello (or raises why it could not)."""
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self._runner = asyncio.create_task(self._run())
        await self._live.wait()  # set by the hello, or by _stop when the server refused us
        if self.state == "closed":
            error = self.error
            await self.close()
            raise error or SmartSortError("closed", "could not connect")

    def group(self, group_id: str) -> Group:
        """The handle of a group, joining it (now, and again after every reconnect)."""
        if group_id not in self.groups:
            group = Group(self, group_id)
            self.groups[group_id] = group
            if self.hello is not None:
                self._spawn(group._join())
        return self.groups[group_id]

    async def request(self, frame: Frame) -> Frame:
        """Send ``frame`` with a fresh ref; the reply that carries it, or SmartSortError."""
        if self.state == "closed":
            raise self.error or SmartSortError("closed", "the client is closed")
        ref = f"c{next(self._refs)}"
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[ref] = (frame, fut)
        if self.hello is not None:
            await self._send({**frame, "ref": ref})
        # otherwise it goes out when the socket is back
        try:
            async with asyncio.timeout(self.request_timeout_s):
                return await fut
        except TimeoutError:
            raise SmartSortError(
                "timeout", f"no reply to {frame['type']} within {self.request_timeout_s} s"
            ) from None
        finally:
            self._pending.pop(ref, None)

    async def close(self) -> None:
        self._stop(SmartSortError("closed", "the client was closed"))
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._tasks):
            task.cancel()
        if self._ws is not None:
            await self._ws.close()
        if self._own_session and self._session is not None:
            await self._session.close()

    def states(self) -> asyncio.Queue[str]:
        """A queue of the connection's state changes from now on."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        self._states.add(queue)
        return queue

    # -- internals ----------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except SmartSortError as exc:
                log.info("smartsort client: %s", exc)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _set_state(self, state: str) -> None:
        self.state = state
        for queue in self._states:
            queue.put_nowait(state)
        for group in self.groups.values():
            group._publish({"type": "state", "state": state})

    def _stop(self, error: SmartSortError) -> None:
        if self.state == "closed":
            return
        self.error = error
        self._set_state("closed")
        for _, fut in self._pending.values():
            if not fut.done():
                fut.set_exception(error)
        for group in self.groups.values():
            for stream in list(group._streams):
                stream.close()
        self._live.set()

    async def _send(self, frame: Frame) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.send_str(orjson.dumps(frame).decode())

    async def _run(self) -> None:
        assert self._session is not None
        attempt = 0
        refresh = self.token is None
        self._set_state("connecting")  # and "reconnecting" after every loss, below
        while self.state != "closed":
            close_code: int | None = None
            try:
                if refresh and self.get_token is not None:
                    self.token = await self.get_token()
                refresh = False
                async with self._session.ws_connect(
                    self.url, params={"token": self.token or ""}, heartbeat=30.0, max_msg_size=0
                ) as ws:
                    self._ws = ws
                    async for msg in ws:
                        if msg.type is not aiohttp.WSMsgType.TEXT:
                            continue
                        if self._on_frame(orjson.loads(msg.data)):
                            attempt = 0
                    close_code = ws.close_code
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401 and self.get_token is not None and not refresh:
                    refresh = True
                elif exc.status in (401, 403):
                    self._stop(SmartSortError("unauthorized", f"refused with HTTP {exc.status}"))
                    return
            except (aiohttp.ClientError, OSError) as exc:
                log.debug("smartsort client: connect failed: %s", exc)
            finally:
                self._ws = None
                self.hello = None
                self._live.clear()
            if self.state == "closed":
                return
            if close_code == TOKEN_EXPIRED:
                if self.get_token is None:
                    self._stop(SmartSortError("unauthorized", "token expired (4401)"))
                    return
                refresh = True
            elif close_code in NO_RECONNECT:
                self._stop(SmartSortError("closed", f"closed by the server ({close_code})"))
                return
            self._set_state("reconnecting")
            delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
            attempt += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    def _on_frame(self, frame: Frame) -> bool:
        """Route one frame; True when it was the server's hello (the socket is live)."""
        kind = frame.get("type")
        if kind == "hello":
            self.hello = frame
            self._set_state("live")
            self._live.set()
            for key, (request, _) in list(self._pending.items()):
                if request["type"] == "join":  # the rejoin below redoes it with since
                    stale = self._pending.pop(key)[1]
                    if not stale.done():
                        stale.set_exception(
                            SmartSortError("superseded", "rejoined after reconnect")
                        )
                else:
                    self._spawn(self._send({**request, "ref": key}))
            for handle in self.groups.values():
                self._spawn(handle._join())
            return True
        ref = frame.get("ref")
        if ref is not None and ref in self._pending:
            _, fut = self._pending[ref]
            if not fut.done():
                if kind == "error":
                    fut.set_exception(SmartSortError(frame["code"], frame["message"], frame))
                else:
                    fut.set_result(frame)
            return False
        group = self.groups.get(frame.get("group", ""))
        if group is not None and kind not in ("joined", "left"):
            group._event(frame)
        elif kind == "error":
            log.warning("smartsort client: %s: %s", frame.get("code"), frame.get("message"))
        return False


def connect(url: str, token: str | None = None, **options: Any) -> Client:
    """A client for ``url`` (``ws://host:port/ws``); use with ``async with``."""
    return Client(url, token, **options)
