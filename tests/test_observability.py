"""What operators see: /metrics after real traffic, and the jobs view."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from .conftest import auth


async def scrape(client: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = await (await client.get("/metrics")).text()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict[Any, float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_follow_a_sort_and_a_resume(client, connect, make_group):
    group, _ = await make_group(["obs-ann"], songs=5)
    before = await scrape(client)
    sock = await connect("obs-ann")
    await sock.request("join", group=group)
    await sock.request("sort", group=group)
    await sock.until(lambda f: f["type"] == "job.completed")
    seen = len(sock.durable(group))
    during = await scrape(client)
    assert value(during, "smartsort_ws_joined") == 1
    assert value(during, "smartsort_groups_live") == 1

    def grew(name: str, **labels: str) -> float:
        return value(during, name, **labels) - value(before, name, **labels)

    assert grew("smartsort_events_published_total") >= seen
    assert grew("smartsort_events_delivered_total") >= seen
    assert grew("smartsort_fanout_lag_seconds_count") >= seen
    assert grew("smartsort_job_enqueue_to_start_seconds_count") == 1
    assert grew("smartsort_job_duration_seconds_count", status="completed") == 1
    assert grew("smartsort_llm_cache_hits_total") >= 0
    assert ("smartsort_jobs", (("state", "queued"),)) in during

    last = sock.durable(group)[-1]["seq"]
    await sock.request("leave", group=group)
    await sock.request("join", group=group, since=last - 2)  # replayable: recovered
    await sock.request("leave", group=group)
    await sock.request("join", group=group, since=last + 100)  # impossible: not recovered
    after = await scrape(client)
    assert (
        value(after, "smartsort_resumes_total", recovered="true")
        - value(during, "smartsort_resumes_total", recovered="true")
        == 1
    )
    assert (
        value(after, "smartsort_resumes_total", recovered="false")
        - value(during, "smartsort_resumes_total", recovered="false")
        == 1
    )


async def test_jobs_view_needs_the_operator_token(aiohttp_client, app_factory, make_group):
    client = await aiohttp_client(app_factory(admin_token="op-secret"))
    group, _ = await make_group(["obs-bea"], songs=3)
    resp = await client.post(f"/api/groups/{group}/smart-sort", headers=auth("obs-bea"))
    job = (await resp.json())["job"]["id"]

    refused = await client.get("/admin/jobs")
    assert refused.status == 401 and (await refused.json())["code"] == "unauthorized"
    member = await client.get("/admin/jobs", headers=auth("obs-bea"))  # a user token is not enough
    assert member.status == 401
    ok = await client.get("/admin/jobs", headers={"Authorization": "Bearer op-secret"})
    assert ok.status == 200
    body = await ok.json()
    mine = next(j for j in body["jobs"] if j["id"] == job)
    assert mine["group"] == group and mine["status"] in ("queued", "running", "completed")
    assert "result" not in mine  # operators see the run, not the playlist
    assert set(body["counts"]) <= {"queued", "running", "retrying"}
    page = await client.get("/admin?token=op-secret")
    assert page.status == 200 and "Jobs" in await page.text()


async def test_jobs_view_is_closed_without_a_token_outside_demo_mode(aiohttp_client, app_factory):
    client = await aiohttp_client(app_factory(demo=False))
    resp = await client.get("/admin/jobs")
    assert resp.status == 403
    assert "SMARTSORT_ADMIN_TOKEN" in (await resp.json())["error"]
