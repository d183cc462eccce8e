"""Metadata providers: what the metadata stage knows about a song beyond what is stored."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

import aiohttp

from .sort import SongInput

log = logging.getLogger(__name__)

USER_AGENT = "SmartSortLive/0.1 ( https://github.com/smartsort-live/smartsort-live )"


class MetadataProvider(Protocol):
    name: str

    async def lookup(self, song: SongInput) -> dict[str, Any] | None: ...

    async def close(self) -> None: ...


class StoredMetadata:
    """The default: the metadata saved with each song is all there is."""

    name = "stored"

    async def lookup(self, song: SongInput) -> dict[str, Any] | None:
        return None

    async def close(self) -> None:
        return None


class MusicBrainz:
    """The MusicBrainz web service (no key). Obeys its rule of one request a second per client
    and identifies itself with a descriptive User-Agent."""

    name = "musicbrainz"

    def __init__(
        self, base_url: str = "https://musicbrainz.org", min_interval_s: float = 1.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.min_interval_s = min_interval_s
        self.lock = asyncio.Lock()
        self.last_call = 0.0
        self.session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def lookup(self, song: SongInput) -> dict[str, Any] | None:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=15),
            )
        query = f'recording:"{_escape(song.title)}" AND artist:"{_escape(song.artist)}"'
        for attempt in range(2):
            async with self.lock:  # one request a second, across every job of this process
                wait = self.last_call + self.min_interval_s - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                self.last_call = time.monotonic()
                try:
                    async with self.session.get(
                        f"{self.base_url}/ws/2/recording",
                        params={"query": query, "fmt": "json", "limit": "1"},
                    ) as resp:
                        if resp.status == 503 and attempt == 0:
                            continue  # MusicBrainz's "slow down": wait our second and retry once
                        if resp.status != 200:
                            log.info("MusicBrainz answered %d for %r", resp.status, song.title)
                            return None
                        data = await resp.json()
                except (aiohttp.ClientError, TimeoutError) as err:
                    log.info("MusicBrainz lookup failed: %r", err)
                    return None
            return parse_recording(data)
        return None


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def parse_recording(data: Any) -> dict[str, Any] | None:
    """Year, genre (the most-voted tag) and duration from a recording search answer."""
    recordings = data.get("recordings") if isinstance(data, dict) else None
    if not recordings:
        return None
    rec = recordings[0]
    out: dict[str, Any] = {"mbid": rec.get("id")}
    date = rec.get("first-release-date") or ""
    if len(date) >= 4 and date[:4].isdigit():
        out["year"] = int(date[:4])
    tags = sorted(rec.get("tags") or [], key=lambda t: -int(t.get("count") or 0))
    if tags and tags[0].get("name"):
        out["genre"] = str(tags[0]["name"])
    if isinstance(rec.get("length"), int):
        out["duration_s"] = round(rec["length"] / 1000)
    return out
