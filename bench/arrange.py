"""How well the arranger flows: the sorted order against the original and random shuffles."""

from __future__ import annotations

import random
import statistics
from typing import Any

from server.demo import DEMO_SONGS, NIGHT_SONGS, _metadata
from server.sort import SongInput, analyse_offline, arrange
from server.sort.arrange import flow_score


def synthetic(n: int, seed: int = 1) -> list[SongInput]:
    rng = random.Random(seed)
    genres = ["pop", "rock", "jazz", "ambient", "house", "folk", "hip-hop", "soul", "metal"]
    return [
        SongInput(
            f"s{i}",
            f"Song {i}",
            f"Artist {i % 37}",
            {
                "genre": rng.choice(genres),
                "energy": round(rng.random(), 2),
                "valence": round(rng.random(), 2),
                "tempo_bpm": rng.randint(60, 180),
            },
        )
        for i in range(n)
    ]


def run(quick: bool = False) -> dict[str, Any]:
    playlists = {
        "demo (44)": [
            SongInput(f"d{i}", r[0], r[1], _metadata(r)) for i, r in enumerate(DEMO_SONGS)
        ],
        "night-owls (22)": [
            SongInput(f"n{i}", r[0], r[1], _metadata(r)) for i, r in enumerate(NIGHT_SONGS)
        ],
        "synthetic (300)": synthetic(300),
    }
    out: dict[str, Any] = {}
    rng = random.Random(7)
    for name, songs in playlists.items():
        analyses = {s.id: analyse_offline(s) for s in songs}
        original = [s.id for s in songs]
        categories, order = arrange(analyses)
        shuffles = []
        for _ in range(20 if quick else 200):
            ids = list(original)
            rng.shuffle(ids)
            shuffles.append(flow_score(ids, analyses))
        out[name] = {
            "sorted": flow_score(order, analyses),
            "original": flow_score(original, analyses),
            "random_mean": {
                k: round(statistics.mean(s[k] for s in shuffles), 3) for k in shuffles[0]
            },
            "categories": {c["name"]: len(c["songs"]) for c in categories},
        }
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| playlist | order | mean tempo jump (bpm) | mean energy jump |", "|---|---|---|---|"]
    for name, r in result.items():
        for label in ("sorted", "original", "random_mean"):
            s = r[label]
            lines.append(
                f"| {name} | {label} | {s['mean_tempo_jump_bpm']} | {s['mean_energy_jump']} |"
            )
    return "\n".join(lines)
