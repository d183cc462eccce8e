"""The socket contract: every frame type and every error code, on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from server.protocol import CLOSE_TOKEN_EXPIRED

from .conftest import token


async def test_hello_carries_user_protocol_and_limits(client, connect):
    ws = await client.ws_connect(f"/ws?token={token('alice')}")
    hello = await ws.receive_json()
    assert hello == {
        "type": "hello",
        "user": "alice",
        "protocol": 1,
        "heartbeat_s": 25.0,
        "limits": {"max_message_bytes": 65536, "messages_per_second": 20.0},
    }
    await ws.close()


async def test_bearer_header_authenticates(client):
    ws = await client.ws_connect("/ws", headers={"Authorization": f"Bearer {token('bob')}"})
    assert (await ws.receive_json())["user"] == "bob"
    await ws.close()


@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("", "missing token"),
        ("?token=nonsense", "invalid token"),
        (f"?token={token('alice', ttl_s=-60)}", "token expired"),
    ],
)
async def test_bad_tokens_are_refused_before_the_upgrade(client, query, why):
    resp = await client.get(
        f"/ws{query}",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        },
    )
    assert resp.status == 401
    body = await resp.json()
    assert body["success"] is False and body["code"] == "unauthorized" and why in body["error"]


async def test_token_signed_with_another_secret_or_alg_none_is_refused(client):
    import jwt

    forged = jwt.encode(
        {"sub": "alice", "exp": 4_000_000_000},
        "another-secret-of-the-right-length-0123456789",
        algorithm="HS256",
    )
    unsigned = jwt.encode({"sub": "alice", "exp": 4_000_000_000}, None, algorithm="none")
    for t in (forged, unsigned):
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await client.ws_connect(f"/ws?token={t}")
        assert info.value.status == 401


async def test_foreign_browser_origin_is_refused_with_403(client):
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws?token={token('alice')}", origin="https://evil.example")
    assert info.value.status == 403
    ws = await client.ws_connect(f"/ws?token={token('alice')}", origin="http://localhost:3000")
    assert (await ws.receive_json())["type"] == "hello"
    await ws.close()


async def test_only_frames_with_a_ref_get_a_reply(connect, make_group):
    group, _ = await make_group(["pia"])
    s = await connect("pia")
    await s.send({"type": "ping"})
    await s.send({"type": "leave", "group": group})
    await s.send({"type": "ping", "ref": "after"})
    # The frames without ref got nothing back: the next frame is the reply to "after".
    assert await s.recv() == {"type": "pong", "ref": "after"}


async def test_join_leave_and_snapshot(connect, make_group):
    group, _ = await make_group(["m1", "m2"])
    a = await connect("m1")
    joined = await a.request("join", group=group)
    assert joined["group"] == group and joined["seq"] == 0 and joined["recovered"] is True
    assert joined["snapshot"] == {"job": None, "online": ["m1"], "playlist_version": 0}
    b = await connect("m2")
    await b.request("join", group=group)
    presence = await a.until(lambda f: f["type"].startswith("presence.") and f["user"] == "m2")
    assert presence == {"type": "presence.joined", "group": group, "user": "m2"}
    left = await b.request("leave", group=group)
    assert left == {"type": "left", "ref": left["ref"], "group": group}
    assert await a.until(lambda f: f["type"] == "presence.left") == {
        "type": "presence.left",
        "group": group,
        "user": "m2",
    }


async def test_join_by_query_string(client, make_group):
    group, _ = await make_group(["q1"])
    ws = await client.ws_connect(f"/ws?token={token('q1')}&group={group}")
    assert (await ws.receive_json())["type"] == "hello"
    joined = await ws.receive_json()
    assert joined["type"] == "joined" and joined["group"] == group and "ref" not in joined
    await ws.close()


@pytest.mark.workers(0)
async def test_sort_cancel_and_job_get(connect, make_group):
    # No worker anywhere: the job stays queued, so cancelling it is deterministic.
    group, _ = await make_group(["c1", "c2"])
    s = await connect("c1")
    await s.request("join", group=group)
    acc = await s.request("sort", group=group, options={"mood": "any"})
    assert acc["type"] == "sort.accepted" and acc["deduplicated"] is False
    job = acc["job"]
    assert job["status"] == "queued" and job["requested_by"] == "c1" and job["group"] == group
    queued = await s.until(lambda f: f["type"] == "job.queued")
    assert queued["job"]["id"] == job["id"] and queued["seq"] == 1
    got = await s.request("job.get", job=job["id"])
    assert got["type"] == "job" and got["job"]["id"] == job["id"]
    other = await connect("c2")
    cancelled = await other.request("cancel", job=job["id"])
    assert cancelled["type"] == "cancel.accepted" and cancelled["job"]["status"] == "cancelled"
    ev = await s.until(lambda f: f["type"] == "job.cancelled")
    assert ev["by"] == "c2" and ev["job"]["status"] == "cancelled" and ev["seq"] == 2
    again = await other.request("cancel", job=job["id"])
    assert again["type"] == "error" and again["code"] == "conflict"


async def test_error_codes(connect, make_group, pool):
    group, _ = await make_group(["e1"])
    s = await connect("e1")
    await s.send("{nope")
    assert (await s.recv()) == {
        "type": "error",
        "code": "bad_request",
        "message": "frame is not valid JSON",
    }
    await s.send({"type": "teleport", "ref": "x"})
    assert (await s.recv())["code"] == "unknown_type"
    await s.send({"type": "join", "ref": 7})
    err = await s.recv()
    assert err["code"] == "bad_request" and "ref" not in err
    assert (await s.request("join", group="no-such-group"))["code"] == "not_found"
    assert (await s.request("join", group="demo-night"))["code"] == "not_found"
    await pool.execute(
        "INSERT INTO groups (id, name) VALUES ('closed-club', 'x') ON CONFLICT DO NOTHING"
    )
    assert (await s.request("join", group="closed-club"))["code"] == "forbidden"
    assert (await s.request("sort", group="closed-club"))["code"] == "forbidden"
    assert (await s.request("job.get", job="00000000-0000-0000-0000-000000000000"))[
        "code"
    ] == "not_found"
    assert (await s.request("cancel", job="not-a-uuid"))["code"] == "not_found"
    await s.ws.send_bytes(b"\x00\x01")
    assert (await s.recv())["code"] == "bad_request"
    # The socket is still open after all of that.
    assert (await s.request("ping"))["type"] == "pong"


async def test_rate_limit_answers_rate_limited_then_recovers(connect):
    s = await connect("rl")
    for i in range(40):
        await s.send({"type": "ping", "ref": str(i)})
    frames = [await s.recv() for _ in range(40)]
    assert sorted(int(f["ref"]) for f in frames) == list(range(40))
    limited = [f for f in frames if f["type"] == "error"]
    assert limited and all(f["code"] == "rate_limited" and f["retry_after_s"] > 0 for f in limited)
    await asyncio.sleep(limited[-1]["retry_after_s"] + 0.05)  # a token refills after this long
    assert (await s.request("ping"))["type"] == "pong"


async def test_frame_over_the_limit_closes_with_1009(connect):
    s = await connect("big")
    await s.ws.send_str('{"type":"ping","pad":"' + "x" * 70000 + '"}')
    msg = await s.ws.receive()
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009


async def test_expired_token_closes_the_socket_with_4401(client):
    ws = await client.ws_connect(f"/ws?token={token('brief', ttl_s=1)}")
    assert (await ws.receive_json())["type"] == "hello"
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == CLOSE_TOKEN_EXPIRED


async def test_unavailable_when_redis_is_unreachable(
    aiohttp_client, app_factory, make_group, tmp_path
):
    group, _ = await make_group(["u1"])
    app = app_factory(workers=0, redis_url=f"unix://{tmp_path}/nothing-here.sock")
    c = await aiohttp_client(app)
    ws = await c.ws_connect(f"/ws?token={token('u1')}")
    await ws.receive_json()
    await ws.send_json({"type": "join", "group": group, "ref": "j"})
    err = await ws.receive_json(timeout=30)
    assert err == {
        "type": "error",
        "ref": "j",
        "code": "unavailable",
        "message": "live updates are unavailable; retry",
    }
    await ws.close()
