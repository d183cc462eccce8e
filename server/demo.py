"""The demo data of PROTOCOL.md §6, created idempotently."""

from __future__ import annotations

import asyncpg

from .db import ACQUIRE_TIMEOUT_S

DEMO_USERS = ["alice", "bob", "carol", "dave", "erin", "mallory"]
GROUPS = {
    "demo": ("Demo Group", ["alice", "bob", "carol", "dave"]),
    "night-owls": ("Night Owls", ["erin"]),
}

# title, artist, genre, tempo_bpm, energy, valence, year
DEMO_SONGS: list[
    tuple[str, str, str | None, float | None, float | None, float | None, int | None]
] = [
    ("Blinding Lights", "The Weeknd", "pop", 171, 0.73, 0.33, 2019),
    ("Levitating", "Dua Lipa", "pop", 103, 0.82, 0.92, 2020),
    ("Get Lucky", "Daft Punk", "disco", 116, 0.81, 0.86, 2013),
    ("Uptown Funk", "Mark Ronson ft. Bruno Mars", "funk", 115, 0.84, 0.93, 2014),
    ("Mr. Brightside", "The Killers", "rock", 148, 0.92, 0.23, 2004),
    ("Smells Like Teen Spirit", "Nirvana", "rock", 117, 0.91, 0.72, 1991),
    ("Seven Nation Army", "The White Stripes", "rock", 124, 0.46, 0.32, 2003),
    ("Lose Yourself", "Eminem", "hip-hop", 171, 0.74, 0.06, 2002),
    ("HUMBLE.", "Kendrick Lamar", "hip-hop", 150, 0.62, 0.42, 2017),
    ("Juicy", "The Notorious B.I.G.", "hip-hop", 96, 0.66, 0.79, 1994),
    ("Strobe", "deadmau5", "electronic", 128, 0.67, 0.12, 2009),
    ("One More Time", "Daft Punk", "house", 123, 0.70, 0.48, 2000),
    ("Titanium", "David Guetta ft. Sia", "dance", 126, 0.79, 0.30, 2011),
    ("Midnight City", "M83", "electronic", 105, 0.71, 0.32, 2011),
    ("Breathe", "Télépopmusik", "electronic", 95, 0.38, 0.25, 2001),
    ("Weightless", "Marconi Union", "ambient", 70, 0.08, 0.05, 2011),
    ("An Ending (Ascent)", "Brian Eno", "ambient", 62, 0.10, 0.18, 1983),
    ("Clair de Lune", "Claude Debussy", "classical", 66, 0.03, 0.08, 1905),
    ("Gymnopédie No. 1", "Erik Satie", "classical", 72, 0.02, 0.15, 1888),
    ("So What", "Miles Davis", "jazz", 136, 0.29, 0.54, 1959),
    ("Take Five", "Dave Brubeck", "jazz", 172, 0.26, 0.60, 1959),
    ("Feeling Good", "Nina Simone", "jazz", 90, 0.28, 0.32, 1965),
    ("Holocene", "Bon Iver", "folk", 148, 0.24, 0.15, 2011),
    ("Skinny Love", "Bon Iver", "folk", 77, 0.33, 0.26, 2008),
    ("Fast Car", "Tracy Chapman", "folk", 104, 0.44, 0.61, 1988),
    ("Jolene", "Dolly Parton", "country", 111, 0.54, 0.81, 1973),
    ("Ring of Fire", "Johnny Cash", "country", 105, 0.45, 0.88, 1963),
    ("Redbone", "Childish Gambino", "r&b", 160, 0.36, 0.58, 2016),
    ("Adorn", "Miguel", "r&b", 90, 0.55, 0.43, 2012),
    ("Lovely Day", "Bill Withers", "soul", 98, 0.65, 0.71, 1977),
    ("A Change Is Gonna Come", "Sam Cooke", "soul", 82, 0.27, 0.29, 1964),
    ("Three Little Birds", "Bob Marley & The Wailers", "reggae", 148, 0.51, 0.95, 1977),
    ("Could You Be Loved", "Bob Marley & The Wailers", "reggae", 103, 0.69, 0.96, 1980),
    ("Despacito", "Luis Fonsi ft. Daddy Yankee", "latin", 89, 0.80, 0.84, 2017),
    ("Dakiti", "Bad Bunny", "latin", 110, 0.57, 0.15, 2020),
    ("Master of Puppets", "Metallica", "metal", 212, 0.98, 0.46, 1986),
    ("Basket Case", "Green Day", "punk", 175, 0.94, 0.78, 1994),
    ("Heart of Glass", "Blondie", "disco", 114, 0.63, 0.84, 1978),
    ("Dreams", "Fleetwood Mac", "rock", 120, 0.49, 0.79, 1977),
    ("Bad Guy", "Billie Eilish", "pop", 135, 0.43, 0.56, 2019),
    ("Electric Feel", "MGMT", "indie", 103, 0.81, 0.56, 2007),
    ("Do I Wanna Know?", "Arctic Monkeys", "indie", 85, 0.53, 0.41, 2013),
    # Partly tagged and untagged songs: the analyser must still place them sensibly.
    ("Coffee Shop Loop", "Lo-Fi Collective", "lo-fi", None, None, None, 2021),
    ("Untitled Voice Memo", "Bob's Cousin", None, None, None, None, None),
]

