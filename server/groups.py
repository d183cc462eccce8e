"""Groups, membership and the playlist."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Annotated, Any

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import events
from .db import ACQUIRE_TIMEOUT_S
from .events import Event
from .protocol import ProtocolError

MAX_BULK = 1000
MAX_METADATA_BYTES = 4096


async def require_member(db: asyncpg.Pool | asyncpg.Connection, group: str, user: str) -> None:
    """Raise not_found for an unknown group and forbidden for a non-member."""
    row = await db.fetchrow(
        "SELECT EXISTS (SELECT 1 FROM members WHERE group_id = $1 AND user_id = $2) AS member"
        " FROM groups WHERE id = $1",
        group,
        user,
    )
    if row is None:
        raise ProtocolError("not_found", f"no such group '{group}'")
    if not row["member"]:
        raise ProtocolError("forbidden", f"you are not a member of group '{group}'")


async def is_member(db: asyncpg.Pool | asyncpg.Connection, group: str, user: str) -> bool:
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM members WHERE group_id = $1 AND user_id = $2)",
            group,
            user,
        )
    )


async def state(db: asyncpg.Pool | asyncpg.Connection, group: str) -> tuple[int, int]:
    """(last_seq, playlist_version) of a group."""
    row = await db.fetchrow("SELECT last_seq, playlist_version FROM groups WHERE id = $1", group)
    if row is None:
        raise ProtocolError("not_found", f"no such group '{group}'")
    return row["last_seq"], row["playlist_version"]


class SongIn(BaseModel):
    """A song as a client adds it."""

    model_config = ConfigDict(strict=True, extra="ignore")
    title: Annotated[str, Field(min_length=1, max_length=300)]
    artist: Annotated[str, Field(min_length=1, max_length=300)]
    url: Annotated[str, Field(max_length=2000)] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(orjson.dumps(value)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
        return value


class BulkSongsIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    songs: Annotated[list[SongIn], Field(min_length=1, max_length=MAX_BULK)]


def song_object(r: asyncpg.Record) -> dict[str, Any]:
    return {
        "id": r["id"],
        "title": r["title"],
        "artist": r["artist"],
        "url": r["url"],
        "added_by": r["added_by"],
        "added_at": events.iso(r["added_at"]),
        "metadata": r["metadata"],
        "category": r["category"],
        "position": r["position"],
        "analysis": r["analysis"],
    }


async def playlist(pool: asyncpg.Pool, group: str, category: str | None) -> dict[str, Any]:
    """The playlist in its sorted order; unplaced songs follow in the order they were added."""
    async with (
        pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        version = await conn.fetchval("SELECT playlist_version FROM groups WHERE id = $1", group)
        rows = await conn.fetch(
            "SELECT * FROM songs WHERE group_id = $1 ORDER BY position NULLS LAST, added_at, id",
            group,
        )
    cats: dict[str, list[str]] = {}
    for r in rows:
        if r["category"] is not None:
            cats.setdefault(r["category"], []).append(r["id"])
    songs = [song_object(r) for r in rows if category is None or r["category"] == category]
    return {
        "version": version,
        "categories": [{"name": n, "songs": ids} for n, ids in cats.items()],
        "songs": songs,
    }


async def add_songs(
    pool: asyncpg.Pool, group: str, user: str, songs: Sequence[SongIn]
) -> tuple[list[dict[str, Any]], list[Event]]:
    """Insert songs and announce them with one playlist.updated event."""
    ids = [f"s_{uuid.uuid4().hex[:16]}" for _ in songs]
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        version = await conn.fetchval(
            "UPDATE groups SET playlist_version = playlist_version + 1 WHERE id = $1"
            " RETURNING playlist_version",
            group,
        )
        rows = await conn.fetch(
            "INSERT INTO songs (id, group_id, title, artist, url, added_by, metadata)"
            " SELECT v.id, $1, v.title, v.artist, v.url, $2, v.metadata"
            " FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::jsonb[])"
            "   WITH ORDINALITY AS v(id, title, artist, url, metadata, n)"
            " ORDER BY v.n RETURNING *",
            group,
            user,
            ids,
            [s.title for s in songs],
            [s.artist for s in songs],
            [s.url for s in songs],
            [s.metadata for s in songs],
        )
        fields: dict[str, Any] = {"version": version, "change": "song_added"}
        if len(ids) == 1:
            fields["song"] = ids[0]
        else:
            fields["songs"] = ids
        ev = await events.append(conn, group, "playlist.updated", **fields)
    by_id = {r["id"]: r for r in rows}
    return [song_object(by_id[i]) for i in ids], [ev]


async def remove_song(pool: asyncpg.Pool, group: str, song: str) -> list[Event]:
    async with pool.acquire(timeout=ACQUIRE_TIMEOUT_S) as conn, conn.transaction():
        version = await conn.fetchval(
            "UPDATE groups SET playlist_version = playlist_version + 1 WHERE id = $1"
            " RETURNING playlist_version",
            group,
        )
        deleted = await conn.fetchval(
            "DELETE FROM songs WHERE id = $1 AND group_id = $2 RETURNING id", song, group
        )
        if deleted is None:
            raise ProtocolError("not_found", "no such song in this group")
        ev = await events.append(
            conn, group, "playlist.updated", version=version, change="song_removed", song=song
        )
    return [ev]
