"""Analysers behind one interface: offline (stored metadata) and OpenAI (structured outputs)."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .sort import OFFLINE_ANALYZER, Analysis, SongInput, analyse_offline, track_key
from .sort.llm import (
    PROMPT_VERSION,
    SYSTEM_PROMPT,
    MalformedAnswer,
    check_answer,
    response_format,
    user_message,
)

log = logging.getLogger(__name__)


class AnalysisError(Exception):
    """An analysis failure, with a message for people and whether a later attempt may help."""

    def __init__(self, code: str, message: str, retryable: bool) -> None:
        super().__init__(message)
        self.code, self.message, self.retryable = code, message, retryable

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


@dataclass
class BatchOutcome:
    analyses: dict[str, Analysis] = field(default_factory=dict)
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class CallBudget:
    """A job's allowance of retried LLM calls (count and seconds), shared by its batches."""

    def __init__(
        self, max_retries: int = 6, max_seconds: float = 120.0, base_s: float = 0.5
    ) -> None:
        self.max_retries, self.max_seconds, self.base_s = max_retries, max_seconds, base_s
        self.retries = 0
        self.started = time.monotonic()

    def next_delay(self, kind: str, retry_after: float | None) -> float:
        """Seconds to wait before retrying, or AnalysisError when the budget is spent."""
        elapsed = time.monotonic() - self.started
        if self.retries >= self.max_retries or elapsed >= self.max_seconds:
            raise AnalysisError(
                "llm_unavailable",
                f"{kind}: retried {self.retries} times over {elapsed:.0f} s",
                retryable=True,
            )
        self.retries += 1
        backoff = random.uniform(0.5, 1.0) * min(20.0, self.base_s * 2 ** (self.retries - 1))
        delay = max(backoff, retry_after or 0.0)
        return float(min(delay, max(0.0, self.max_seconds - elapsed)))


class Analyzer(Protocol):
    name: str

    def cache_key(self, song: SongInput) -> str: ...

    async def analyse(self, songs: Sequence[SongInput], budget: CallBudget) -> BatchOutcome: ...

    async def close(self) -> None: ...


class OfflineAnalyzer:
    """Deterministic analysis from stored metadata: no network, no cost."""

    name = OFFLINE_ANALYZER

    def cache_key(self, song: SongInput) -> str:
        # The offline reading depends on the metadata too, so a changed tag is a new entry.
        digest = hashlib.blake2b(
            orjson.dumps(song.metadata, option=orjson.OPT_SORT_KEYS), digest_size=6
        ).hexdigest()
        return f"{track_key(song.artist, song.title)}#{digest}"

    async def analyse(self, songs: Sequence[SongInput], budget: CallBudget) -> BatchOutcome:
        return BatchOutcome(analyses={s.id: analyse_offline(s) for s in songs})

    async def close(self) -> None:
        return None


class UnconfiguredAnalyzer(OfflineAnalyzer):
    """Selected explicitly but unusable: every sort fails at once with the reason."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    async def analyse(self, songs: Sequence[SongInput], budget: CallBudget) -> BatchOutcome:
        raise AnalysisError("analyzer_misconfigured", self.reason, retryable=False)


def _retry_after(err: Any) -> float | None:
    """Seconds the provider asked us to wait (retry-after-ms, or retry-after in s or a date)."""
    headers = getattr(getattr(err, "response", None), "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, float(parsed.timestamp()) - time.time()) if parsed else None


class OpenAIAnalyzer:
    """Chat Completions with a strict JSON-schema response format: works with any
    OpenAI-compatible server (OPENAI_BASE_URL). Songs are identified by id both ways."""

    MAX_BAD_ANSWERS = 2  # refusals or unreadable answers per batch before it fails
    MAX_REASKS = 2  # follow-up calls for songs an answer left out

    def __init__(
        self,
        api_key: str,
        model: str,
        base_url: str | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        import openai

        self.model = model
        self.name = f"openai:{model}:{PROMPT_VERSION}"
        # Our own retry loop counts, budgets and explains retries: the SDK's is off.
        self.client = openai.AsyncOpenAI(
            api_key=api_key, base_url=base_url, timeout=timeout_s, max_retries=0
        )

    def cache_key(self, song: SongInput) -> str:
        return track_key(song.artist, song.title)

    async def close(self) -> None:
        await self.client.close()

    async def analyse(self, songs: Sequence[SongInput], budget: CallBudget) -> BatchOutcome:
        outcome = BatchOutcome()
        pending = list(songs)
        bad = reasks = 0
        while pending:
            response = await self._call(pending, budget)
            outcome.llm_calls += 1
            if response.usage is not None:
                outcome.prompt_tokens += response.usage.prompt_tokens or 0
                outcome.completion_tokens += response.usage.completion_tokens or 0
            message = response.choices[0].message if response.choices else None
            refusal = getattr(message, "refusal", None) if message is not None else None
            try:
                if refusal:
                    raise MalformedAnswer(f"the model refused: {refusal[:120]}")
                checked = check_answer(
                    message.content if message else None, [s.id for s in pending]
                )
            except MalformedAnswer as err:
                bad += 1
                log.warning(
                    "LLM answer rejected (%s); %s",
                    err,
                    "retrying" if bad <= self.MAX_BAD_ANSWERS else "giving up",
                )
                if bad > self.MAX_BAD_ANSWERS:
                    code = "llm_refused" if refusal else "llm_malformed"
                    raise AnalysisError(
                        code, f"the AI model's answers could not be used ({err})", retryable=False
                    ) from None
                continue
            outcome.analyses.update(checked.analyses)
            if checked.missing:
                reasks += 1
                if reasks > self.MAX_REASKS:
                    raise AnalysisError(
                        "llm_incomplete",
                        f"the AI model left out {len(checked.missing)} songs, "
                        f"even when asked {self.MAX_REASKS} more times",
                        retryable=True,
                    )
                missing = set(checked.missing)
                pending = [s for s in pending if s.id in missing]
            else:
                pending = []
        return outcome

    async def _call(self, songs: Sequence[SongInput], budget: CallBudget) -> Any:
        import openai

        while True:
            try:
                return await self.client.chat.completions.create(  # type: ignore[call-overload]
                    model=self.model,
                    messages=[
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": user_message(songs)},
                    ],
                    response_format=response_format(),
                    temperature=0,
                )
            except openai.RateLimitError as err:
                kind, after = "OpenAI rate limit", _retry_after(err)
            except openai.APITimeoutError:
                kind, after = "OpenAI timeout", None
            except openai.APIConnectionError:
                kind, after = "OpenAI unreachable", None
            except openai.APIStatusError as err:
                if err.status_code < 500 and err.status_code not in (408, 409):
                    raise AnalysisError(
                        "llm_rejected",
                        f"OpenAI rejected the request ({err.status_code}): "
                        + str(err.message)[:160],
                        retryable=False,
                    ) from None
                kind, after = f"OpenAI server error {err.status_code}", _retry_after(err)
            delay = budget.next_delay(kind, after)
            log.info("%s; retry %d in %.2fs", kind, budget.retries, delay)
            await asyncio.sleep(delay)
