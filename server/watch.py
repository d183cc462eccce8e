"""``python -m server watch GROUP``: a group's live sort as a progress bar in a terminal."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm

from .client import TERMINAL, Client, Frame, SmartSortError

ACTIVE = ("queued", "running", "retrying")


def _job_id(frame: Frame) -> str | None:
    job = frame.get("job")
    return job if isinstance(job, str) else (job or {}).get("id")


async def watch(
    url: str, token: str, group_id: str, *, start: bool = False, out: TextIO = sys.stdout
) -> int:
    """Follow the group's sort (starting one with ``start``) until it ends.

    Exit status: 0 when it completed, 1 when it failed or was cancelled, 2 when the client
    could not connect or was refused.
    """

    def say(text: str) -> None:
        tqdm.write(text, file=out)

    try:
        async with Client(url, token) as client:
            group = client.group(group_id)
            stream = group.events()
            state = await stream.until(
                lambda f: f["type"] == "error" or (f["type"] == "state" and "snapshot" in f), 30
            )
            if state["type"] == "error":
                raise SmartSortError(state["code"], state["message"])
            job: dict[str, Any] | None = state["snapshot"]["job"]
            if start:
                job = (await group.sort())["job"]
            elif job is None or job["status"] not in ACTIVE:
                say(f"no sort running in '{group_id}'; waiting for one (Ctrl-C to stop)")
                first = await stream.until(lambda f: f["type"] in ("job.queued", "job.started"))
                job = first["job"]
            assert job is not None
            return await _follow(stream, job, say, out)
    except SmartSortError as exc:
        print(f"watch: {exc.message} ({exc.code})", file=sys.stderr)
        return 2
    except TimeoutError:
        print(f"watch: no answer from {url} within 30 s", file=sys.stderr)
        return 2


async def _follow(stream: Any, job: dict[str, Any], say: Any, out: TextIO) -> int:
    job_id = job["id"]
    say(f"following job {job_id} (requested by {job['requested_by']})")
    bar = tqdm(
        total=job["progress"]["total"] or None,
        initial=job["progress"]["done"],
        desc=job["stage"] or job["status"],
        unit="song",
        file=out,
        dynamic_ncols=True,
    )
    try:
        async for frame in stream:
            kind = frame["type"]
            if kind == "state":
                if frame["state"] in ("reconnecting", "resumed", "gap-reload"):
                    say(f"connection: {frame['state']}")
                continue
            if _job_id(frame) != job_id:
                continue
            if kind == "job.progress":
                if bar.desc != frame["stage"] or bar.total != frame["total"]:
                    bar.reset(total=frame["total"])  # a new stage counts from zero
                    bar.unit = "song" if frame["stage"] != "saving" else "step"
                    bar.set_description(frame["stage"], refresh=False)
                bar.n = frame["done"]
                bar.refresh()
            elif kind == "job.started":
                say(f"started (attempt {frame['attempt']})")
            elif kind == "job.retrying":
                err = frame["error"]
                say(
                    f"retrying in {frame['retry_in_s']:.1f} s (attempt {frame['attempt']}): "
                    f"{err['message']}"
                )
            elif kind in TERMINAL:
                if kind == "job.completed" and bar.total:
                    bar.n = bar.total
                    bar.refresh()
                bar.close()
                return _summary(frame, say)
    finally:
        bar.close()
    return 2  # the stream ended: the client was closed


def _summary(frame: Frame, say: Any) -> int:
    job = frame["job"]
    if frame["type"] == "job.completed":
        result = job["result"]
        stats = result["stats"]
        say(
            f"completed: {stats['songs']} songs in {stats['duration_ms'] / 1000:.1f} s "
            f"({stats['llm_calls']} LLM calls, {stats['cached']} cached)"
        )
        for category in result["categories"]:
            say(f"  {category['name']}: {len(category['songs'])} songs")
        return 0
    if frame["type"] == "job.cancelled":
        say(f"cancelled by {frame['by']}")
        return 1
    say(f"failed: {job['error']['message']}")
    return 1
