"""Prometheus metrics of this process."""

from __future__ import annotations

import asyncio

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Seconds: from sub-millisecond fan-out to minutes-long jobs.
FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SLOW = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # process_resident_memory_bytes, process_open_fds, CPU seconds, …
        ProcessCollector(registry=r)
        self.tasks = Gauge("smartsort_asyncio_tasks", "Live asyncio tasks", registry=r)
        self.tasks.set_function(_task_count)
        self.connections = Gauge("smartsort_ws_connections", "Open WebSockets", registry=r)
        self.messages_in = Counter("smartsort_ws_messages_in", "Client frames received", registry=r)
        self.frames_queued = Counter(
            "smartsort_ws_frames_queued",
            "Frames written by a socket's writer task: replies, replays, and events for a socket "
            "that is behind (events written directly are counted in smartsort_events_delivered)",
            registry=r,
        )
        self.errors_out = Counter("smartsort_ws_errors", "Error frames sent", ["code"], registry=r)
        self.slow_closes = Counter(
            "smartsort_ws_slow_closes", "Sockets closed with 1013 (fell behind)", registry=r
        )
        self.jobs_queued = Counter("smartsort_jobs_queued", "Jobs queued", registry=r)
        self.jobs_finished = Counter(
            "smartsort_jobs_finished", "Jobs finished", ["status"], registry=r
        )
        self.jobs_active = Gauge(
            "smartsort_jobs", "Jobs not finished, by state (read at scrape)", ["state"], registry=r
        )
        self.enqueue_to_start = Histogram(
            "smartsort_job_enqueue_to_start_seconds",
            "From sort accepted to the first attempt's start",
            buckets=FAST,
            registry=r,
        )
        self.job_duration = Histogram(
            "smartsort_job_duration_seconds",
            "From first start to the end, by outcome",
            ["status"],
            buckets=SLOW,
            registry=r,
        )
        self.joined = Gauge(
            "smartsort_ws_joined", "Joined (socket, group) pairs on this process", registry=r
        )
        self.groups_live = Gauge(
            "smartsort_groups_live", "Groups with a live subscription on this process", registry=r
        )
        self.events_published = Counter(
            "smartsort_events_published", "Events published to Redis", registry=r
        )
        self.publish_dropped = Counter(
            "smartsort_publish_dropped",
            "Committed events never published (queue full while Redis was slow); gap-filled",
            registry=r,
        )
        self.events_delivered = Counter(
            "smartsort_events_delivered",
            "Events handed to local sockets (one per socket)",
            registry=r,
        )
        self.fanout_lag = Histogram(
            "smartsort_fanout_lag_seconds",
            "From an event's commit timestamp to its hand-off to this process's sockets",
            buckets=FAST,
            registry=r,
        )
        self.gap_fills = Counter(
            "smartsort_gap_fills",
            "Gaps in the published stream filled from PostgreSQL",
            registry=r,
        )
        self.resumes = Counter(
            "smartsort_resumes",
            "Joins with since, by whether the gap was replayed",
            ["recovered"],
            registry=r,
        )
        self.llm_cache_hits = Counter(
            "smartsort_llm_cache_hits", "Songs whose analysis came from the cache", registry=r
        )
        self.llm_calls = Counter("smartsort_llm_calls", "LLM responses received", registry=r)
        self.prompt_tokens = Counter("smartsort_prompt_tokens", "LLM prompt tokens", registry=r)
        self.completion_tokens = Counter(
            "smartsort_completion_tokens", "LLM completion tokens", registry=r
        )

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # scraped outside the event loop
        return 0.0


METRICS = Metrics()
