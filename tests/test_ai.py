"""The OpenAI analyser, through the real openai SDK, against a fake OpenAI-compatible server."""

from __future__ import annotations

import math
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from server.analyzers import OfflineAnalyzer, OpenAIAnalyzer, UnconfiguredAnalyzer
from server.config import Settings
from server.worker import make_analyzer

from .conftest import auth
from .fake_openai import FakeOpenAI, fake_analysis

END = ("job.completed", "job.failed", "job.cancelled")


@pytest.fixture
async def fake():
    f = FakeOpenAI()
    server = TestServer(f.app)
    await server.start_server()
    f.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    yield f
    await server.close()


@pytest.fixture
def ai_app(aiohttp_client, app_factory, fake):
    async def start(**overrides: Any):
        settings = dict(
            analyzer="openai",
            openai_api_key="sk-test",
            openai_base_url=fake.url,
            openai_model="gpt-test",
            llm_backoff_s=0.01,
            analysis_batch_size=10,
        )
        settings.update(overrides)
        return await aiohttp_client(app_factory(workers=1, **settings))

    return start


async def sort_and_wait(connect, client, group, user):
    s = await connect(user, tc=client)
    await s.request("join", group=group)
    await s.request("sort", group=group)
    return s, await s.until(lambda f: f["type"] in END, timeout=60)


pytestmark = pytest.mark.workers(0)  # only the AI app below runs a worker


async def test_happy_path_uses_the_model_and_accounts_tokens(ai_app, connect, make_group, fake):
    client = await ai_app()
    group, songs = await make_group(["ai1", "ai2"], songs=30, unique=True)
    other = await connect("ai2", tc=client)
    await other.request("join", group=group)
    s, done = await sort_and_wait(connect, client, group, "ai1")
    assert done["type"] == "job.completed"
    stats = done["job"]["result"]["stats"]
    assert stats["llm_calls"] == 3 == len(fake.requests)
    assert (stats["analysed"], stats["cached"]) == (30, 0)
    assert stats["prompt_tokens"] == fake.prompt_tokens > 0
    assert stats["completion_tokens"] == fake.completion_tokens > 0
    # Every request used strict structured outputs and identified songs by id.
    for body in fake.requests:
        assert body["model"] == "gpt-test"
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["strict"] is True
    assert sorted(sid for ids in fake.asked for sid in ids) == sorted(songs)
    playlist = await (await client.get(f"/api/groups/{group}/playlist", headers=auth("ai1"))).json()
    first = playlist["songs"][0]
    expected = fake_analysis(first["id"], first["title"])
    assert first["analysis"]["energy"] == expected["energy"]
    assert first["analysis"]["genre"] == expected["genre"]
    # The other member saw the same partial results stream in.
    await other.until(lambda f: f["type"] == "job.completed")
    partial = [x["song"] for f in other.frames if f["type"] == "job.partial" for x in f["songs"]]
    assert sorted(partial) == sorted(songs)
    metrics = await (await client.get("/metrics")).text()
    assert "smartsort_llm_calls_total" in metrics


async def test_rate_limit_honours_retry_after(ai_app, connect, make_group, fake):
    client = await ai_app(analysis_concurrency=1)
    group, _ = await make_group(["rl1"], songs=10, unique=True)
    fake.script = ["429"]
    fake.retry_after_ms = 400
    _, done = await sort_and_wait(connect, client, group, "rl1")
    assert done["type"] == "job.completed"
    assert len(fake.requests) == 2
    assert fake.times[1] - fake.times[0] >= 0.4  # it waited as long as it was told
    assert done["job"]["result"]["stats"]["llm_calls"] == 1  # retried attempts are not calls


async def test_server_errors_then_success(ai_app, connect, make_group, fake):
    client = await ai_app()
    group, _ = await make_group(["se1"], songs=10, unique=True)
    fake.script = ["500", "500"]
    _, done = await sort_and_wait(connect, client, group, "se1")
    assert done["type"] == "job.completed"
    assert len(fake.requests) == 3 and done["job"]["result"]["stats"]["llm_calls"] == 1


async def test_a_call_that_times_out_is_retried(ai_app, connect, make_group, fake):
    client = await ai_app(llm_timeout_s=0.5)
    group, _ = await make_group(["to1"], songs=10, unique=True)
    fake.script = ["slow"]
    fake.slow_s = 3
    _, done = await sort_and_wait(connect, client, group, "to1")
    assert done["type"] == "job.completed"
    assert len(fake.requests) == 2


async def test_a_malformed_answer_is_asked_again(ai_app, connect, make_group, fake):
    client = await ai_app()
    group, _ = await make_group(["ma1"], songs=10, unique=True)
    fake.script = ["malformed"]
    _, done = await sort_and_wait(connect, client, group, "ma1")
    assert done["type"] == "job.completed"
    assert fake.asked[1] == fake.asked[0]
    assert done["job"]["result"]["stats"]["llm_calls"] == 2  # both answers were received


