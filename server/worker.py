"""Worker coroutines: claim a job, run metadata -> analysis -> saving, report every step."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from . import events, jobs
from .analyzers import Analyzer, OfflineAnalyzer
from .config import Settings
from .events import Event
from .jobs import Lease, LeaseLost
from .metrics import METRICS
from .sort import SongInput, arrange, categorise

log = logging.getLogger(__name__)


class JobError(Exception):
    """A failure with a code, a message for people, and whether retrying may help."""

    def __init__(self, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class HandBack(Exception):
    """The worker is shutting down: give the job back at this step boundary."""


class Reporter:
    """Appends and publishes a job's events; progress is throttled, stage ends are not."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis,
        lease: Lease,
        interval_s: float,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.pool, self.redis, self.lease, self.interval_s = pool, redis, lease, interval_s
        self.stopping = stopping
        self.last_sent = 0.0
        self.stage_started: dict[str, float] = {}

    def checkpoint(self) -> None:
        """Between steps: stop here if the worker is shutting down."""
        if self.stopping is not None and self.stopping.is_set():
            raise HandBack(self.lease.job)

    async def emit(self, evs: list[Event]) -> None:
        await events.publish(self.redis, evs)

    async def progress(self, stage: str, done: int, total: int, message: str) -> None:
        now = time.monotonic()
        first_of_stage = stage not in self.stage_started
        started = self.stage_started.setdefault(stage, now)
        # Throttled, but a stage's first and last reports always go out.
        if not first_of_stage and done < total and now - self.last_sent < self.interval_s:
            return
        self.last_sent = now
        eta = (now - started) / done * (total - done) if 0 < done < total else None
        await self.emit(
            await jobs.progress(self.pool, self.lease, stage, done, total, message, eta)
        )

    async def partial(self, songs: list[dict[str, Any]]) -> None:
        await self.emit(await jobs.partial(self.pool, self.lease, songs))


def make_analyzer(settings: Settings) -> Analyzer:
    if settings.analyzer == "openai":
        raise JobError(
            "analyzer_unavailable", "the OpenAI analyser is not available in this build yet", False
        )
    # 'auto' uses the offline analyser until the OpenAI one lands (see CHANGELOG).
    return OfflineAnalyzer()


async def run_pipeline(
    pool: asyncpg.Pool, settings: Settings, analyzer: Analyzer, rep: Reporter, lease: Lease
) -> tuple[dict[str, Any], list[Event]]:
    started = time.monotonic()
    rows = await pool.fetch(
        "SELECT id, title, artist, metadata FROM songs WHERE group_id = $1 ORDER BY added_at, id",
        lease.group,
    )
    songs = [SongInput(r["id"], r["title"], r["artist"], r["metadata"] or {}) for r in rows]
    total = len(songs)

    # Metadata: the default provider uses what is stored with each song.
    await rep.progress("metadata", 0, total, f"Reading metadata of {total} songs")
    await rep.progress("metadata", total, total, f"Metadata ready for {total} songs")

    # Analysis: cached results first, then the rest in batches.
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
    stats = {
        "songs": total,
        "analysed": 0,
        "cached": len(analyses),
        "llm_calls": 0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
    }
    done = len(analyses)
    size = settings.analysis_batch_size
    await rep.progress("analysis", done, total, f"{done} of {total} songs already analysed")
    for i in range(0, len(analyses), size):
        chunk = list(analyses.items())[i : i + size]
        await rep.partial([_partial(sid, a) for sid, a in chunk])
    for i in range(0, len(todo), size):
        batch = todo[i : i + size]
        rep.checkpoint()
        if settings.step_delay_s:
            await asyncio.sleep(settings.step_delay_s)
        outcome = await analyzer.analyse(batch)
        missing = [s.id for s in batch if s.id not in outcome.analyses]
        if missing:
            raise JobError(
                "analysis_incomplete", f"no analysis came back for {len(missing)} songs", True
            )
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
        done += len(batch)
        await rep.partial([_partial(s.id, outcome.analyses[s.id]) for s in batch])
        first = i + 1 + stats["cached"]
        await rep.progress("analysis", done, total, f"Analysed songs {first}-{done} of {total}")

    # Saving: arrange, then one transaction writes it all.
    rep.checkpoint()
    await rep.progress("saving", 0, 1, "Arranging and saving the playlist")
    categories, order = arrange(analyses)
    stats["duration_ms"] = int((time.monotonic() - started) * 1000)
    return await jobs.complete(pool, lease, categories, order, analyses, stats)


