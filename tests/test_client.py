"""The Python client (server/client.py) and `python -m server watch`, against real servers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from server.client import Client, Frame, SmartSortError

from .conftest import token
from .helpers import ROOT, ServerProcess, free_port, python_server, server_env


def ws_url(client: Any) -> str:
    return str(client.make_url("/ws"))


def in_order(frames: list[Frame]) -> bool:
    """Every durable frame once, in seq order, none missing."""
    seqs = [f["seq"] for f in frames if "seq" in f]
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def until_done(stream: Any, job_id: str) -> list[Frame]:
    """Everything the stream brings until the job ends (its other events too)."""
    seen: list[Frame] = []
    async for frame in stream:
        seen.append(frame)
        if frame["type"] in ("job.completed", "job.failed", "job.cancelled"):
            if frame["job"]["id"] == job_id:
                return seen
    raise AssertionError("the stream ended before the job did")


async def test_sort_streams_every_event_once_in_order(client, make_group):
    group_id, songs = await make_group(["pc-ann"], songs=5, unique=True)
    async with Client(ws_url(client), token("pc-ann")) as c:
        group = c.group(group_id)
        stream = group.events()
        live = await stream.until(lambda f: f["type"] == "state" and f["state"] == "live")
        assert live["snapshot"]["online"] == ["pc-ann"]
        accepted = await group.sort()
        assert accepted["type"] == "sort.accepted" and not accepted["deduplicated"]
        job_id = accepted["job"]["id"]
        seen = await until_done(stream, job_id)
    durable = [f for f in seen if "seq" in f]
    assert in_order(durable)
    assert durable[0]["type"] == "job.queued" and durable[-1]["type"] == "job.completed"
    partial = [s["song"] for f in durable if f["type"] == "job.partial" for s in f["songs"]]
    assert sorted(partial) == sorted(songs)


async def test_error_frames_raise_with_their_code(client, make_group):
    mine, _ = await make_group(["pc-bea"], songs=1)
    other, _ = await make_group(["pc-cy"], songs=1)
    async with Client(ws_url(client), token("pc-bea")) as c:
        with pytest.raises(SmartSortError) as forbidden:
            await c.group(other).sort()
        assert forbidden.value.code == "forbidden"
        with pytest.raises(SmartSortError) as missing:
            await c.group(mine).job("no-such-job")
        assert missing.value.code == "not_found"


async def test_a_refused_token_fails_start_clearly(client):
    c = Client(ws_url(client), "not-a-token")
    with pytest.raises(SmartSortError) as refused:
        await c.start()
    assert refused.value.code == "unauthorized"


async def test_repeated_seqs_are_dropped_and_an_unrecoverable_resume_reloads(client, make_group):
    group_id, _ = await make_group(["pc-dee"], songs=1)
    async with Client(ws_url(client), token("pc-dee"), backoff_s=0.01) as c:
        group = c.group(group_id)
        stream = group.events()
        await stream.until(lambda f: f.get("state") == "live")
        assert group.seq is not None
        event = {
            "type": "playlist.updated",
            "group": group_id,
            "seq": group.seq + 1,
            "ts": "t",
            "version": 1,
            "change": "song_added",
        }
        for frame in (event, dict(event), {**event, "seq": event["seq"] - 1}):
            c._on_frame(frame)
        assert (await stream.until(lambda f: f["type"] == "playlist.updated")) == event
        assert stream._queue.empty()  # the repeats never reached the stream

        group.seq = 10**9  # as if the server's store had been reset since we last saw it
        assert c._ws is not None
        await c._ws.close()
        reload = await stream.until(lambda f: f.get("state") in ("gap-reload", "resumed"))
        assert reload["state"] == "gap-reload"
        assert reload["snapshot"]["online"] == ["pc-dee"]
        assert group.seq < 10**9


async def test_an_expired_token_is_refreshed_through_get_token(client, make_group):
    group_id, _ = await make_group(["pc-eve"], songs=1)
    issued: list[float] = []

    async def get_token() -> str:
        ttl = 1.0 if not issued else 3600.0  # the first one expires while we watch
        issued.append(ttl)
        return token("pc-eve", ttl)

    async with Client(ws_url(client), get_token=get_token, backoff_s=0.01) as c:
        states = c.states()
        group = c.group(group_id)
        stream = group.events()
        await stream.until(lambda f: f.get("state") == "live")
        # The server closes with 4401 at expiry; the client asks for a new token and resumes.
        await stream.until(lambda f: f.get("state") == "resumed")
        assert issued == [1.0, 3600.0]
        seen = []
        while not states.empty():
            seen.append(states.get_nowait())
        assert "reconnecting" in seen and c.state == "live"


@pytest.mark.slow
async def test_resumes_across_a_server_restart_and_misses_nothing(tmp_path, backends, make_group):
    group_id, _ = await make_group(["pc-fay"], songs=8, unique=True)
    port = free_port()
    env = server_env(
        backends.database_url,
        backends.redis_url,
        tmp_path,
        SMARTSORT_STEP_DELAY_S=0.1,
        SMARTSORT_ANALYSIS_BATCH_SIZE=2,
        SMARTSORT_ANALYSIS_CONCURRENCY=1,
    )
    server = ServerProcess(python_server("serve", "--port", str(port)), env)
    await server.start()
    url = f"ws://127.0.0.1:{port}/ws"
    try:
        async with Client(url, token("pc-fay"), backoff_s=0.05, max_backoff_s=0.2) as c:
            group = c.group(group_id)
            stream = group.events()
            await stream.until(lambda f: f.get("state") == "live")
            states = group.events()
            job_id = (await group.sort())["job"]["id"]
            seen: list[Frame] = []

            async def collect() -> None:
                seen.extend(await until_done(stream, job_id))

            collector = asyncio.create_task(collect())
            await states.until(lambda f: f["type"] == "job.partial")
            await server.stop()
            await states.until(lambda f: f.get("state") == "reconnecting")
            server = ServerProcess(python_server("serve", "--port", str(port)), env)
            await server.start()
            await states.until(lambda f: f.get("state") in ("resumed", "gap-reload"), 30)
            await asyncio.wait_for(collector, 60)
    finally:
        await server.stop()
    durable = [f for f in seen if "seq" in f]
    assert in_order(durable)
    assert durable[0]["type"] == "job.queued"
    assert [f["type"] for f in durable].count("job.completed") == 1
    assert {"type": "state", "state": "resumed"}.items() <= next(
        f for f in seen if f.get("state") in ("resumed", "gap-reload")
    ).items()


@pytest.mark.slow
async def test_watch_prints_progress_and_exits_with_the_outcome(tmp_path, backends, make_group):
    group_id, _ = await make_group(["pc-gus"], songs=6, unique=True)
    port = free_port()
    env = server_env(
        backends.database_url,
        backends.redis_url,
        tmp_path,
        SMARTSORT_STEP_DELAY_S=0.05,
        SMARTSORT_ANALYSIS_BATCH_SIZE=2,
    )
    server = ServerProcess(python_server("serve", "--port", str(port)), env)
    await server.start()
    url = f"ws://127.0.0.1:{port}/ws"

    async def watch(*args: str) -> tuple[int | None, str]:
        proc = await asyncio.create_subprocess_exec(
            *python_server("watch", group_id, "--url", url, *args),
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, out.decode()

    try:
        code, text = await watch("--sort", "--token", token("pc-gus"))
        assert code == 0, text
        assert "following job" in text and "completed: 6 songs" in text
        assert "analysis" in text  # the bar showed the stage

        code, text = await watch("--token", token("pc-not-a-member"))
        assert code == 2, text
        assert "forbidden" in text
    finally:
        await server.stop()
