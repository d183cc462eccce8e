"""Worker coroutines: claim a job, run metadata -> analysis -> saving, report every step."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from datetime import datetime
from typing import Any

import asyncpg

from . import events, jobs
from .analyzers import Analyzer, OfflineAnalyzer, OpenAIAnalyzer, UnconfiguredAnalyzer
from .config import Settings
from .db import UNAVAILABLE_ERRORS
from .events import Publisher
from .jobs import Lease, LeaseLost
from .metadata import MetadataProvider, MusicBrainz, StoredMetadata
from .metrics import METRICS
from .pipeline import HandBack, JobError, Reporter, Tools, run_pipeline

log = logging.getLogger(__name__)


def make_analyzer(settings: Settings) -> Analyzer:
    """OpenAI when selected (or, with 'auto', when a key is set); else the offline analyser."""
    if not settings.use_openai():
        return OfflineAnalyzer()
    if not settings.openai_api_key:
        return UnconfiguredAnalyzer("SMARTSORT_ANALYZER=openai, but OPENAI_API_KEY is not set")
    return OpenAIAnalyzer(
        settings.openai_api_key,
        settings.openai_model,
        settings.openai_base_url,
        settings.llm_timeout_s,
    )


def make_metadata(settings: Settings) -> MetadataProvider:
    if settings.metadata == "musicbrainz":
        return MusicBrainz(settings.musicbrainz_url)
    return StoredMetadata()


def _observe_duration(job: dict[str, Any]) -> None:
    """Job duration from first start to end (the job object's ISO times)."""
    if job.get("started_at") and job.get("finished_at"):
        started = datetime.fromisoformat(job["started_at"])
        finished = datetime.fromisoformat(job["finished_at"])
        METRICS.job_duration.labels(job["status"]).observe(
            max(0.0, (finished - started).total_seconds())
        )


async def execute(
    tools: Tools,
    publisher: Publisher,
    lease: Lease,
    stopping: asyncio.Event | None = None,
) -> None:
    """Run one claimed job to its end, renewing the lease, turning failures into retries."""
    pool, settings = tools.pool, tools.settings
    rep = Reporter(pool, publisher, lease, settings.progress_interval_s, stopping)
    renewer = asyncio.create_task(_renew(pool, lease), name=f"lease-{lease.job[:8]}")
    t0 = time.monotonic()
    try:
        job, evs = await run_pipeline(tools, rep, lease)
        publisher.send(evs)
        METRICS.jobs_finished.labels("completed").inc()
        _observe_duration(job)
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
        await _hand_back(pool, publisher, lease)
    except asyncio.CancelledError:
        # Shutting down past the grace period: hand the job back so another worker resumes it
        # now, not after the lease.
        try:
            await asyncio.wait_for(asyncio.shield(_hand_back(pool, publisher, lease)), 5)
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
            publisher.send(evs)
            if job["status"] == "failed":
                METRICS.jobs_finished.labels("failed").inc()
                _observe_duration(job)
            log.warning(
                "job %s attempt %d: %s -> %s",
                lease.job[:8],
                lease.attempt,
                failure.message,
                job["status"],
            )
        except LeaseLost:
            # E.g. frozen past the lease inside a transaction: the database ended that session,
            # the step failed, and recording the failure is fenced out like any other write.
            log.info(
                "job %s: lease lost (cancelled or taken over); stopping without writing",
                lease.job[:8],
            )
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


async def _hand_back(pool: asyncpg.Pool, publisher: Publisher, lease: Lease) -> None:
    try:
        publisher.send(await jobs.hand_back(pool, lease))
        log.info("job %s handed back for another worker", lease.job[:8])
    except LeaseLost:
        pass


def _classify(err: Exception) -> JobError:
    if isinstance(err, UNAVAILABLE_ERRORS):
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


class Doorbell:
    """Wakes one idle worker coroutine per ring (a job was queued), not all of them.

    Waking every idle coroutine for each job made them all run a claim transaction for the one
    job, which slowed the winner's claim. A ring with nobody waiting is kept (once): a coroutine
    busy claiming when a job arrives claims again before it waits.
    """

    def __init__(self) -> None:
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.pending = False

    def ring(self, everyone: bool = False) -> None:
        """Wake one waiting coroutine (a job was queued), or ``everyone`` (stop, or catch up)."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                if not everyone:
                    return
        self.pending = True

    async def wait(self, timeout: float) -> None:
        """Until rung, or ``timeout`` seconds (the poll that covers a lost notification)."""
        if self.pending:
            self.pending = False
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            pass
        finally:
            if waiter in self.waiters:
                self.waiters.remove(waiter)


class WorkerPool:
    """N worker coroutines sharing one LISTEN connection that wakes them when jobs arrive."""

    def __init__(
        self, dsn: str, pool: asyncpg.Pool, publisher: Publisher, settings: Settings, n: int
    ) -> None:
        self.dsn, self.pool, self.publisher, self.settings, self.n = (
            dsn,
            pool,
            publisher,
            settings,
            n,
        )
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.wake = Doorbell()
        self.stopping = asyncio.Event()
        self.tools = Tools(pool, settings, make_analyzer(settings), make_metadata(settings))
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
        log.info(
            "%d worker coroutines started as %s (analyser %s, metadata %s)",
            self.n,
            self.owner,
            self.tools.analyzer.name,
            self.tools.metadata.name,
        )

    async def stop(self) -> None:
        """Stop claiming; give running jobs until their next step (the grace period) to hand
        themselves back, then cancel what is left (which hands back too)."""
        self.stopping.set()
        self.wake.ring(everyone=True)
        if self.runners:
            await asyncio.wait(self.runners, timeout=self.settings.shutdown_grace_s)
        tasks = self.runners + self.helpers
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.tools.analyzer.close()
        await self.tools.metadata.close()

    async def _listen(self) -> None:
        """LISTEN for new jobs; reconnect with backoff. The poll in run_worker is the fallback."""
        backoff = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.dsn, timeout=10)
                await conn.add_listener(jobs.NOTIFY_CHANNEL, lambda *_: self.wake.ring())
                backoff = 0.1
                self.wake.ring(everyone=True)  # catch anything queued while we were not listening
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
                self.publisher.send(evs)
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + 60
                    await jobs.prune_sort_windows(self.pool)
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
            try:
                claimed = await jobs.claim(self.pool, self.owner, self.settings.lease_s)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001
                log.warning("claiming failed: %r", err)
                claimed = None
                await asyncio.sleep(1)
            if claimed is None:
                await self.wake.wait(self.settings.poll_interval_s)
                continue
            lease, row, evs = claimed
            self.publisher.send(evs)
            if lease.attempt == 1 and row["started_at"] is not None:
                METRICS.enqueue_to_start.observe(
                    max(0.0, (row["started_at"] - row["created_at"]).total_seconds())
                )
            log.info(
                "job %s started (attempt %d) for group %s",
                lease.job[:8],
                lease.attempt,
                lease.group,
            )
            try:
                await execute(self.tools, self.publisher, lease, self.stopping)
            except Exception:  # noqa: BLE001 - a worker coroutine must outlive any one job
                log.exception("job %s: unexpected error; its lease will expire", lease.job[:8])
