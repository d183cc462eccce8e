"""Analysers behind one interface: the offline one here; OpenAI slots in beside it."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from .sort import OFFLINE_ANALYZER, Analysis, SongInput, analyse_offline, track_key


@dataclass
class BatchOutcome:
    analyses: dict[str, Analysis] = field(default_factory=dict)
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Analyzer(Protocol):
    name: str

    def cache_key(self, song: SongInput) -> str: ...

    async def analyse(self, songs: Sequence[SongInput]) -> BatchOutcome: ...


class OfflineAnalyzer:
    """Deterministic analysis from stored metadata: no network, no cost."""

    name = OFFLINE_ANALYZER

    def cache_key(self, song: SongInput) -> str:
        # The offline reading depends on the metadata too, so a changed tag is a new entry.
        digest = hashlib.blake2b(
            orjson.dumps(song.metadata, option=orjson.OPT_SORT_KEYS), digest_size=6
        ).hexdigest()
        return f"{track_key(song.artist, song.title)}#{digest}"

    async def analyse(self, songs: Sequence[SongInput]) -> BatchOutcome:
        return BatchOutcome(analyses={s.id: analyse_offline(s) for s in songs})
