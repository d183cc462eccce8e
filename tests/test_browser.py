"""The demo page in a real browser (Playwright driving Debian's Chromium).

Skipped with a reason when Playwright or Chromium is missing, unless SMARTSORT_REQUIRE_BROWSER=1
(set by .ci/run, which installs Chromium), where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from .helpers import ROOT, ServerProcess, free_port, python_server, server_env

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("SMARTSORT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"


def _browser_missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("SMARTSORT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"SMARTSORT_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(missing)
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield b
        await b.close()


@pytest.fixture
async def demo_server(tmp_path: Path, backends: Any) -> AsyncIterator[str]:
    port = free_port()
    env = server_env(
        backends.database_url,
        backends.redis_url,
        tmp_path,
        SMARTSORT_STEP_DELAY_S=0.15,  # long enough to kill a socket mid-sort
        SMARTSORT_ANALYSIS_BATCH_SIZE=2,
        SMARTSORT_ANALYSIS_CONCURRENCY=1,
        SMARTSORT_PROGRESS_INTERVAL_S=0,
    )
    server = ServerProcess(python_server("serve", "--demo", "--port", str(port)), env)
    await server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop()


async def open_page(browser: Any, base: str, query: str, width: int = 1280) -> Any:
    page = await browser.new_page(viewport={"width": width, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.errors = errors
    await page.goto(f"{base}/?{query}")
    return page


async def log_of(page: Any, user: str) -> list[tuple[int, str]]:
    """The (seq, type) of every durable event in a pane's event log, in order."""
    items = await page.eval_on_selector_all(
        f".pane[data-user='{user}'] .log li[data-seq]",
        "els => els.map(e => [Number(e.dataset.seq), e.dataset.type])",
    )
    return [(seq, kind) for seq, kind in items]


async def all_panes(page: Any, users: list[str], condition: str, timeout_ms: int = 30000) -> None:
    await page.wait_for_function(
        f"""users => users.every(u => {{
            const p = document.querySelector(`.pane[data-user='${{u}}']`);
            return p && ({condition});
        }})""",
        arg=users,
        timeout=timeout_ms,
    )


async def test_every_pane_sees_the_same_sort_and_a_killed_socket_resumes(
    browser, demo_server, make_group
):
    members = ["br-alice", "br-bob", "br-carol"]
    group, songs = await make_group(members, songs=20, unique=True)
    other, _ = await make_group(["br-erin"], songs=2)
    page = await open_page(
        browser, demo_server, f"group={group}&members={','.join(members)},br-erin@{other}"
    )
    everyone = [*members, "br-erin"]
    await all_panes(page, everyone, "p.dataset.state === 'live'")
    # Presence: each demo pane ends up listing all three members, erin only herself.
    await all_panes(
        page,
        members,
        f"p.querySelector('.online').textContent === 'Online: {', '.join(sorted(members))}'",
    )
    assert await page.text_content(".pane[data-user='br-erin'] .online") == "Online: br-erin"

    await page.click(".pane[data-user='br-alice'] .sort")
    # Mid-sort, once bob has seen songs land, kill his socket.
    await page.wait_for_selector(
        ".pane[data-user='br-bob'] .log li[data-type='job.partial']", state="attached"
    )
    await page.click(".pane[data-user='br-bob'] .kill")
    await all_panes(page, ["br-bob"], "p.dataset.state !== 'live'")
    await all_panes(page, members, "p.dataset.status === 'completed'", 60000)
    assert await page.get_attribute(".pane[data-user='br-bob']", "data-state") == "resumed"

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo-page-1280.png"), full_page=True)

    logs = {m: await log_of(page, m) for m in members}
    seqs = [seq for seq, _ in logs["br-alice"]]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "alice's log has a gap"
    assert logs["br-bob"] == logs["br-alice"] == logs["br-carol"]  # same events, same order
    kinds = [kind for _, kind in logs["br-alice"]]
    assert kinds[0] == "job.queued" and kinds[-1] == "job.completed"
    assert "playlist.updated" in kinds and kinds.count("job.progress") >= 3

    orders = {
        m: await page.get_attribute(f".pane[data-user='{m}'] .playlist", "data-order")
        for m in members
    }
    assert orders["br-alice"] and sorted(orders["br-alice"].split(",")) == sorted(songs)
    assert len(set(orders.values())) == 1

    # The member of the other group saw none of it.
    assert await log_of(page, "br-erin") == []
    assert await page.get_attribute(".pane[data-user='br-erin']", "data-status") is None
    assert page.errors == []


async def test_the_page_fits_a_phone_and_labels_its_controls(browser, demo_server, make_group):
    group, _ = await make_group(["ph-ann", "ph-ben"], songs=4)
    page = await open_page(browser, demo_server, f"group={group}&members=ph-ann,ph-ben", 390)
    await all_panes(page, ["ph-ann", "ph-ben"], "p.dataset.state === 'live'")
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px at 390px"
    # Every control can be named by a screen reader.
    unnamed = await page.evaluate(
        """[...document.querySelectorAll('button, input, progress')].filter(e =>
            !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
            && !e.textContent.trim()).length"""
    )
    assert unnamed == 0
    await page.fill("#member-name", "ph-cat")
    await page.fill("#member-group", group)
    await page.click("#add-member button")
    # ph-cat is not a member: the pane says so instead of pretending.
    await all_panes(page, ["ph-cat"], "p.dataset.state === 'refused'")
    notice = await page.text_content(".pane[data-user='ph-cat'] .notice")
    assert notice is not None and "not a member" in notice
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "demo-page-390.png"), full_page=True)
    assert page.errors == []
