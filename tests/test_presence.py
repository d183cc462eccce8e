"""Presence across tabs and processes."""

from __future__ import annotations

import aiohttp
import pytest

from .faults import kill9
from .helpers import ServerProcess, free_port, open_member, python_server, server_env


async def test_joined_and_left_fire_on_first_and_last_socket_not_per_tab(connect, make_group):
    group, _ = await make_group(["nia", "ola"])
    watcher = await connect("nia")
    await watcher.request("join", group=group)
    tab1, tab2 = await connect("ola"), await connect("ola")
    await tab1.request("join", group=group)
    await tab2.request("join", group=group)
    await tab1.request("leave", group=group)
    await tab2.request("leave", group=group)
    await watcher.request("ping")  # the presence frames of ola came before this reply
    seen = [f for f in watcher.frames if f["type"].startswith("presence.") and f["user"] == "ola"]
    assert [f["type"] for f in seen] == ["presence.joined", "presence.left"]


@pytest.mark.slow
async def test_members_of_a_killed_web_process_drop_out(tmp_path, backends, make_group):
    group, _ = await make_group(["pam", "quy"])
    env = server_env(
        backends.database_url, backends.redis_url, tmp_path, SMARTSORT_PRESENCE_TTL_S=1.5
    )
    pa, pb = free_port(), free_port()
    doomed = ServerProcess(python_server("serve", "--port", str(pa), "--workers", "0"), env)
    alive = ServerProcess(python_server("serve", "--port", str(pb), "--workers", "0"), env)
    await doomed.start()
    await alive.start()
    try:
        async with aiohttp.ClientSession() as session:
            quy = await open_member(session, pb, "quy", group)
            pam = await open_member(session, pa, "pam", group)
            await quy.until(lambda f: f["type"] == "presence.joined" and f["user"] == "pam")
            kill9(doomed)
            left = await quy.until(lambda f: f["type"] == "presence.left", timeout=20)
            assert left == {"type": "presence.left", "group": group, "user": "pam"}
            joined = await quy.request("join", group=group)
            assert joined["snapshot"]["online"] == ["quy"]
            await pam.close()
            await quy.close()
    finally:
        await doomed.stop()
        await alive.stop()