NIGHT_SONGS: list[
    tuple[str, str, str | None, float | None, float | None, float | None, int | None]
] = [
    ("Nightcall", "Kavinsky", "electronic", 91, 0.72, 0.11, 2010),
    ("Teardrop", "Massive Attack", "electronic", 77, 0.41, 0.12, 1998),
    ("Glory Box", "Portishead", "electronic", 118, 0.35, 0.23, 1994),
    ("Night Owl", "Gerry Rafferty", "rock", 112, 0.55, 0.47, 1979),
    ("Moonlight Sonata", "Ludwig van Beethoven", "classical", 54, 0.01, 0.04, 1801),
    ("Round Midnight", "Thelonious Monk", "jazz", 68, 0.14, 0.21, 1947),
    ("In the Air Tonight", "Phil Collins", "rock", 96, 0.48, 0.27, 1981),
    ("Midnight Train to Georgia", "Gladys Knight & the Pips", "soul", 124, 0.49, 0.68, 1973),
    ("Everybody Wants to Rule the World", "Tears for Fears", "pop", 112, 0.70, 0.54, 1985),
    ("Night Fever", "Bee Gees", "disco", 110, 0.64, 0.92, 1977),
    ("Insomnia", "Faithless", "dance", 127, 0.87, 0.35, 1995),
    ("Sweet Dreams", "Eurythmics", "pop", 126, 0.56, 0.86, 1983),
    ("Nights", "Frank Ocean", "r&b", 90, 0.55, 0.43, 2016),
    ("After Dark", "Mr.Kitty", "electronic", 140, 0.54, 0.06, 2014),
    ("Pink + White", "Frank Ocean", "r&b", 160, 0.55, 0.55, 2016),
    ("The Less I Know the Better", "Tame Impala", "indie", 117, 0.74, 0.79, 2015),
    ("Fade Into You", "Mazzy Star", "indie", 70, 0.25, 0.15, 1993),
    ("Harvest Moon", "Neil Young", "folk", 113, 0.41, 0.62, 1992),
    ("Lua", "Bright Eyes", "folk", 88, 0.15, 0.22, 2005),
    ("Space Song", "Beach House", "indie", 147, 0.79, 0.10, 2015),
    ("Night Shift", "Lucy Dacus", "indie", 100, None, None, 2018),
    ("Up All Night", "Unknown Band", None, None, None, None, None),
]


def _metadata(
    row: tuple[str, str, str | None, float | None, float | None, float | None, int | None],
) -> dict[str, object]:
    _, _, genre, tempo, energy, valence, year = row
    meta = {"genre": genre, "tempo_bpm": tempo, "energy": energy, "valence": valence, "year": year}
    return {k: v for k, v in meta.items() if v is not None}


async def seed(pool: asyncpg.Pool) -> None:
    """Create the demo users, groups and songs; running it again changes nothing."""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO users (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            [(u, u.capitalize()) for u in DEMO_USERS],
        )
        for gid, (name, members) in GROUPS.items():
            await conn.execute(
                "INSERT INTO groups (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                gid,
                name,
            )
            await conn.executemany(
                "INSERT INTO members (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(gid, m) for m in members],
            )
        for gid, rows, adders in (
            ("demo", DEMO_SONGS, ["alice", "bob", "carol", "dave"]),
            ("night-owls", NIGHT_SONGS, ["erin"]),
        ):
            await conn.executemany(
                "INSERT INTO songs (id, group_id, title, artist, added_by, added_at, metadata)"
                " VALUES ($1, $2, $3, $4, $5, now() - make_interval(secs => $6), $7)"
                " ON CONFLICT (id) DO NOTHING",
                [
                    (
                        f"{gid}-{i + 1:02d}",
                        gid,
                        r[0],
                        r[1],
                        adders[i % len(adders)],
                        float(len(rows) - i),
                        _metadata(r),
                    )
                    for i, r in enumerate(rows)
                ],
            )


async def create_group(
    pool: asyncpg.Pool,
    group: str,
    members: list[str],
    songs: int = 0,
    name: str | None = None,
    unique_titles: bool = False,
) -> list[str]:
    """Create a group with members and ``songs`` songs drawn from the demo list (tests, benches).

    With ``unique_titles`` no other group shares a track, so no analysis is cached yet.
    """
    suffix = f" - {group}" if unique_titles else ""
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO users (id, name) VALUES ($1, $1) ON CONFLICT (id) DO NOTHING",
            [(m,) for m in members],
        )
        await conn.execute(
            "INSERT INTO groups (id, name) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            group,
            name or group,
        )
        await conn.executemany(
            "INSERT INTO members (group_id, user_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(group, m) for m in members],
        )
        ids = [f"{group}-{i:04d}" for i in range(songs)]
        pool_rows = DEMO_SONGS + NIGHT_SONGS
        await conn.executemany(
            "INSERT INTO songs (id, group_id, title, artist, added_by, added_at, metadata)"
            " VALUES ($1, $2, $3, $4, $5, now() - make_interval(secs => $6), $7)"
            " ON CONFLICT (id) DO NOTHING",
            [
                (
                    ids[i],
                    group,
                    f"{pool_rows[i % len(pool_rows)][0]}"
                    + (f" (take {i // len(pool_rows) + 1})" if i >= len(pool_rows) else "")
                    + suffix,
                    pool_rows[i % len(pool_rows)][1],
                    members[0],
                    float(songs - i),
                    _metadata(pool_rows[i % len(pool_rows)]),
                )
                for i in range(songs)
            ],
        )
    return ids
