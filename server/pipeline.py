"""One job's pipeline: metadata -> analysis -> saving, every step reported to the group."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from . import jobs
from .analyzers import AnalysisError, Analyzer, BatchOutcome, CallBudget
from .config import Settings
from .events import Event, Publisher
from .jobs import Lease
from .metadata import MetadataProvider
from .metrics import METRICS
from .sort import SongInput, arrange, categorise, track_key

# A failure of the job with a code, a message for people, and whether retrying may help.
JobError = AnalysisError


class HandBack(Exception):
    """The worker is shutting down: give the job back at this step boundary."""


class Reporter:
    """Appends and publishes a job's events; progress is throttled, stage ends are not."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        publisher: Publisher,
        lease: Lease,
        interval_s: float,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.pool, self.publisher, self.lease, self.interval_s = pool, publisher, lease, interval_s
        self.stopping = stopping
        self.last_sent = 0.0
        self.stage_started: dict[str, float] = {}

    def checkpoint(self) -> None:
        """Between steps: stop here if the worker is shutting down."""
        if self.stopping is not None and self.stopping.is_set():
            raise HandBack(self.lease.job)

    def emit(self, evs: list[Event]) -> None:
        self.publisher.send(evs)

    async def progress(self, stage: str, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        first_of_stage = stage not in self.stage_started
        started = self.stage_started.setdefault(stage, now)
        # Throttled, but a stage's first and last reports always go out.
        if not first_of_stage and done < total and now - self.last_sent < self.interval_s:
            return
        self.last_sent = now
        eta = (now - started) / done * (total - done) if 0 < done < total else None
        self.emit(await jobs.progress(self.pool, self.lease, stage, done, total, message, eta))

    async def partial(self, songs: list[dict[str, Any]]) -> None:
        self.emit(await jobs.partial(self.pool, self.lease, songs))


@dataclass
class Tools:
    """What a pipeline runs with; shared by every job of a worker process."""

    pool: asyncpg.Pool
    settings: Settings
    analyzer: Analyzer
    metadata: MetadataProvider


async def run_pipeline(
    tools: Tools, rep: Reporter, lease: Lease
) -> tuple[dict[str, Any], list[Event]]:
    started = time.monotonic()
    pool = tools.pool
    rows = await pool.fetch(
        "SELECT id, title, artist, metadata FROM songs WHERE group_id = $1 ORDER BY added_at, id",
        lease.group,
    )
    songs = [SongInput(r["id"], r["title"], r["artist"], r["metadata"] or {}) for r in rows]
    songs = await metadata_stage(tools, rep, songs)
    analyses, stats = await analysis_stage(tools, rep, songs)
    # Saving: arrange, then one transaction writes it all.
    rep.checkpoint()
    await rep.progress("saving", 0, 1, "Arranging and saving the playlist")
    categories, order = arrange(analyses)
    stats["duration_ms"] = int((time.monotonic() - started) * 1000)
    return await jobs.complete(pool, lease, categories, order, analyses, stats)


async def metadata_stage(tools: Tools, rep: Reporter, songs: list[SongInput]) -> list[SongInput]:
    """Fill in what the provider knows; stored metadata always wins. Cached per track."""
    total = len(songs)
    provider = tools.metadata
    await rep.progress("metadata", 0, total, f"Reading metadata of {total} songs")
    if provider.name == "stored":
        await rep.progress("metadata", total, total, f"Metadata ready for {total} songs")
        return songs
    keys = {s.id: track_key(s.artist, s.title) for s in songs}
    rows = await tools.pool.fetch(
        "SELECT track_key, data FROM track_metadata WHERE provider = $1 AND track_key = ANY($2)",
        provider.name,
        list(set(keys.values())),
    )
    known: dict[str, dict[str, Any]] = {r["track_key"]: r["data"] for r in rows}
    out = []
    for i, song in enumerate(songs, 1):
        key = keys[song.id]
        if key not in known:
            rep.checkpoint()
            found = await provider.lookup(song) or {}
            await tools.pool.execute(
                "INSERT INTO track_metadata (track_key, provider, data) VALUES ($1, $2, $3)"
                " ON CONFLICT (track_key, provider) DO UPDATE SET data = EXCLUDED.data",
                key,
                provider.name,
                found,
            )
            known[key] = found
        merged = {**known[key], **song.metadata}
        out.append(SongInput(song.id, song.title, song.artist, merged))
        await rep.progress("metadata", i, total, f"Looked up {i} of {total} songs")
    return out


async def analysis_stage(
    tools: Tools, rep: Reporter, songs: Sequence[SongInput]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cached analyses first, then the rest in batches, several in flight at once."""
    pool, settings, analyzer = tools.pool, tools.settings, tools.analyzer
    total = len(songs)
    keys = {s.id: analyzer.cache_key(s) for s in songs}
    cached_rows = await pool.fetch(
        "SELECT track_key, analysis FROM song_analyses WHERE analyzer = $1"
        " AND track_key = ANY($2::text[])",
        analyzer.name,
        list(set(keys.values())),
    )
    cache = {r["track_key"]: r["analysis"] for r in cached_rows}
    analyses: dict[str, Any] = {s.id: cache[keys[s.id]] for s in songs if keys[s.id] in cache}
    todo = [s for s in songs if s.id not in analyses]
    METRICS.llm_cache_hits.inc(len(analyses))
    stats: dict[str, Any] = {
        "songs": total,
        "analysed": 0,
        "cached": len(analyses),
        "llm_calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }
    size = settings.analysis_batch_size
    done = len(analyses)
    await rep.progress("analysis", done, total, f"{done} of {total} songs already analysed")
    ready = list(analyses.items())
    for i in range(0, len(ready), size):
        await rep.partial([_partial(sid, a) for sid, a in ready[i : i + size]])

    budget = CallBudget(
        settings.llm_max_retries, settings.llm_retry_budget_s, settings.llm_backoff_s
    )
    gate = asyncio.Semaphore(settings.analysis_concurrency)

    async def run(batch: list[SongInput]) -> tuple[list[SongInput], BatchOutcome]:
        async with gate:
            rep.checkpoint()
            if settings.step_delay_s:
                await asyncio.sleep(settings.step_delay_s)
            return batch, await analyzer.analyse(batch, budget)

    tasks = [asyncio.create_task(run(todo[i : i + size])) for i in range(0, len(todo), size)]
    try:
        for next_done in asyncio.as_completed(tasks):
            batch, outcome = await next_done
            missing = [s.id for s in batch if s.id not in outcome.analyses]
            if missing:
                raise JobError("analysis_incomplete", f"no analysis for {len(missing)} songs", True)
            # Cache before announcing: a retry after a crash re-pays nothing announced.
            await pool.executemany(
                "INSERT INTO song_analyses (track_key, analyzer, analysis) VALUES ($1, $2, $3)"
                " ON CONFLICT (track_key, analyzer) DO UPDATE SET analysis = EXCLUDED.analysis",
                [(keys[s.id], analyzer.name, outcome.analyses[s.id]) for s in batch],
            )
            analyses.update(outcome.analyses)
            stats["analysed"] += len(batch)
            stats["llm_calls"] += outcome.llm_calls
            stats["prompt_tokens"] += outcome.prompt_tokens
            stats["completion_tokens"] += outcome.completion_tokens
            METRICS.llm_calls.inc(outcome.llm_calls)
            METRICS.prompt_tokens.inc(outcome.prompt_tokens)
            METRICS.completion_tokens.inc(outcome.completion_tokens)
            done += len(batch)
            await rep.partial([_partial(s.id, outcome.analyses[s.id]) for s in batch])
            await rep.progress("analysis", done, total, f"Analysed {done} of {total} songs")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return analyses, stats


def _partial(song: str, analysis: Any) -> dict[str, Any]:
    return {"song": song, "category": categorise(analysis), "analysis": analysis}
