"""Prometheus metrics of this process."""

from __future__ import annotations

import asyncio

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    ProcessCollector,
    generate_latest,
)


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
        self.frames_out = Counter("smartsort_ws_frames_out", "Frames sent to sockets", registry=r)
        self.errors_out = Counter("smartsort_ws_errors", "Error frames sent", ["code"], registry=r)
        self.slow_closes = Counter(
            "smartsort_ws_slow_closes", "Sockets closed with 1013 (fell behind)", registry=r
        )
        self.jobs_queued = Counter("smartsort_jobs_queued", "Jobs queued", registry=r)
        self.jobs_finished = Counter(
            "smartsort_jobs_finished", "Jobs finished", ["status"], registry=r
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
