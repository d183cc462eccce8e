"""Command line: serve, worker, migrate, seed-demo, token, watch (PROTOCOL.md §6)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from typing import Any

from aiohttp import web

from .config import SETTINGS_KEY, Settings

LOOPS = ("auto", "uvloop", "asyncio")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    logging.getLogger("pgserver").setLevel(logging.WARNING)


def use_loop(choice: str) -> str:
    """Install uvloop's event loop policy when asked (or, for auto, when it is installed)."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("--loop uvloop: uvloop is not installed") from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def cmd_serve(settings: Settings, args: argparse.Namespace) -> None:
    from .app import AccessLogger, create_app
    from .auth import issue_token

    if args.demo:
        settings.demo = True
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    loop_name = use_loop(args.loop)
    app = create_app(settings, workers=args.workers)

    def announce(_: str) -> None:
        # run_app calls this once the sockets are bound, so "listening" is true when printed.
        # Everything loaded so far lives for the whole process: keep it out of the collector's
        # generations, so a full collection does not walk it (shorter pauses on the hot path).
        gc.collect()
        gc.freeze()
        shown = "localhost" if host in ("0.0.0.0", "::", "") else host
        print(f"Smart Sort Live is listening on http://{shown}:{port}/ ({loop_name})", flush=True)
        if settings.demo:
            token = issue_token(settings.secret(), "alice", 12 * 3600)
            print(f"  Demo page:  http://{shown}:{port}/", flush=True)
            print(
                '  wscat, as alice in group \'demo\' (then type {"type":"sort","group":"demo"}):',
                flush=True,
            )
            print(
                f'    npx -y wscat -c "ws://{shown}:{port}/ws?token={token}&group=demo"', flush=True
            )

    web.run_app(
        app,
        host=host,
        port=port,
        access_log_class=AccessLogger,
        print=announce,
        shutdown_timeout=10,
    )


async def _run_contexts(settings: Settings, concurrency: int) -> None:
    from .app import backends_ctx, publisher_ctx, worker_ctx

    app = web.Application()
    app[SETTINGS_KEY] = settings
    ctxs = [backends_ctx(app), publisher_ctx(app), worker_ctx(concurrency)(app)]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = []
    try:
        for ctx in ctxs:
            await anext(ctx)
            started.append(ctx)
        # As serve does once listening: what startup loaded (the OpenAI SDK, pydantic models,
        # pools) lives as long as the process, so keep it out of full collections. Unfrozen, a
        # full collection here took 19 ms, stalling every job's claims and events meanwhile.
        gc.collect()
        gc.freeze()
        logging.getLogger("server").info("worker process ready (%d coroutines)", concurrency)
        await stop.wait()
    finally:
        for ctx in reversed(started):
            try:
                await anext(ctx)
            except StopAsyncIteration:
                pass


def cmd_worker(settings: Settings, args: argparse.Namespace) -> None:
    use_loop(args.loop)
    asyncio.run(_run_contexts(settings, args.concurrency))


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> None:
    from . import db, embedded

    async def run() -> None:
        url = settings.database_url or embedded.start_postgres(settings.data_dir)
        applied = await db.migrate(url)
        print(f"applied: {', '.join(applied)}" if applied else "database is up to date")

    asyncio.run(run())


def cmd_seed_demo(settings: Settings, args: argparse.Namespace) -> None:
    from . import db, demo, embedded

    async def run() -> None:
        url = settings.database_url or embedded.start_postgres(settings.data_dir)
        await db.migrate(url)
        pool = await db.create_pool(url, min_size=1, max_size=2)
        try:
            await demo.seed(pool)
        finally:
            await pool.close()
        print("demo data ready: group 'demo' (alice, bob, carol, dave), 'night-owls' (erin)")

    asyncio.run(run())


def cmd_token(settings: Settings, args: argparse.Namespace) -> None:
    from .auth import issue_token

    print(issue_token(settings.secret(), args.user, args.ttl_s))


def cmd_watch(settings: Settings, args: argparse.Namespace) -> None:
    from .auth import issue_token
    from .watch import watch

    token = args.token or os.environ.get("SMARTSORT_TOKEN")
    if not token:
        token = issue_token(settings.secret(), args.user, 3600)
    url = args.url or f"ws://localhost:{settings.port}/ws"
    sys.exit(asyncio.run(watch(url, token, args.group, start=args.sort)))


def add_loop_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--loop",
        choices=LOOPS,
        default=os.environ.get("SMARTSORT_LOOP", "auto"),
        help="event loop: uvloop when installed (auto, the default), or asyncio",
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="web process (with in-process workers)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--workers", type=int, default=1, help="in-process worker coroutines (0 = web only)"
    )
    p.add_argument("--demo", action="store_true", help="seed demo data and enable demo tokens")
    add_loop_option(p)
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("worker", help="worker-only process")
    p.add_argument("--concurrency", type=int, default=1)
    add_loop_option(p)
    p.set_defaults(func=cmd_worker)
    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=cmd_migrate)
    sub.add_parser("seed-demo", help="create the demo data").set_defaults(func=cmd_seed_demo)
    p = sub.add_parser("token", help="print a token for USER")
    p.add_argument("user")
    p.add_argument("--ttl-s", type=float, default=24 * 3600)
    p.set_defaults(func=cmd_token)
    p = sub.add_parser("watch", help="show GROUP's live sort as a progress bar")
    p.add_argument("group")
    p.add_argument("--url", help="socket URL (default ws://localhost:$PORT/ws)")
    p.add_argument("--token", help="token to use (default $SMARTSORT_TOKEN, else one for --user)")
    p.add_argument("--user", default="alice", help="user to mint a token for (needs the secret)")
    p.add_argument("--sort", action="store_true", help="start a sort instead of waiting for one")
    p.set_defaults(func=cmd_watch)
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings)
    args.func(settings, args)


if __name__ == "__main__":
    main()
