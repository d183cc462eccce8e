"""Categories and a flowing order from analyses. Deterministic: ties break on song id."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Categories in the order they are listed; each rule is tried top to bottom.
CATEGORY_ORDER = ["Chill", "Melancholy", "Moody", "Groove", "Feel-Good", "Hype"]


def categorise(a: Mapping[str, Any]) -> str:
    """One well-named category for an analysis."""
    e, v, t = float(a["energy"]), float(a["valence"]), float(a["tempo_bpm"])
    if e >= 0.72 and t >= 112:
        return "Hype"
    if e >= 0.55 and v >= 0.55:
        return "Feel-Good"
    if e < 0.4 and v < 0.4:
        return "Melancholy"
    if e < 0.45:
        return "Chill"
    if v < 0.45:
        return "Moody"
    return "Groove"


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
    names = sorted(groups, key=lambda n: CATEGORY_ORDER.index(n) if n in CATEGORY_ORDER else 99)
    return [{"name": n, "songs": groups[n]} for n in names], order


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
