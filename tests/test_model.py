"""A stateful model test: members of two groups join, leave, reconnect with since, sort and cancel
against a real server process; every member's stream stays gap-free and every job ends once.

SMARTSORT_MODEL_EXAMPLES raises the number of generated scenarios."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from server import db, demo

from .conftest import auth, token
from .helpers import ServerProcess, Socket, free_port, python_server, server_env

pytestmark = pytest.mark.slow
EXAMPLES = int(os.environ.get("SMARTSORT_MODEL_EXAMPLES", "6"))
END = ("job.completed", "job.failed", "job.cancelled")


class World:
    """The server process and the two groups every scenario plays in."""

    def __init__(self, backends: Any, tmp: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.dsn = backends.database_url
        self.port = free_port()
        env = server_env(
            backends.database_url,
            backends.redis_url,
            tmp,
            SMARTSORT_MESSAGES_PER_SECOND=100000,
            SMARTSORT_SORTS_PER_MINUTE=100000,
            SMARTSORT_PROGRESS_INTERVAL_S=0,
            SMARTSORT_STEP_DELAY_S=0.02,
            SMARTSORT_ANALYSIS_BATCH_SIZE=2,
        )
        self.server = ServerProcess(
            python_server("serve", "--port", str(self.port), "--workers", "2"), env
        )
        self.run(self.server.start())
        self.session = self.run(self._session())

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.session.close())
        assert self.run(self.server.stop()) == 0
        self.loop.close()


WORLD: World | None = None


class Scenario(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert WORLD is not None
        self.w = WORLD
        tag = uuid.uuid4().hex[:6]
        self.groups = {"A": f"ma-{tag}", "B": f"mb-{tag}"}
        self.members = {f"a1-{tag}": "A", f"a2-{tag}": "A", f"b1-{tag}": "B", f"b2-{tag}": "B"}
        self.w.run(self._create())
        self.sockets: dict[str, Socket] = {}
        self.joined: dict[str, set[str]] = {m: set() for m in self.members}
        # Per (member, group): durable seqs seen, split into segments at every fresh join.
        self.segments: dict[tuple[str, str], list[list[int]]] = {}
        self.jobs: set[str] = set()

    async def _create(self) -> None:
        pool = await db.create_pool(self.w.dsn, min_size=1, max_size=1)
        for key, gid in self.groups.items():
            await demo.create_group(pool, gid, [m for m, g in self.members.items() if g == key], 6)
        await pool.close()

    # -- helpers -------------------------------------------------------------------------------

    def _url(self, member: str) -> str:
        return f"http://127.0.0.1:{self.w.port}/ws?token={token(member)}"

    def _socket(self, member: str) -> Socket:
        if member not in self.sockets:
            ws = self.w.run(self.w.session.ws_connect(self._url(member)))
            s = Socket(ws)
            self.w.run(s.until(lambda f: f["type"] == "hello"))
            self.sockets[member] = s
        return self.sockets[member]

    def _collect(self, member: str) -> None:
        """Drain the socket (a ping round trip) and file its durable frames into segments."""
        s = self.sockets.get(member)
        if s is None:
            return
        self.w.run(s.request("ping"))
        self._file(member, s.pending)
        s.pending.clear()

    def _file(self, member: str, frames: list[dict[str, Any]]) -> None:
        for frame in frames:
            if "seq" in frame and frame["type"] != "joined":
                assert frame["group"] == self.groups[self.members[member]], frame
                self.segments.setdefault((member, frame["group"]), [[]])[-1].append(frame["seq"])

    def _join(self, member: str, group: str, since: int | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"group": group}
        if since is not None:
            fields["since"] = since
        sock = self._socket(member)
        reply = self.w.run(sock.request("join", **fields))
        if reply["type"] == "joined" and (since is None or not reply["recovered"]):
            # Frames that arrived before `joined` end the previous segment.
            at = next(i for i, f in enumerate(sock.frames) if f is reply)
            earlier = [f for f in sock.pending if any(f is g for g in sock.frames[:at])]
            self._file(member, earlier)
            sock.pending = [f for f in sock.pending if not any(f is g for g in earlier)]
            self.segments.setdefault((member, group), []).append([])
        return reply

    # -- rules ---------------------------------------------------------------------------------

    @rule(member=st.sampled_from(range(4)), which=st.sampled_from(["A", "B"]))
    def join(self, member: int, which: str) -> None:
        name = list(self.members)[member]
        self._collect(name)
        reply = self._join(name, self.groups[which], None)
        if self.members[name] == which:
            assert reply["type"] == "joined" and reply["recovered"] is True
            self.joined[name].add(which)
        else:
            assert reply["type"] == "error" and reply["code"] == "forbidden"

    @rule(member=st.sampled_from(range(4)))
    def leave(self, member: int) -> None:
        name = list(self.members)[member]
        own = self.members[name]
        self._collect(name)
        reply = self.w.run(self._socket(name).request("leave", group=self.groups[own]))
        assert reply["type"] == "left"
        self.joined[name].discard(own)

    @rule(member=st.sampled_from(range(4)))
    def reconnect_with_since(self, member: int) -> None:
        name = list(self.members)[member]
        own = self.members[name]
        self._collect(name)
        if name in self.sockets:
            self.w.run(self.sockets.pop(name).close())
        if own in self.joined[name]:
            seen = self.segments.get((name, self.groups[own]), [[]])[-1]
            since = seen[-1] if seen else None
            reply = self._join(name, self.groups[own], since)
            assert reply["type"] == "joined" and reply["recovered"] is True

    @rule(member=st.sampled_from(range(4)), which=st.sampled_from(["A", "B"]))
    def sort(self, member: int, which: str) -> None:
        name = list(self.members)[member]
        reply = self.w.run(self._socket(name).request("sort", group=self.groups[which]))
        if self.members[name] == which:
            assert reply["type"] == "sort.accepted"
            self.jobs.add(reply["job"]["id"])
        else:
            assert reply["code"] == "forbidden"

    @rule(member=st.sampled_from(range(4)), pick=st.integers(min_value=0, max_value=50))
    def cancel(self, member: int, pick: int) -> None:
        if not self.jobs:
            return
        name = list(self.members)[member]
        job = sorted(self.jobs)[pick % len(self.jobs)]
        reply = self.w.run(self._socket(name).request("cancel", job=job))
        assert reply["type"] == "cancel.accepted" or reply["code"] in ("conflict", "not_found")

    @invariant()
    def streams_are_gap_free(self) -> None:
        for member in self.sockets:
            self._collect(member)
        for key, segments in self.segments.items():
            for seqs in segments:
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True, (
                    key,
                    seqs,
                )

    def teardown(self) -> None:
        self.w.run(self._settle())
        for s in self.sockets.values():
            self.w.run(s.close())

    async def _settle(self) -> None:
        """Wait for every job to end, then check each ended exactly once in the log."""
        pollers = {g: m for m, g in self.members.items()}  # one member of each group
        async with asyncio.timeout(60):
            for job in self.jobs:
                while True:
                    for member in pollers.values():
                        resp = await self.w.session.get(
                            f"http://127.0.0.1:{self.w.port}/api/jobs/{job}", headers=auth(member)
                        )
                        if resp.status == 200:
                            status = (await resp.json())["status"]
                            break
                    if status in ("completed", "failed", "cancelled"):
                        break
                    await asyncio.sleep(0.05)
        conn = await asyncpg.connect(self.w.dsn)
        try:
            rows = await conn.fetch(
                "SELECT data FROM group_events"
                " WHERE group_id = ANY($1::text[]) AND type = ANY($2::text[])",
                list(self.groups.values()),
                list(END),
            )
        finally:
            await conn.close()
        ends = Counter(orjson.loads(r["data"])["job"]["id"] for r in rows)
        assert ends == Counter(self.jobs), (ends, self.jobs)


@pytest.fixture(scope="module")
def world(backends: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    global WORLD
    WORLD = World(backends, tmp_path_factory.mktemp("model"))
    yield WORLD
    WORLD.close()
    log = "".join(WORLD.server.output)
    WORLD = None
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_members_streams_stay_gap_free_and_jobs_end_once(world: World) -> None:
    run_state_machine_as_test(
        Scenario,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
