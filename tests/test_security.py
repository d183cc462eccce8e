"""The edge: authentication on every route and frame, limits, raw malformed frames."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct

import aiohttp
import jwt
import orjson
import pytest

from .conftest import SECRET, auth, token
from .faults import parse_frames, raw_ws, read_until_closed

pytestmark = pytest.mark.workers(0)


def tampered(user: str) -> str:
    head, payload, sig = token(user).split(".")
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["sub"] = "mallory-wants-in"
    forged = base64.urlsafe_b64encode(orjson.dumps(claims)).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


BAD_TOKENS = {
    "none": None,
    "garbage": "not.a.token",
    "tampered": tampered("alice"),
    "expired": token("alice", ttl_s=-3600),
    "alg_none": jwt.encode({"sub": "alice", "exp": 4_000_000_000}, None, algorithm="none"),
    "other_alg": jwt.encode(
        {"sub": "alice", "exp": 4_000_000_000},
        SECRET + "-but-longer-for-hs512-0123456789abcdef0123456789",
        algorithm="HS512",
    ),
    "no_sub": jwt.encode({"exp": 4_000_000_000}, SECRET, algorithm="HS256"),
    "no_exp": jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
}


async def routes(client, make_group):
    group, songs = await make_group(["sec1"], songs=2)
    job = (
        await (await client.post(f"/api/groups/{group}/smart-sort", headers=auth("sec1"))).json()
    )["job"]["id"]
    return group, [
        ("POST", f"/api/groups/{group}/smart-sort"),
        ("GET", f"/api/jobs/{job}"),
        ("POST", f"/api/jobs/{job}/cancel"),
        ("GET", f"/api/groups/{group}/jobs"),
        ("GET", f"/api/groups/{group}/events"),
        ("GET", f"/api/groups/{group}/playlist"),
        ("POST", f"/api/groups/{group}/songs"),
        ("DELETE", f"/api/groups/{group}/songs/{songs[0]}"),
    ]


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
async def test_every_route_and_the_socket_refuse_bad_tokens(client, make_group, kind):
    group, table = await routes(client, make_group)
    bad = BAD_TOKENS[kind]
    headers = {"Authorization": f"Bearer {bad}"} if bad else {}
    for method, path in table:
        resp = await client.request(
            method, path, headers=headers, json={"title": "t", "artist": "a"}
        )
        body = await resp.json()
        assert (resp.status, body["code"], body["success"]) == (401, "unauthorized", False), (
            method,
            path,
        )
        assert group not in body["error"]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws?token={bad}" if bad else "/ws")
    assert info.value.status == 401


async def test_another_groups_member_gets_nothing_on_any_route_or_frame(
    client, make_group, connect
):
    group, table = await routes(client, make_group)
    await make_group(["outsider"])
    for method, path in table:
        resp = await client.request(
            method, path, headers=auth("outsider"), json={"title": "t", "artist": "a"}
        )
        body = await resp.json()
        assert resp.status in (403, 404) and body["code"] in ("forbidden", "not_found"), (
            method,
            path,
        )
        assert "job" not in body and "songs" not in body
    job = table[1][1].rsplit("/", 1)[1]
    s = await connect("outsider")
    for kind, fields in [
        ("join", {"group": group}),
        ("sort", {"group": group}),
        ("leave", {"group": group}),
        ("job.get", {"job": job}),
        ("cancel", {"job": job}),
    ]:
        reply = await s.request(kind, **fields)
        if kind == "leave":
            assert reply["type"] == "left"  # leaving a group you are not in changes nothing
        else:
            assert reply["type"] == "error" and reply["code"] in ("forbidden", "not_found")
    assert all("snapshot" not in f and f.get("type") != "job" for f in s.frames)


async def test_sorts_are_limited_per_user(aiohttp_client, app_factory, make_group):
    client = await aiohttp_client(app_factory(workers=0, sorts_per_minute=3))
    group, _ = await make_group(["lim"])
    ws = await client.ws_connect(f"/ws?token={token('lim')}")
    await ws.receive_json()
    replies = []
    for i in range(4):
        await ws.send_json({"type": "sort", "group": group, "ref": str(i)})
        replies.append(await ws.receive_json())
    assert [r["type"] for r in replies] == ["sort.accepted"] * 3 + ["error"]
    assert replies[3]["code"] == "rate_limited" and 0 < replies[3]["retry_after_s"] <= 60
    resp = await client.post(f"/api/groups/{group}/smart-sort", headers=auth("lim"))
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["code"] == "rate_limited"
    await ws.close()


async def test_connections_per_user_are_capped(aiohttp_client, app_factory):
    client = await aiohttp_client(app_factory(workers=0, max_connections_per_user=2))
    open_ = [await client.ws_connect(f"/ws?token={token('cap')}") for _ in range(2)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await client.ws_connect(f"/ws?token={token('cap')}")
    assert info.value.status == 429
    await open_[0].close()
    async with asyncio.timeout(10):  # the server frees the slot once its handler has finished
        while True:
            try:
                again = await client.ws_connect(f"/ws?token={token('cap')}")
                break
            except aiohttp.WSServerHandshakeError:
                await asyncio.sleep(0.01)
    assert (await again.receive_json())["type"] == "hello"
    for ws in (again, open_[1]):
        await ws.close()


async def test_an_idle_socket_without_a_group_is_closed(aiohttp_client, app_factory, make_group):
    client = await aiohttp_client(app_factory(workers=0, idle_timeout_s=0.5))
    group, _ = await make_group(["idl"])
    member = await client.ws_connect(f"/ws?token={token('idl')}&group={group}")
    idle = await client.ws_connect(f"/ws?token={token('idl')}")
    await idle.receive_json()
    closed = await idle.receive(timeout=10)
    while closed.type == aiohttp.WSMsgType.TEXT:
        closed = await idle.receive(timeout=10)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1008
    await member.send_json({"type": "ping", "ref": "p"})
    frames = [await member.receive_json() for _ in range(4)]
    assert {"type": "pong", "ref": "p"} in frames  # the joined socket is still served
    await member.close()


async def test_song_limits(client, make_group):
    group, _ = await make_group(["lm"])
    for body in (
        {"title": "x" * 301, "artist": "a"},
        {"title": "t", "artist": ""},
        {"title": "t", "artist": "a", "metadata": {"blob": "y" * 5000}},
        {"title": "t", "artist": "a", "url": "u" * 2001},
    ):
        resp = await client.post(f"/api/groups/{group}/songs", headers=auth("lm"), json=body)
        assert resp.status == 400, body
        assert len((await resp.json())["error"]) <= 200


def _frame(opcode: int, payload: bytes, mask: bool = True, rsv: int = 0, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    bit = 0x80 if mask else 0
    head = bytes([first, bit | n]) if n < 126 else bytes([first, bit | 126]) + struct.pack("!H", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def _send_oversized_then_read_to_the_end(sock: socket.socket) -> tuple[bytes, str]:
    """Send a 70,000-byte text frame and 4 MiB more, as a client mid-upload does; then read to
    the end. Returns what came back and how the stream ended."""
    n = 70_000
    sock.sendall(bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big") + os.urandom(4) + b"x" * n)
    try:
        for _ in range(16):
            sock.sendall(b"y" * 262_144)
    except (BrokenPipeError, ConnectionResetError) as err:
        return b"", f"reset while sending ({err!r})"
    received = b""
    try:
        while chunk := sock.recv(65_536):
            received += chunk
    except ConnectionResetError as err:
        return received, f"reset while reading ({err!r})"
    return received, "end of stream"


async def test_an_oversized_frame_ends_in_1009_and_end_of_stream_not_a_reset(client):
    """aiohttp closes right after its close frame; closing a socket with unread bytes makes the
    kernel send a reset, and a client still sending then loses the 1009. We keep reading (and
    dropping) until the peer is done, so the close frame and an orderly end always arrive."""
    loop = asyncio.get_running_loop()
    sock, rest = await loop.run_in_executor(
        None, raw_ws, client.server.port, f"/ws?token={token('big')}"
    )
    try:
        received, ending = await loop.run_in_executor(
            None, _send_oversized_then_read_to_the_end, sock
        )
    finally:
        sock.close()
    assert ending == "end of stream"
    frames, _ = parse_frames(rest + received)
    close = [p for op, p in frames if op == 0x8]
    assert close and int.from_bytes(close[0][:2], "big") == 1009


@pytest.mark.parametrize(
    ("name", "data", "close_code"),
    [
        ("reserved bits", _frame(1, b'{"type":"ping"}', rsv=0x40), 1002),
        ("control frame over 125 bytes", _frame(9, b"x" * 200), 1002),
        ("fragmented control frame", _frame(9, b"x", fin=False), 1002),
        ("unknown opcode", _frame(3, b"x"), 1002),
        # Documented deviations: aiohttp accepts unmasked client frames, and we read text frames
        # as bytes, so invalid UTF-8 is a bad_request error frame rather than close 1007.
        ("unmasked frame", _frame(1, b'{"type":"ping","ref":"u"}', mask=False), None),
        ("invalid UTF-8", _frame(1, b'{"type":"\xff\xfe","ref":"x"}'), None),
    ],
)
async def test_raw_malformed_frames(client, name, data, close_code):
    loop = asyncio.get_running_loop()
    port = client.server.port
    sock, rest = await loop.run_in_executor(None, raw_ws, port, f"/ws?token={token('raw')}")
    sock.settimeout(5)
    sock.sendall(data)
    if close_code is None:
        sock.sendall(_frame(1, b'{"type":"ping","ref":"after"}'))
        buf = rest
        while True:
            frames, _ = parse_frames(buf)
            texts = [orjson.loads(p) for op, p in frames if op == 1]
            if any(t.get("ref") == "after" for t in texts):
                break
            buf += await loop.run_in_executor(None, sock.recv, 65536)
        if name == "invalid UTF-8":
            assert {
                "type": "error",
                "code": "bad_request",
                "message": "frame is not valid JSON",
            } in texts
        else:
            assert {"type": "pong", "ref": "u"} in texts
    else:
        frames = await loop.run_in_executor(None, read_until_closed, sock, rest)
        close = [p for op, p in frames if op == 0x8]
        assert close and int.from_bytes(close[0][:2], "big") == close_code
    sock.close()
    assert (await client.get("/healthz")).status == 200
