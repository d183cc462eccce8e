"""Who is online in a group, across every process, with entries that expire if a process dies."""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import Counter

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from . import events

log = logging.getLogger(__name__)


def _name(member: object) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)


def _key(group: str) -> str:
    return f"ss:presence:{group}"


class Presence:
    """Each (user, process) pair is a sorted-set member scored by its expiry time.

    A process renews its own members every ttl/3. Members of a process that died expire; the
    first process to remove an expired member announces ``presence.left`` if that was the user's
    last entry. ``presence.joined``/``left`` fire on a user's first/last socket, not per tab.
    """

    def __init__(self, redis: aioredis.Redis, ttl_s: float = 30.0) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.process = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.local: Counter[tuple[str, str]] = Counter()

    def _member(self, user: str) -> str:
        return f"{user}|{self.process}"

    async def _live_users(self, group: str) -> list[str]:
        members = await self.redis.zrangebyscore(_key(group), time.time(), "+inf")
        return [_name(m) for m in members]

    async def online(self, group: str) -> list[str]:
        try:
            members = await self._live_users(group)
        except (RedisError, OSError):
            members = []
        users = {m.rpartition("|")[0] for m in members}
        users.update(u for (g, u), n in self.local.items() if g == group and n > 0)
        return sorted(users)

    async def _online_elsewhere(self, group: str, user: str) -> bool:
        mine = self._member(user)
        return any(
            m.rpartition("|")[0] == user and m != mine for m in await self._live_users(group)
        )

    async def enter(self, group: str, user: str) -> None:
        self.local[(group, user)] += 1
        if self.local[(group, user)] > 1:
            return
        try:
            elsewhere = await self._online_elsewhere(group, user)
            await self.redis.zadd(_key(group), {self._member(user): time.time() + self.ttl_s})
            if not elsewhere:
                await events.publish(
                    self.redis, [events.ephemeral(group, "presence.joined", user=user)]
                )
        except (RedisError, OSError) as err:
            log.warning("presence update failed: %r", err)

    async def leave(self, group: str, user: str) -> None:
        key = (group, user)
        self.local[key] -= 1
        if self.local[key] > 0:
            return
        del self.local[key]
        try:
            await self.redis.zrem(_key(group), self._member(user))
            if not await self._online_elsewhere(group, user):
                await events.publish(
                    self.redis, [events.ephemeral(group, "presence.left", user=user)]
                )
        except (RedisError, OSError) as err:
            log.warning("presence update failed: %r", err)

    async def refresh(self) -> None:
        """Renew this process's entries; expire (and announce) those of processes that died."""
        now = time.time()
        groups = {g for g, _ in self.local}
        if not groups:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for group, user in list(self.local):
                pipe.zadd(_key(group), {self._member(user): now + self.ttl_s})
            await pipe.execute()
        for group in groups:
            for member in await self.redis.zrangebyscore(_key(group), "-inf", now):
                # ZREM decides which process announces: only the one that removed it.
                if await self.redis.zrem(_key(group), _name(member)):
                    user = _name(member).rpartition("|")[0]
                    if user not in await self.online(group):
                        await events.publish(
                            self.redis, [events.ephemeral(group, "presence.left", user=user)]
                        )

    async def refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_s / 3)
            try:
                await self.refresh()
            except (RedisError, OSError) as err:
                log.warning("presence refresh failed: %r", err)


PRESENCE_KEY = web.AppKey("presence", Presence)