def _partial(song: str, analysis: Any) -> dict[str, Any]:
    return {"song": song, "category": categorise(analysis), "analysis": analysis}


async def execute(
    pool: asyncpg.Pool,
    redis: aioredis.Redis,
    settings: Settings,
    lease: Lease,
    stopping: asyncio.Event | None = None,
) -> None:
    """Run one claimed job to its end, renewing the lease, turning failures into retries."""
    rep = Reporter(pool, redis, lease, settings.progress_interval_s, stopping)
    renewer = asyncio.create_task(_renew(pool, lease), name=f"lease-{lease.job[:8]}")
    t0 = time.monotonic()
    try:
        analyzer = make_analyzer(settings)
        job, evs = await run_pipeline(pool, settings, analyzer, rep, lease)
        await rep.emit(evs)
        METRICS.jobs_finished.labels("completed").inc()
        stats = job["result"]["stats"]
        log.info(
            "job %s done in %.2fs (%d songs, %d analysed, %d cached, %d LLM calls)",
            lease.job[:8],
            time.monotonic() - t0,
            stats["songs"],
            stats["analysed"],
            stats["cached"],
            stats["llm_calls"],
        )
    except LeaseLost:
        log.info(
            "job %s: lease lost (cancelled or taken over); stopping without writing", lease.job[:8]
        )
    except HandBack:
        await _hand_back(pool, redis, lease)
    except asyncio.CancelledError:
        # Shutting down past the grace period: hand the job back so another worker resumes it
        # now, not after the lease.
        try:
            await asyncio.wait_for(asyncio.shield(_hand_back(pool, redis, lease)), 5)
        except Exception as err:  # noqa: BLE001 - the lease sweep is the fallback
            log.warning(
                "handing back job %s failed (%r); its lease will expire", lease.job[:8], err
            )
        raise
    except Exception as err:  # noqa: BLE001 - every failure becomes a retry or a failed job
        failure = err if isinstance(err, JobError) else _classify(err)
        if not isinstance(err, JobError):
            log.exception("job %s attempt %d failed", lease.job[:8], lease.attempt)
        try:
            job, evs = await jobs.fail_or_retry(
                pool, lease, failure.as_dict(), settings.max_attempts
            )
            await events.publish(redis, evs)
            if job["status"] == "failed":
                METRICS.jobs_finished.labels("failed").inc()
            log.warning(
                "job %s attempt %d: %s -> %s",
                lease.job[:8],
                lease.attempt,
                failure.message,
                job["status"],
            )
        except LeaseLost:
            pass
        except Exception as err2:  # noqa: BLE001 - e.g. the database is down
            # Leave the job running: its lease expires and the sweep retries it.
            log.warning(
                "could not record failure of job %s (%r); the lease sweep will retry it",
                lease.job[:8],
                err2,
            )
    finally:
        renewer.cancel()
        try:
            await renewer
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass


async def _hand_back(pool: asyncpg.Pool, redis: aioredis.Redis, lease: Lease) -> None:
    try:
        await events.publish(redis, await jobs.hand_back(pool, lease))
        log.info("job %s handed back for another worker", lease.job[:8])
    except LeaseLost:
        pass


