"""The offline analyser and the arranger: pure, deterministic."""

from __future__ import annotations

import random

from server.demo import DEMO_SONGS, _metadata
from server.sort import SongInput, analyse_offline, arrange, categorise, track_key
from server.sort.arrange import flow_score, total_cost


def demo_inputs() -> list[SongInput]:
    return [SongInput(f"s{i}", r[0], r[1], _metadata(r)) for i, r in enumerate(DEMO_SONGS)]


def test_analysis_uses_metadata_then_genre_then_neutral() -> None:
    tagged = analyse_offline(
        SongInput(
            "a", "T", "A", {"genre": "metal", "energy": 0.9, "valence": 0.2, "tempo_bpm": 180}
        )
    )
    assert (tagged["energy"], tagged["valence"], tagged["tempo_bpm"]) == (0.9, 0.2, 180)
    assert tagged["confidence"] == 1.0
    genre_only = analyse_offline(SongInput("b", "T", "A", {"genre": "Ambient"}))
    assert genre_only["genre"] == "ambient" and genre_only["energy"] < 0.3
    assert genre_only["confidence"] == 0.3
    bare = analyse_offline(SongInput("c", "T", "A", {}))
    assert 0.35 <= bare["energy"] <= 0.65 and bare["confidence"] == 0.0
    weird = analyse_offline(
        SongInput("d", "T", "A", {"energy": "loud", "tempo_bpm": True, "valence": 7})
    )
    assert weird["valence"] == 1.0 and isinstance(weird["energy"], float)


def test_analysis_is_deterministic() -> None:
    songs = demo_inputs()
    assert [analyse_offline(s) for s in songs] == [analyse_offline(s) for s in songs]


def test_arrange_places_every_song_exactly_once() -> None:
    analyses = {s.id: analyse_offline(s) for s in demo_inputs()}
    categories, order = arrange(analyses)
    assert sorted(order) == sorted(analyses)
    in_categories = [sid for c in categories for sid in c["songs"]]
    assert sorted(in_categories) == sorted(analyses)
    # Most songs sit in the category their own analysis points to (tiny ones were merged).
    agree = sum(categorise(analyses[sid]) == c["name"] for c in categories for sid in c["songs"])
    assert agree >= 0.9 * len(analyses)
    assert 4 <= len(categories) <= 6  # a handful
    assert all(len(c["songs"]) >= 3 for c in categories)  # none tiny (5% of 44, at least 2)
    position = {sid: i for i, sid in enumerate(order)}
    for c in categories:
        assert [position[s] for s in c["songs"]] == sorted(position[s] for s in c["songs"])


def test_tiny_categories_join_their_nearest_neighbour() -> None:
    def song(e: float, v: float, t: float) -> dict[str, float]:
        return {"energy": e, "valence": v, "tempo_bpm": t}

    analyses = {f"c{i}": song(0.2, 0.6, 80 + i) for i in range(20)}  # chill
    analyses["h1"] = song(0.95, 0.5, 170)  # one lonely hype song
    categories, _ = arrange(analyses)
    assert len(categories) == 1
    assert sorted(categories[0]["songs"]) == sorted(analyses)


def test_flow_score_reports_mean_jumps() -> None:
    a = {
        "x": {"energy": 0.1, "tempo_bpm": 100},
        "y": {"energy": 0.5, "tempo_bpm": 120},
        "z": {"energy": 0.3, "tempo_bpm": 110},
    }
    assert flow_score(["x", "y", "z"], a) == {"mean_tempo_jump_bpm": 15.0, "mean_energy_jump": 0.3}
    assert flow_score(["x"], a) == {"mean_tempo_jump_bpm": 0.0, "mean_energy_jump": 0.0}


def test_arrange_flows_better_than_random_orders() -> None:
    analyses = {s.id: analyse_offline(s) for s in demo_inputs()}
    _, order = arrange(analyses)
    rng = random.Random(7)
    ids = list(analyses)
    random_costs = []
    for _ in range(50):
        rng.shuffle(ids)
        random_costs.append(total_cost(ids, analyses))
    assert total_cost(order, analyses) < min(random_costs)


def test_energy_arc_peaks_after_the_start_and_cools_down() -> None:
    analyses = {s.id: analyse_offline(s) for s in demo_inputs()}
    _, order = arrange(analyses)
    energies = [analyses[s]["energy"] for s in order]
    peak = energies.index(max(energies))
    assert len(order) * 0.4 <= peak <= len(order) * 0.8
    assert energies[0] < 0.3 and energies[-1] < 0.5


def test_arrange_is_deterministic_and_handles_tiny_playlists() -> None:
    analyses = {s.id: analyse_offline(s) for s in demo_inputs()}
    assert arrange(analyses) == arrange(dict(reversed(list(analyses.items()))))
    assert arrange({}) == ([], [])
    one = {"x": analyse_offline(SongInput("x", "T", "A", {}))}
    assert arrange(one)[1] == ["x"]


def test_track_key_normalises() -> None:
    assert track_key("Daft Punk", "Get Lucky (Radio Edit)") == track_key("daft  punk", "GET LUCKY")
    assert track_key("Beyoncé", "Halo") == "beyonce|halo"
