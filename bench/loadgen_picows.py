"""Load generator on picows + uvloop (C-speed WebSocket frames): the same command-line and stdin
protocol as bench/loadgen.mjs (see there), several times cheaper per received message, so the
generator is less of what gets measured. bench/fanout.py runs one per core and merges them.

    python -m bench.loadgen_picows --proto smartsort|socketio --urls U1,U2 --n 1000 --group G
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from array import array

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

MARK = b'"bench_t":'


class Stats:
    def __init__(self, n: int) -> None:
        self.n = n
        self.reset()

    def reset(self) -> None:
        self.latencies = array("d")
        self.counts = [0] * self.n
        self.received = 0
        self.first: dict[float, float] = {}  # per event: the first and the last socket's latency
        self.last: dict[float, float] = {}


def sent_at(payload: bytes) -> float | None:
    k = payload.find(MARK)
    if k < 0:
        return None
    k += len(MARK)
    end = k
    while payload[end] not in b",}]":
        end += 1
    return float(payload[k:end])


class Member(WSListener):  # type: ignore[misc]
    def __init__(self, i: int, proto: str, group: str, stats: Stats, ready: asyncio.Future) -> None:
        self.i, self.proto, self.group, self.stats, self.ready = i, proto, group, stats, ready

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.proto == "smartsort":
            join = {"type": "join", "group": self.group, "ref": "j"}
            transport.send(WSMsgType.TEXT, json.dumps(join).encode())

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()
            if not self.ready.done():
                self.ready.set_result(False)
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        payload = frame.get_payload_as_bytes()
        t = sent_at(payload)
        if t is not None:
            stats = self.stats
            latency = time.time() * 1000 - t
            stats.latencies.append(latency)
            stats.first.setdefault(t, latency)
            stats.last[t] = latency
            stats.counts[self.i] += 1
            stats.received += 1
            return
        if self.proto == "smartsort":
            if b'"ref":"j"' in payload and not self.ready.done():
                self.ready.set_result(payload.startswith(b'{"type":"joined"'))
        elif payload == b"2":
            transport.send(WSMsgType.TEXT, b"3")
        elif payload[:1] == b"0":
            transport.send(WSMsgType.TEXT, b"40")
        elif payload[:2] == b"40":
            transport.send(WSMsgType.TEXT, b"421" + json.dumps(["join", self.group]).encode())
        elif payload[:3] == b"431" and not self.ready.done():
            self.ready.set_result(True)


def _factory(cls: type, *args: object) -> object:
    return lambda: cls(*args)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proto", default="smartsort")
    parser.add_argument("--urls", required=True)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--group", required=True)
    args = parser.parse_args()
    urls = args.urls.split(",")
    stats = Stats(args.n)
    loop = asyncio.get_running_loop()
    transports = []
    joined = failed = 0
    batch = 200
    for start in range(0, args.n, batch):
        futures = []
        for i in range(start, min(args.n, start + batch)):
            ready: asyncio.Future[bool] = loop.create_future()
            futures.append(ready)

            # A factory of no arguments (picows passes the upgrade to one that takes two).
            factory = _factory(Member, i, args.proto, args.group, stats, ready)
            transport, _ = await ws_connect(factory, urls[i % len(urls)])
            transports.append(transport)
        for ok in await asyncio.gather(*futures):
            joined += ok
            failed += not ok
    print(json.dumps({"ready": True, "joined": joined, "failed": failed}), flush=True)

    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cpu0, t0 = cpu_s(), time.perf_counter()
    while line := (await reader.readline()).decode().split():
        cmd = line[0]
        if cmd == "reset":
            stats.reset()
            cpu0, t0 = cpu_s(), time.perf_counter()
            print(json.dumps({"reset": True}), flush=True)
        elif cmd == "report":
            # report <events> <path>: raw samples for bench/fanout.py to merge across generators
            # (latencies as float64s in <path>, first and last per event as pairs).
            events, path = int(line[1]), line[2]
            deadline = time.monotonic() + 10
            while stats.received < events * args.n and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            with open(path, "wb") as f:
                stats.latencies.tofile(f)
            out = {
                "deliveries": stats.received,
                "lost": sum(max(0, events - c) for c in stats.counts),
                "first": list(stats.first.items()),
                "last": list(stats.last.items()),
                "generator_cpu_s": round(cpu_s() - cpu0, 3),
                "wall_s": round(time.perf_counter() - t0, 3),
            }
            print(json.dumps(out), flush=True)
        elif cmd == "quit":
            break
    for t in transports:
        t.disconnect()


if __name__ == "__main__":
    uvloop.run(main())
