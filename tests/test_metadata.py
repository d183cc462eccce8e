"""The MusicBrainz metadata provider against a local fake of its web service."""

from __future__ import annotations

import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.metadata import USER_AGENT, parse_recording

pytestmark = pytest.mark.workers(0)


@pytest.fixture
async def musicbrainz():
    seen: list[tuple[float, str, str]] = []

    async def recording(request: web.Request) -> web.Response:
        seen.append(
            (time.monotonic(), request.headers.get("User-Agent", ""), request.query["query"])
        )
        if "Nobody Knows" in request.query["query"]:
            return web.json_response({"recordings": []})
        return web.json_response(
            {
                "recordings": [
                    {
                        "id": "mbid-1",
                        "title": "x",
                        "length": 215000,
                        "first-release-date": "1977-06-01",
                        "tags": [{"name": "disco", "count": 2}, {"name": "funk", "count": 9}],
                    }
                ]
            }
        )

    app = web.Application()
    app.router.add_get("/ws/2/recording", recording)
    server = TestServer(app)
    await server.start_server()
    server.seen = seen  # type: ignore[attr-defined]
    yield server
    await server.close()


def test_parse_recording_takes_year_top_tag_and_duration() -> None:
    data = {
        "recordings": [
            {
                "id": "m",
                "first-release-date": "1999",
                "length": 61000,
                "tags": [{"name": "a", "count": 1}, {"name": "b", "count": 3}],
            }
        ]
    }
    assert parse_recording(data) == {"mbid": "m", "year": 1999, "genre": "b", "duration_s": 61}
    assert parse_recording({"recordings": []}) is None
    assert parse_recording("nonsense") is None


async def test_metadata_comes_from_musicbrainz_politely_and_is_cached(
    aiohttp_client, app_factory, connect, pool, musicbrainz
):
    import uuid

    from server import demo

    from .conftest import auth

    group = f"g-{uuid.uuid4().hex[:10]}"
    await demo.create_group(pool, group, ["mb1"], 0)
    await pool.execute(
        "INSERT INTO songs (id, group_id, title, artist, metadata) VALUES"
        " ($1, $2, $3, 'Artist A', '{}'), ($4, $2, $5, 'Artist B', '{\"genre\": \"jazz\"}'),"
        " ($6, $2, 'Nobody Knows ' || $2, 'Artist C', '{}')",
        f"{group}-1",
        group,
        f"Song One {group}",
        f"{group}-2",
        f"Song Two {group}",
        f"{group}-3",
    )
    client = await aiohttp_client(
        app_factory(
            workers=1, metadata="musicbrainz", musicbrainz_url=str(musicbrainz.make_url(""))
        )
    )
    s = await connect("mb1", tc=client)
    await s.request("join", group=group)
    await s.request("sort", group=group)
    done = await s.until(lambda f: f["type"] in ("job.completed", "job.failed"), timeout=30)
    assert done["type"] == "job.completed"
    seen = musicbrainz.seen
    assert len(seen) == 3
    assert all(agent == USER_AGENT for _, agent, _ in seen)
    assert all(b[0] - a[0] >= 0.99 for a, b in zip(seen, seen[1:], strict=False))  # 1 req/s
    playlist = await (await client.get(f"/api/groups/{group}/playlist", headers=auth("mb1"))).json()
    by_id = {x["id"]: x for x in playlist["songs"]}
    # Fetched metadata fed the analysis (funk has the most votes); stored metadata wins.
    assert by_id[f"{group}-1"]["analysis"]["genre"] == "funk"
    assert by_id[f"{group}-2"]["analysis"]["genre"] == "jazz"
    progress = [f for f in s.frames if f["type"] == "job.progress" and f["stage"] == "metadata"]
    assert progress[-1]["done"] == 3
    # A second sort asks MusicBrainz nothing: the answers (even "not found") are cached.
    await s.request("sort", group=group)
    await s.until(lambda f: f["type"] == "job.completed" and f["job"]["id"] != done["job"]["id"])
    assert len(musicbrainz.seen) == 3
