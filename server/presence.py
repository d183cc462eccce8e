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

TTL_S = 30.0
REFRESH_S = 10.0


def _name(member: object) -> str:
    return member.decode() if isinstance(member, bytes) else str(member)


def _key(group: str) -> str:
    return f"ss:presence:{group}"


class Presence:
    """Each (user, process) pair is a sorted-set member scored by its expiry time."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.process = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.local: Counter[tuple[str, str]] = Counter()

    def _member(self, user: str) -> str:
        return f"{user}|{self.process}"

    async def online(self, group: str) -> list[str]:
        try:
            members = await self.redis.zrangebyscore(_key(group), time.time(), "+inf")
        except (RedisError, OSError):
            members = []
        users = {_name(m).rpartition("|")[0] for m in members}
        users.update(u for (g, u), n in self.local.items() if g == group and n > 0)
        return sorted(users)

    async def _others(self, group: str, user: str) -> bool:
        members = await self.redis.zrangebyscore(_key(group), time.time(), "+inf")
        mine = self._member(user)
        names = [_name(m) for m in members]
        return any(n.rpartition("|")[0] == user and n != mine for n in names)

    async def enter(self, group: str, user: str) -> None:
        self.local[(group, user)] += 1
        if self.local[(group, user)] > 1:
            return
        try:
            elsewhere = await self._others(group, user)
            await self.redis.zadd(_key(group), {self._member(user): time.time() + TTL_S})
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
            if not await self._others(group, user):
                await events.publish(
                    self.redis, [events.ephemeral(group, "presence.left", user=user)]
                )
        except (RedisError, OSError) as err:
            log.warning("presence update failed: %r", err)

    async def refresh_forever(self) -> None:
        """Keep this process's entries alive and drop everyone's expired ones."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                now = time.time()
                async with self.redis.pipeline(transaction=False) as pipe:
                    for group, user in list(self.local):
                        pipe.zadd(_key(group), {self._member(user): now + TTL_S})
                        pipe.zremrangebyscore(_key(group), "-inf", now)
                    await pipe.execute()
            except (RedisError, OSError) as err:
                log.warning("presence refresh failed: %r", err)


PRESENCE_KEY = web.AppKey("presence", Presence)
