"""HTTP routes (PROTOCOL.md §5): the old front end's smart-sort, polling, SSE, the playlist."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from . import events, groups, jobs, service
from .auth import AuthError, Identity, bearer, issue_token, verify_token
from .config import SETTINGS_KEY
from .db import POOL_KEY, UNAVAILABLE_ERRORS
from .events import PUBLISHER_KEY, REDIS_KEY
from .hub import HUB_KEY, Cursor
from .metrics import METRICS
from .protocol import GroupId, ProtocolError, clip, describe
from .ws import json_error

log = logging.getLogger(__name__)

STATUS = {
    "bad_request": 400,
    "unknown_type": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
    "conflict": 409,
    "too_large": 413,
    "rate_limited": 429,
    "unavailable": 503,
    "internal": 500,
}
CLIENT_DIR = Path(__file__).resolve().parent.parent / "client_demo"
routes = web.RouteTableDef()


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every refusal is JSON with success, error and code; never a traceback."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ProtocolError as err:
        resp = json_error(STATUS[err.code], err.code, err.message)
        if err.retry_after_s is not None:
            resp.headers["Retry-After"] = str(max(1, round(err.retry_after_s)))
        return resp
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            code = {404: "not_found", 405: "bad_request", 413: "too_large"}.get(
                exc.status, "bad_request"
            )
            return json_error(exc.status, code, exc.reason)
        raise
    except UNAVAILABLE_ERRORS as err:
        log.warning("backend unavailable: %r", err)
        return json_error(503, "unavailable", "a backend is unavailable; retry")
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, "internal", "internal error")


def identify(request: web.Request) -> Identity:
    settings = request.app[SETTINGS_KEY]
    token = bearer(request.headers.get("Authorization")) or request.query.get("token")
    try:
        return verify_token(settings.secret(), token)
    except AuthError as err:
        raise ProtocolError("unauthorized", str(err)) from None


_GROUP_ID = TypeAdapter(GroupId)


def group_param(request: web.Request) -> str:
    try:
        return _GROUP_ID.validate_python(request.match_info["group"])
    except ValidationError:
        raise ProtocolError("not_found", "no such group") from None


async def read_json(request: web.Request, *, optional: bool = False) -> Any:
    body = await request.read()
    if not body.strip():
        if optional:
            return {}
        raise ProtocolError("bad_request", "a JSON body is required")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolError("bad_request", "body is not valid JSON") from None


@routes.post("/api/groups/{group}/smart-sort")
async def smart_sort(request: web.Request) -> web.Response:
    user = identify(request).user
    group = group_param(request)
    body = await read_json(request, optional=True)
    if not isinstance(body, dict):
        raise ProtocolError("bad_request", "body must be a JSON object")
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise ProtocolError("bad_request", "field 'options' must be an object")
    key = body.get("idempotency_key") or request.headers.get("Idempotency-Key")
    if key is not None and not (isinstance(key, str) and 0 < len(key) <= 128):
        raise ProtocolError("bad_request", "idempotency key must be a string of 1-128 characters")
    job, dedup = await service.start_sort(request.app, user, group, options, key)
    return web.json_response(
        {
            "success": True,
            "message": "Smart sort started. Processing in background...",
            "job": job,
            "deduplicated": dedup,
        },
        status=202,
        dumps=_dumps,
    )


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


@routes.get("/api/jobs/{job}")
async def get_job(request: web.Request) -> web.Response:
    user = identify(request).user
    job = await service.get_job(request.app, user, request.match_info["job"])
    return web.json_response(job, dumps=_dumps)


@routes.post("/api/jobs/{job}/cancel")
async def cancel_job(request: web.Request) -> web.Response:
    user = identify(request).user
    job = await service.cancel_job(request.app, user, request.match_info["job"])
    return web.json_response({"success": True, "job": job}, dumps=_dumps)


@routes.get("/api/groups/{group}/jobs")
async def group_jobs(request: web.Request) -> web.Response:
    user = identify(request).user
    group = group_param(request)
    pool = request.app[POOL_KEY]
    await groups.require_member(pool, group, user)
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise ProtocolError("bad_request", "query 'limit' must be an integer") from None
    if not 1 <= limit <= 100:
        raise ProtocolError("bad_request", "query 'limit' must be between 1 and 100")
    return web.json_response({"jobs": await jobs.recent(pool, group, limit)}, dumps=_dumps)


@routes.get("/api/groups/{group}/playlist")
async def playlist(request: web.Request) -> web.Response:
    user = identify(request).user
    group = group_param(request)
    pool = request.app[POOL_KEY]
    await groups.require_member(pool, group, user)
    category = request.query.get("category", "all")
    data = await groups.playlist(pool, group, None if category == "all" else category)
    return web.json_response(data, dumps=_dumps)


@routes.post("/api/groups/{group}/songs")
async def add_songs(request: web.Request) -> web.Response:
    user = identify(request).user
    group = group_param(request)
    pool = request.app[POOL_KEY]
    await groups.require_member(pool, group, user)
    body = await read_json(request)
    try:
        if isinstance(body, dict) and "songs" in body:
            songs = groups.BulkSongsIn.model_validate(body).songs
        else:
            songs = [groups.SongIn.model_validate(body)]
    except ValidationError as err:
        raise ProtocolError("bad_request", describe(err)) from None
    added, evs = await groups.add_songs(pool, group, user, songs)
    request.app[PUBLISHER_KEY].send(evs)
    return web.json_response({"success": True, "songs": added}, status=201, dumps=_dumps)


@routes.delete("/api/groups/{group}/songs/{song}")
async def remove_song(request: web.Request) -> web.Response:
    user = identify(request).user
    group = group_param(request)
    pool = request.app[POOL_KEY]
    await groups.require_member(pool, group, user)
    evs = await groups.remove_song(pool, group, clip(request.match_info["song"], 64))
    request.app[PUBLISHER_KEY].send(evs)
    return web.Response(status=204)


@routes.get("/api/groups/{group}/events")
async def group_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: the socket's durable events for one group, resumable by seq."""
    user = identify(request).user
    group = group_param(request)
    app = request.app
    pool = app[POOL_KEY]
    await groups.require_member(pool, group, user)
    raw_since = request.headers.get("Last-Event-ID") or request.query.get("since")
    try:
        since = int(raw_since) if raw_since is not None else None
    except ValueError:
        raise ProtocolError("bad_request", "Last-Event-ID / since must be an integer") from None

    queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=app[SETTINGS_KEY].send_queue_max)
    overflow = asyncio.Event()

    def sink(data: bytes, key: bytes | None) -> None:
        try:
            queue.put_nowait(data)
        except asyncio.QueueFull:
            overflow.set()

    cursor = Cursor(sink)
    hub = app[HUB_KEY]
    await hub.subscribe(group, cursor)
    try:
        seq, _ = await groups.state(pool, group)
        backlog = await events.read_since(pool, group, since, seq) if since is not None else []
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)
        await resp.write(b"retry: 1000\n\n")
        for ev in backlog:
            await resp.write(_sse(ev.data))
        cursor.go_live(seq)
        while not overflow.is_set():
            try:
                data = await asyncio.wait_for(queue.get(), 15)
            except TimeoutError:
                await resp.write(b": keep-alive\n\n")
                continue
            await asyncio.wait_for(resp.write(_sse(data)), 10)
        return resp
    finally:
        await hub.unsubscribe(group, cursor)


