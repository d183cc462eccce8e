"""Categories and a flowing order from analyses. Deterministic: ties break on song id."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Named for people, listed from calm to wild; each rule in categorise() is tried top to bottom.
CHILL = "Late-night chill"
MELANCHOLY = "Rainy-day melancholy"
MOODY = "Moody & brooding"
GROOVE = "Easy groove"
FEEL_GOOD = "Feel-good sing-alongs"
HYPE = "Peak-time hype"
CATEGORY_ORDER = [CHILL, MELANCHOLY, MOODY, GROOVE, FEEL_GOOD, HYPE]
MIN_SHARE = 0.05  # a category smaller than this share of the playlist (and < 2 songs) is merged


def categorise(a: Mapping[str, Any]) -> str:
    """One category for an analysis, from energy, valence and tempo."""
    e, v, t = float(a["energy"]), float(a["valence"]), float(a["tempo_bpm"])
    if e >= 0.72 and t >= 112:
        return HYPE
    if e >= 0.55 and v >= 0.55:
        return FEEL_GOOD
    if e < 0.4 and v < 0.4:
        return MELANCHOLY
    if e < 0.45:
        return CHILL
    if v < 0.45:
        return MOODY
    return GROOVE


def _cost(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """How jarring it is to play b right after a: tempo jumps and energy jumps."""
    return (
        abs(float(a["tempo_bpm"]) - float(b["tempo_bpm"])) / 40
        + abs(float(a["energy"]) - float(b["energy"])) * 2
    )


def arrange(
    analyses: Mapping[str, Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Return (categories, order) covering every song exactly once.

    The order is an energy arc: it warms up, peaks about two-thirds in and cools down,
    then a local pass swaps neighbours where that makes tempo and energy steps smaller.
    Categories smaller than MIN_SHARE of the playlist join their nearest neighbour.
    """
    ids = sorted(analyses, key=lambda s: (float(analyses[s]["energy"]), s))
    rising = ids[0::2]
    falling = ids[1::2][::-1]
    # Peak later than the middle: move the gentlest third of the falling side to the start.
    k = len(falling) // 3
    order = falling[len(falling) - k :][::-1] + rising + falling[: len(falling) - k]
    order = _smooth(order, analyses)

    groups: dict[str, list[str]] = {}
    for sid in order:
        groups.setdefault(categorise(analyses[sid]), []).append(sid)
    _merge_tiny(groups, analyses, {sid: i for i, sid in enumerate(order)})
    names = sorted(groups, key=lambda n: CATEGORY_ORDER.index(n) if n in CATEGORY_ORDER else 99)
    return [{"name": n, "songs": groups[n]} for n in names], order


def _centroid(ids: Sequence[str], a: Mapping[str, Mapping[str, Any]]) -> tuple[float, float]:
    return (
        sum(float(a[s]["energy"]) for s in ids) / len(ids),
        sum(float(a[s]["valence"]) for s in ids) / len(ids),
    )


def _merge_tiny(
    groups: dict[str, list[str]], a: Mapping[str, Mapping[str, Any]], position: Mapping[str, int]
) -> None:
    total = sum(len(v) for v in groups.values())
    floor = max(2, math.ceil(MIN_SHARE * total))
    while len(groups) > 1:
        small = min(groups, key=lambda n: (len(groups[n]), n))
        if len(groups[small]) >= floor:
            return
        ce, cv = _centroid(groups[small], a)
        target = min(
            (n for n in groups if n != small),
            key=lambda n: (math.dist((ce, cv), _centroid(groups[n], a)), n),
        )
        # Songs within a category keep their playlist order.
        groups[target] = sorted(groups[target] + groups.pop(small), key=position.__getitem__)


def _smooth(order: list[str], a: Mapping[str, Mapping[str, Any]], rounds: int = 3) -> list[str]:
    order = list(order)
    for _ in range(rounds):
        changed = False
        for i in range(1, len(order) - 2):
            p, x, y, n = order[i - 1], order[i], order[i + 1], order[i + 2]
            before = _cost(a[p], a[x]) + _cost(a[x], a[y]) + _cost(a[y], a[n])
            after = _cost(a[p], a[y]) + _cost(a[y], a[x]) + _cost(a[x], a[n])
            if after + 1e-9 < before:
                order[i], order[i + 1] = y, x
                changed = True
        if not changed:
            break
    return order


def total_cost(order: Sequence[str], analyses: Mapping[str, Mapping[str, Any]]) -> float:
    """The summed jarring of consecutive songs (lower flows better)."""
    return sum(_cost(analyses[a], analyses[b]) for a, b in zip(order, order[1:], strict=False))


def flow_score(order: Sequence[str], analyses: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """How an order flows: mean tempo and energy jump between neighbours (lower is smoother)."""
    pairs = list(zip(order, order[1:], strict=False))
    if not pairs:
        return {"mean_tempo_jump_bpm": 0.0, "mean_energy_jump": 0.0}
    tempo = [
        abs(float(analyses[x]["tempo_bpm"]) - float(analyses[y]["tempo_bpm"])) for x, y in pairs
    ]
    energy = [abs(float(analyses[x]["energy"]) - float(analyses[y]["energy"])) for x, y in pairs]
    return {
        "mean_tempo_jump_bpm": round(sum(tempo) / len(pairs), 2),
        "mean_energy_jump": round(sum(energy) / len(pairs), 4),
    }