def _classify(err: Exception) -> JobError:
    if isinstance(
        err,
        OSError
        | asyncio.TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionStatusError
        | asyncpg.CannotConnectNowError,
    ):
        return JobError("unavailable", "the database or Redis was unavailable", True)
    return JobError("internal", "the sort failed unexpectedly", False)


async def _renew(pool: asyncpg.Pool, lease: Lease) -> None:
    while True:
        await asyncio.sleep(lease.lease_s / 3)
        try:
            await jobs.renew(pool, lease)
        except LeaseLost:
            return
        except Exception as err:  # noqa: BLE001 - keep trying until the lease runs out
            log.warning("renewing lease of job %s failed: %r", lease.job[:8], err)


class WorkerPool:
    """N worker coroutines sharing one LISTEN connection that wakes them when jobs arrive."""

    def __init__(
        self, dsn: str, pool: asyncpg.Pool, redis: aioredis.Redis, settings: Settings, n: int
    ) -> None:
        self.dsn, self.pool, self.redis, self.settings, self.n = dsn, pool, redis, settings, n
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.helpers: list[asyncio.Task[None]] = []
        self.runners: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.helpers = [
            asyncio.create_task(self._listen(), name="worker-listen"),
            asyncio.create_task(self._sweep(), name="worker-sweep"),
        ]
        self.runners = [
            asyncio.create_task(self.run_worker(i), name=f"worker-{i}") for i in range(self.n)
        ]
        log.info("%d worker coroutines started as %s", self.n, self.owner)

    async def stop(self) -> None:
        """Stop claiming; give running jobs until their next step (the grace period) to hand
        themselves back, then cancel what is left (which hands back too)."""
        self.stopping.set()
        self.wake.set()
        if self.runners:
            await asyncio.wait(self.runners, timeout=self.settings.shutdown_grace_s)
        tasks = self.runners + self.helpers
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _listen(self) -> None:
        """LISTEN for new jobs; reconnect with backoff. The poll in run_worker is the fallback."""
        backoff = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                await conn.add_listener(jobs.NOTIFY_CHANNEL, lambda *_: self.wake.set())
                backoff = 0.1
                self.wake.set()  # catch anything queued while we were not listening
                while not conn.is_closed():
                    await asyncio.sleep(5)
                    await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.warning("job listener lost (%r); reconnecting", err)
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _sweep(self) -> None:
        """Requeue jobs whose worker died (lease expired); prune events past retention."""
        next_prune = 0.0
        while True:
            await asyncio.sleep(max(1.0, self.settings.lease_s / 3))
            try:
                evs = await jobs.requeue_expired(self.pool, self.settings.max_attempts)
                await events.publish(self.redis, evs)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + 60
                    pruned = await events.prune(self.pool, self.settings.event_retention_s)
                    if pruned:
                        log.info(
                            "pruned %d events older than %.0fs",
                            pruned,
                            self.settings.event_retention_s,
                        )
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.warning("lease sweep failed: %r", err)

    async def run_worker(self, index: int) -> None:
        while not self.stopping.is_set():
            # Clear before claiming: a NOTIFY that lands during the claim must not be lost.
            self.wake.clear()
            try:
                claimed = await jobs.claim(self.pool, self.owner, self.settings.lease_s)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.warning("claiming failed: %r", err)
                claimed = None
                await asyncio.sleep(1)
            if claimed is None:
                try:
                    await asyncio.wait_for(self.wake.wait(), self.settings.poll_interval_s)
                except TimeoutError:
                    pass
                continue
            lease, row, evs = claimed
            await events.publish(self.redis, evs)
            log.info(
                "job %s started (attempt %d) for group %s",
                lease.job[:8],
                lease.attempt,
                lease.group,
            )
            try:
                await execute(self.pool, self.redis, self.settings, lease, self.stopping)
            except Exception:  # noqa: BLE001 - a worker coroutine must outlive any one job
                log.exception("job %s: unexpected error; its lease will expire", lease.job[:8])
