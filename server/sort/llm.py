"""The LLM analyser's pure half: prompt, response schema and answer validation. No I/O."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from .analyze import Analysis, SongInput, mood_of, normalise_genre

PROMPT_VERSION = "v1"
MOODS = ["euphoric", "intense", "upbeat", "brooding", "peaceful", "melancholic"]

SYSTEM_PROMPT = """You are a music analyst helping friends sort a shared playlist.
For every song you are given, estimate from your knowledge of the recording (and any metadata
provided) its main genre, its mood, and these measures:
- energy: 0.0 (calm, quiet) to 1.0 (loud, intense)
- valence: 0.0 (sad, dark) to 1.0 (happy, bright)
- tempo_bpm: beats per minute, 40 to 220
- danceability: 0.0 to 1.0
- confidence: 0.0 to 1.0, how sure you are (low for songs you do not know)
mood is one of: euphoric, intense, upbeat, brooding, peaceful, melancholic.
Answer with one entry per song, using exactly the song's "id" as given. Do not skip songs."""


class SongAnalysisOut(BaseModel):
    """One song as the model must answer it (all fields required: strict structured outputs)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    genre: str
    mood: str
    energy: float
    valence: float
    tempo_bpm: float
    danceability: float
    confidence: float


class BatchOut(BaseModel):
    model_config = ConfigDict(extra="forbid")
    songs: list[SongAnalysisOut]


def response_format() -> dict[str, Any]:
    """A strict JSON-schema response format. Ranges are checked by us, not the schema, because
    not every OpenAI-compatible server supports numeric bounds in strict mode."""
    song = {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "genre": {"type": "string"},
            "mood": {"type": "string", "enum": MOODS},
            "energy": {"type": "number"},
            "valence": {"type": "number"},
            "tempo_bpm": {"type": "number"},
            "danceability": {"type": "number"},
            "confidence": {"type": "number"},
        },
        "required": list(SongAnalysisOut.model_fields),
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": {"songs": {"type": "array", "items": song}},
        "required": ["songs"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "song_analyses", "strict": True, "schema": schema},
    }


def user_message(songs: Sequence[SongInput]) -> str:
    """The songs to analyse, identified by id, with whatever metadata we have."""
    items = []
    for s in songs:
        item: dict[str, Any] = {"id": s.id, "title": s.title, "artist": s.artist}
        meta = {k: v for k, v in (s.metadata or {}).items() if k in ("genre", "year", "tempo_bpm")}
        if meta:
            item["metadata"] = meta
        items.append(item)
    return "Analyse these songs:\n" + json.dumps({"songs": items}, ensure_ascii=False)


class MalformedAnswer(ValueError):
    """The model's answer is not valid JSON of the expected shape."""


@dataclass
class Checked:
    analyses: dict[str, Analysis] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # asked for, not (validly) answered
    unknown: int = 0  # ids we never asked for: ignored


_RANGES = {
    "energy": (0.0, 1.0),
    "valence": (0.0, 1.0),
    "danceability": (0.0, 1.0),
    "confidence": (0.0, 1.0),
    "tempo_bpm": (40.0, 220.0),
}


def check_answer(content: str | None, asked: Sequence[str]) -> Checked:
    """Validate one answer against the ids asked: each once, every field in range."""
    if not content:
        raise MalformedAnswer("the answer was empty")
    try:
        batch = BatchOut.model_validate_json(content)
    except ValidationError as err:
        raise MalformedAnswer(
            f"the answer did not match the schema ({err.error_count()} errors)"
        ) from None
    wanted = set(asked)
    out = Checked()
    for song in batch.songs:
        if song.id not in wanted:
            out.unknown += 1
            continue
        if song.id in out.analyses or not _in_range(song):
            continue  # a repeat keeps the first; an out-of-range entry is asked again
        energy, valence = round(song.energy, 3), round(song.valence, 3)
        out.analyses[song.id] = Analysis(
            genre=normalise_genre(song.genre),
            mood=song.mood if song.mood in MOODS else mood_of(energy, valence),
            energy=energy,
            valence=valence,
            tempo_bpm=round(song.tempo_bpm, 1),
            danceability=round(song.danceability, 3),
            confidence=round(song.confidence, 2),
        )
    out.missing = [sid for sid in asked if sid not in out.analyses]
    return out


def _in_range(song: SongAnalysisOut) -> bool:
    values: Mapping[str, float] = song.model_dump()
    return all(lo <= values[k] <= hi and values[k] == values[k] for k, (lo, hi) in _RANGES.items())