async def test_only_the_missing_songs_are_asked_again_and_unknown_ids_ignored(
    ai_app, connect, make_group, fake
):
    client = await ai_app()
    group, songs = await make_group(["mi1"], songs=10, unique=True)
    fake.script = ["missing", "unknown"]
    _, done = await sort_and_wait(connect, client, group, "mi1")
    assert done["type"] == "job.completed"
    assert len(fake.asked[0]) == 10 and fake.asked[1] == [fake.asked[0][-1]]
    assert sorted(done["job"]["result"]["order"]) == sorted(songs)


async def test_a_model_that_keeps_refusing_fails_the_job_clearly(ai_app, connect, make_group, fake):
    client = await ai_app()
    group, _ = await make_group(["rf1", "rf2"], songs=10, unique=True)
    watcher = await connect("rf2", tc=client)
    await watcher.request("join", group=group)
    fake.default = "refusal"
    _, done = await sort_and_wait(connect, client, group, "rf1")
    assert done["type"] == "job.failed"
    error = done["job"]["error"]
    assert error["code"] == "llm_refused" and "refused" in error["message"]
    assert error["retryable"] is False and done["job"]["attempt"] == 1
    assert (await watcher.until(lambda f: f["type"] in END))["type"] == "job.failed"


async def test_always_failing_ends_in_job_failed_for_everyone(ai_app, connect, make_group, fake):
    client = await ai_app(llm_max_retries=3, max_attempts=2)
    group, _ = await make_group(["af1", "af2"], songs=10, unique=True)
    watcher = await connect("af2", tc=client)
    await watcher.request("join", group=group)
    fake.default = "500"
    s, done = await sort_and_wait(connect, client, group, "af1")
    assert done["type"] == "job.failed"
    message = done["job"]["error"]["message"]
    assert message.startswith(
        "Smart sort failed after 2 attempts: OpenAI server error 500: retried 3 times"
    )
    retrying = [f for f in s.durable(group) if f["type"] == "job.retrying"]
    assert len(retrying) == 1 and retrying[0]["error"]["code"] == "llm_unavailable"
    assert len(fake.requests) == 2 * (3 + 1)  # per attempt: the call and its 3 retries
    assert (await watcher.until(lambda f: f["type"] in END))["job"]["error"]["message"] == message


async def test_a_rejected_key_fails_at_once(ai_app, connect, make_group, fake):
    client = await ai_app()
    group, _ = await make_group(["ky1"], songs=5, unique=True)
    fake.default = "401"
    _, done = await sort_and_wait(connect, client, group, "ky1")
    assert done["type"] == "job.failed" and len(fake.requests) == 1
    assert done["job"]["error"]["message"].startswith("OpenAI rejected the request (401)")


async def test_a_repeat_sort_makes_no_calls(ai_app, connect, make_group, fake):
    client = await ai_app()
    group, _ = await make_group(["ca1"], songs=20, unique=True)
    s, first = await sort_and_wait(connect, client, group, "ca1")
    calls = len(fake.requests)
    assert first["job"]["result"]["stats"]["llm_calls"] == calls == 2
    await s.request("sort", group=group)
    second = await s.until(lambda f: f["type"] in END and f["job"]["id"] != first["job"]["id"])
    stats = second["job"]["result"]["stats"]
    assert (stats["llm_calls"], stats["cached"], stats["analysed"]) == (0, 20, 0)
    assert len(fake.requests) == calls


async def test_a_thousand_songs_in_batches_with_bounded_concurrency(
    ai_app, connect, make_group, fake
):
    client = await ai_app(analysis_batch_size=50, analysis_concurrency=4)
    fake.latency_s = 0.1
    group, songs = await make_group(["big"], songs=1000, unique=True)
    _, done = await sort_and_wait(connect, client, group, "big")
    assert done["type"] == "job.completed"
    assert len(fake.requests) == math.ceil(1000 / 50) == done["job"]["result"]["stats"]["llm_calls"]
    assert fake.max_in_flight == 4
    assert sorted(done["job"]["result"]["order"]) == sorted(songs)


def test_offline_stays_the_default_without_a_key() -> None:
    assert isinstance(make_analyzer(Settings(OPENAI_API_KEY=None)), OfflineAnalyzer)
    assert not isinstance(make_analyzer(Settings(OPENAI_API_KEY=None)), UnconfiguredAnalyzer)
    with_key = make_analyzer(Settings(OPENAI_API_KEY="sk-x", OPENAI_MODEL="m"))
    assert isinstance(with_key, OpenAIAnalyzer) and with_key.name == "openai:m:v1"
    forced = make_analyzer(Settings(OPENAI_API_KEY="sk-x", SMARTSORT_ANALYZER="offline"))
    assert isinstance(forced, OfflineAnalyzer)
    broken = make_analyzer(Settings(OPENAI_API_KEY=None, SMARTSORT_ANALYZER="openai"))
    assert isinstance(broken, UnconfiguredAnalyzer) and "OPENAI_API_KEY" in broken.reason