def _sse(data: bytes) -> bytes:
    head = orjson.loads(data)
    seq = head.get("seq")
    lines = b"event: " + head["type"].encode() + b"\n"
    if seq is not None:
        lines = b"id: %d\n" % seq + lines
    return bytes(lines + b"data: " + data + b"\n\n")


@routes.post("/api/demo/token")
async def demo_token(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS_KEY]
    if not settings.demo:
        raise ProtocolError("not_found", "demo mode is off")
    body = await read_json(request)
    user = body.get("user") if isinstance(body, dict) else None
    if not isinstance(user, str) or not 0 < len(user) <= 64:
        raise ProtocolError("bad_request", "field 'user' must be a user id")
    return web.json_response({"token": issue_token(settings.secret(), user, 12 * 3600)})


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    problems: dict[str, str] = {}
    try:
        await asyncio.wait_for(request.app[POOL_KEY].fetchval("SELECT 1"), 2)
    except Exception as err:  # noqa: BLE001 - any failure means not ready
        problems["postgres"] = type(err).__name__
    try:
        await asyncio.wait_for(request.app[REDIS_KEY].ping(), 2)
    except Exception as err:  # noqa: BLE001
        problems["redis"] = type(err).__name__
    hub = request.app.get(HUB_KEY)
    if hub is not None and not hub.connected.is_set():
        # The relay restarts itself; until it is subscribed again this process misses live events.
        problems["redis_subscription"] = "reconnecting"
    if problems:
        return web.json_response(
            {
                "success": False,
                "error": f"not ready: {', '.join(problems)}",
                "code": "unavailable",
                "failed": problems,
            },
            status=503,
        )
    return web.json_response({"ok": True})


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    hub = request.app[HUB_KEY]
    METRICS.joined.set(hub.joined())
    METRICS.groups_live.set(len(hub.feeds))
    try:
        counts = await asyncio.wait_for(jobs.active_counts(request.app[POOL_KEY]), 2)
    except Exception as err:  # noqa: BLE001 - metrics must render without the database
        log.warning("metrics: job counts unavailable: %r", err)
    else:
        for state in jobs.ACTIVE:
            METRICS.jobs_active.labels(state).set(counts.get(state, 0))
    return web.Response(body=METRICS.render(), content_type="text/plain", charset="utf-8")


def require_operator(request: web.Request) -> None:
    """The jobs view: SMARTSORT_ADMIN_TOKEN as a Bearer token (or ?token=); else demo mode only."""
    import hmac

    settings = request.app[SETTINGS_KEY]
    if settings.admin_token:
        given = bearer(request.headers.get("Authorization")) or request.query.get("token") or ""
        if not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
            raise ProtocolError("unauthorized", "the jobs view needs SMARTSORT_ADMIN_TOKEN")
    elif not settings.demo:
        raise ProtocolError("forbidden", "set SMARTSORT_ADMIN_TOKEN to open the jobs view")


@routes.get("/admin/jobs")
async def admin_jobs(request: web.Request) -> web.Response:
    """Running and recent jobs for operators: stage, progress, attempts, errors, durations."""
    require_operator(request)
    try:
        limit = min(500, max(1, int(request.query.get("limit", "100"))))
    except ValueError:
        raise ProtocolError("bad_request", "query 'limit' must be an integer") from None
    recent = await jobs.recent_for_operators(request.app[POOL_KEY], limit)
    counts = await jobs.active_counts(request.app[POOL_KEY])
    return web.json_response(
        {"counts": counts, "jobs": recent}, dumps=lambda o: orjson.dumps(o).decode()
    )


@routes.get("/admin")
async def admin_page(request: web.Request) -> web.FileResponse:
    require_operator(request)
    return web.FileResponse(CLIENT_DIR / "admin.html")


@routes.get("/")
async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(CLIENT_DIR / "index.html")
