"""A fake OpenAI-compatible server (aiohttp) that can be slow, fail, rate-limit and misbehave."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from typing import Any

from aiohttp import web

GENRES = ["pop", "rock", "jazz", "electronic", "folk", "hip-hop", "ambient", "soul"]
MOODS = ["euphoric", "intense", "upbeat", "brooding", "peaceful", "melancholic"]


def fake_analysis(song_id: str, title: str) -> dict[str, Any]:
    """What the fake model says about a song: deterministic, in range."""
    h = hashlib.sha256(f"{song_id}|{title}".encode()).digest()
    return {
        "id": song_id,
        "genre": GENRES[h[0] % len(GENRES)],
        "mood": MOODS[h[1] % len(MOODS)],
        "energy": round(h[2] / 255, 3),
        "valence": round(h[3] / 255, 3),
        "tempo_bpm": float(60 + h[4] % 120),
        "danceability": round(h[5] / 255, 3),
        "confidence": 0.9,
    }


class FakeOpenAI:
    """``script`` lists what the next calls do ("ok", "429", "500", "slow", "malformed",
    "missing", "refusal", "unknown"); when it runs out, every call does ``default``."""

    def __init__(self) -> None:
        self.script: list[str] = []
        self.default = "ok"
        self.latency_s = 0.0
        self.slow_s = 5.0
        self.retry_after_ms = 300
        self.requests: list[dict[str, Any]] = []  # every request body received
        self.asked: list[list[str]] = []  # song ids of each request
        self.times: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.answered = 0  # 200 responses sent
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert request.headers.get("Authorization", "").startswith("Bearer ")
        self.requests.append(body)
        self.times.append(time.monotonic())
        content = body["messages"][-1]["content"]
        songs = json.loads(content.split("\n", 1)[1])["songs"]
        self.asked.append([s["id"] for s in songs])
        mode = self.script.pop(0) if self.script else self.default
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
            if mode == "429":
                return web.json_response(
                    {
                        "error": {
                            "message": "Rate limit reached",
                            "type": "rate_limit_error",
                            "code": "rate_limit_exceeded",
                        }
                    },
                    status=429,
                    headers={"retry-after-ms": str(self.retry_after_ms)},
                )
            if mode == "500":
                return web.json_response(
                    {"error": {"message": "The server had an error", "type": "server_error"}},
                    status=500,
                )
            if mode == "401":
                return web.json_response(
                    {
                        "error": {
                            "message": "Incorrect API key provided",
                            "type": "invalid_request_error",
                        }
                    },
                    status=401,
                )
            if mode == "slow":
                await asyncio.sleep(self.slow_s)
            answer: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
            items = [fake_analysis(s["id"], s["title"]) for s in songs]
            if mode == "missing":
                items = items[:-1]
            if mode == "unknown":
                items.append(fake_analysis("not-a-song-we-asked-for", "x"))
            if mode == "refusal":
                answer["refusal"] = "I'm sorry, I can't help with that."
            elif mode == "malformed":
                answer["content"] = '{"songs": [{"id": "oops"'
            else:
                answer["content"] = json.dumps({"songs": items})
            prompt = len(content) // 4
            completion = len(answer["content"] or answer["refusal"]) // 4
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.answered += 1
            return web.json_response(
                {
                    "id": f"chatcmpl-{self.answered}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "message": answer, "finish_reason": "stop", "logprobs": None}
                    ],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                }
            )
        finally:
            self.in_flight -= 1
