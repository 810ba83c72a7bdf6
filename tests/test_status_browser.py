"""The status page in a real browser (headless Chromium driven by Playwright) against
real `worker run` processes and a sync of the sandbox marketplace in progress.

Two replicas: `leader-1` (role all) leads and runs the sync; `web-1` (role http) serves
the page under test, so what it shows came through Redis and Postgres, not memory.
Screenshots (laptop and phone) are left in tests/artifacts/.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from worker import db

from .cluster import Replica, emag_sync_cluster, wait_new_holder
from .conftest import REDIS_URL

playwright = pytest.importorskip("playwright.async_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).parent / "artifacts"
ITEMS = 12000  # 120 pages of 100 at 3 requests/s: about 40 s of sync
LAPTOP = {"width": 1366, "height": 900}
PHONE = {"width": 390, "height": 844}
NIGHTLY = """
[[jobs]]
name = "nightly-report"
kind = "http"
schedule = "0 3 * * 1-5"
timezone = "Europe/Bucharest"
[jobs.params]
url = "http://127.0.0.1:1/report"
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="no /usr/bin/chromium: run scripts/ensure-tools"
    ),
]


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with playwright.async_playwright() as p:
        chromium = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


class Watch:
    """What the browser did wrong: script errors, failed requests, the key in a URL."""

    def __init__(self, page: Any, key: str) -> None:
        self.problems: list[str] = []
        self.key = key
        page.on("pageerror", lambda e: self.problems.append(f"script error: {e}"))
        page.on("console", self._console)
        page.on("request", self._request)

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.problems.append(f"console: {message.text} ({message.location.get('url')})")

    def _request(self, request: Any) -> None:
        if self.key in request.url:
            self.problems.append(f"the API key in a URL: {request.method} {request.url}")
        if request.method == "POST" and request.headers.get("x-api-key") != self.key:
            self.problems.append(f"a POST without the key header: {request.url}")


async def test_the_status_page_in_a_browser(
    tmp_path: Path, database_url: str, key_prefix: str, redis: Redis, browser: Any
) -> None:
    expect = playwright.expect
    expect.set_options(timeout=20_000)
    ARTIFACTS.mkdir(exist_ok=True)
    async with emag_sync_cluster(tmp_path, database_url, REDIS_URL, key_prefix, items=ITEMS) as (
        _,
        cluster,
    ):
        cluster.jobs_file.write_text(cluster.jobs_file.read_text() + NIGHTLY)
        leader = cluster.start("leader-1")
        await cluster.wait_ready(leader)
        cluster.extra_env["WORKER_ROLE"] = "http"  # serves the page, never leads
        web = cluster.start("web-1")
        await cluster.wait_ready(web)
        _, token, _ = await wait_new_holder(redis, key_prefix, not_token=None, timeout=10)
        sync = await _trigger(web, cluster.api_key)

        page = await browser.new_page(viewport=LAPTOP)
        watch = Watch(page, cluster.api_key)
        await page.goto(f"{web.url}/")
        await page.evaluate("window.notReloaded = true")
        await expect(page.locator("#leader .lead")).to_contain_text("leader-1 leads")
        await expect(page.locator("#leader [data-f=token]")).to_have_text(str(token))
        await expect(page.locator("#replicas tbody tr")).to_have_count(2)

        # The sync's progress bar moves without the page reloading.
        bar = page.locator(f'#attention tr[data-key="{sync}"] [role=progressbar]')
        await expect(bar).to_have_attribute("aria-valuenow", re.compile(r"^[1-9]"))
        start = int(await bar.get_attribute("aria-valuenow") or 0)
        await page.wait_for_function(
            "([selector, start]) => Number(document.querySelector(selector)"
            "  ?.getAttribute('aria-valuenow')) > start",
            arg=[f'#attention tr[data-key="{sync}"] [role=progressbar]', start],
        )
        assert await page.evaluate("window.notReloaded") is True
        await expect(page.locator(f'#attention tr[data-key="{sync}"] .msg')).to_contain_text(
            "items"
        )
        await page.screenshot(path=ARTIFACTS / "status-laptop.png", full_page=True)

        # On a phone, while the sync runs: nothing wider than the screen, and the run's
        # status and progress in view.
        phone = await browser.new_page(viewport=PHONE, is_mobile=True, has_touch=True)
        phone_watch = Watch(phone, cluster.api_key)
        await phone.goto(f"{web.url}/")
        row = phone.locator(f'#attention tr[data-key="{sync}"]')
        await expect(row.locator("[data-f=status]")).to_have_text("running")
        await _fits(phone, PHONE["width"])
        await row.scroll_into_view_if_needed()
        for cell in ("td.status", "td.progress [role=progressbar]", "td.progress .msg"):
            await expect(row.locator(cell)).to_be_visible()
            box = await row.locator(cell).bounding_box()
            assert box is not None
            assert box["x"] >= 0
            assert box["x"] + box["width"] <= PHONE["width"]
        await phone.screenshot(path=ARTIFACTS / "status-phone.png", full_page=True)
        await row.screenshot(path=ARTIFACTS / "status-phone-run.png")

        # The run's own page follows it too.
        run_page = await browser.new_page(viewport=LAPTOP)
        run_watch = Watch(run_page, cluster.api_key)
        await run_page.goto(f"{web.url}/ui/runs/{sync}")
        own = run_page.locator("#run [role=progressbar]")
        await expect(run_page.locator("#run [data-f=status]")).to_have_text("running")
        start = int(await own.get_attribute("aria-valuenow") or 0)
        await run_page.wait_for_function(
            "start => Number(document.querySelector('#run [role=progressbar]')"
            "  .getAttribute('aria-valuenow')) > start",
            arg=start,
        )
        await expect(run_page.locator("[data-f=stats]")).to_contain_text("items")
        await expect(run_page.locator("[data-f=cursor]")).not_to_have_text("none")
        await run_page.screenshot(path=ARTIFACTS / "status-run-laptop.png", full_page=True)
        await run_page.close()
        assert run_watch.problems == []

        # Read-only until the key is given; it is asked once and kept for the tab.
        assert not await page.locator("#attention button[data-action=cancel]").first.is_visible()
        await page.get_by_role("button", name="Enter API key").click()
        await page.get_by_role("textbox", name="API key").fill(cluster.api_key)
        await page.get_by_role("button", name="Save key").click()
        await expect(page.locator("#key-state")).to_have_text("API key set")

        # Cancel the sync, behind a confirmation (that keeps the keyboard inside it).
        await page.locator(f'#attention tr[data-key="{sync}"] button[data-action=cancel]').click()
        dialog = page.get_by_role("dialog")
        await expect(dialog).to_contain_text(f"Cancel run #{sync}?")
        for _ in range(4):
            await page.keyboard.press("Tab")
            assert await page.evaluate("document.activeElement.closest('dialog') !== null")
        await dialog.get_by_role("button", name="Cancel the run").click()
        await expect(page.locator(".notice").last).to_contain_text(f"Run #{sync}")
        await expect(page.locator(f'#recent tr[data-key="{sync}"] [data-f=status]')).to_have_text(
            "cancelled"
        )

        # Run now starts a run; cancel it too.
        card = page.locator('article[data-job="emag-main"]')
        await card.get_by_role("button", name="Run now").click()
        await dialog.get_by_role("button", name="Run now").click()
        notice = page.locator(".notice", has_text="queued")
        await expect(notice).to_be_visible()
        queued = int(re.search(r"#(\d+)", await notice.inner_text()).group(1))  # type: ignore[union-attr]
        again = page.locator(f'#attention tr[data-key="{queued}"]')
        await expect(again.locator("[data-f=status]")).to_have_text("running")
        await expect(again.locator("[role=progressbar]")).to_have_attribute(
            "aria-valuenow", re.compile(r"^[1-9]")
        )
        await again.get_by_role("button", name="Cancel").click()
        await dialog.get_by_role("button", name="Cancel the run").click()
        await expect(page.locator(f'#recent tr[data-key="{queued}"] [data-f=status]')).to_have_text(
            "cancelled"
        )
        await expect(card.locator("[data-f=last]")).to_contain_text(f"#{queued}")

        # No leader any more: a run left `running` by a dead term is stuck; clean it up.
        os.kill(leader.proc.pid, signal.SIGTERM)
        assert leader.proc.wait(timeout=15) == 0
        await expect(page.locator("#leader [data-when=none]")).to_be_visible()
        async with db.open_pool(database_url) as pool:
            stuck = await pool.fetchval(
                "INSERT INTO runs (job, kind, trigger, status, token, worker_id, created_at,"
                " started_at, heartbeat_at, progress) VALUES ('emag-main', 'emag.offers',"
                " 'manual', 'running', $1, 'leader-1', now() - interval '2 hours',"
                " now() - interval '2 hours', now() - interval '1 hour', $2) RETURNING id",
                token,
                {"done": 100, "total": 9000, "message": "page 1, 100 items"},
            )
            stuck_row = page.locator(f'#attention tr[data-key="{stuck}"]')
            await expect(stuck_row.locator("[data-f=status]")).to_have_text("running")
            await page.get_by_role("button", name="Clean up stuck runs…").click()
            await expect(dialog.get_by_label("Running for more than (minutes)")).to_have_value("15")
            await dialog.get_by_role("button", name="Clean up").click()
            await expect(page.locator(".notice", has_text="stuck run")).to_contain_text(
                f"1 stuck run(s) marked failed: #{stuck}"
            )
            await expect(stuck_row.locator("[data-f=status]")).to_have_text("failed")
            await expect(stuck_row.locator("[data-f=error]")).to_contain_text("stuck")
            assert await pool.fetchval("SELECT status FROM runs WHERE id = $1", stuck) == "failed"
        await page.screenshot(path=ARTIFACTS / "status-laptop-after.png", full_page=True)
        assert watch.problems == []
        assert phone_watch.problems == []

        # Errors are shown, not swallowed: a cleanup with a key the API refuses.
        await page.evaluate("sessionStorage.setItem('worker-api-key', 'wrong')")
        await page.get_by_role("button", name="Clean up stuck runs…").click()
        await dialog.get_by_role("button", name="Clean up").click()
        await expect(dialog.locator("#confirm-error")).to_contain_text("X-API-Key")
        await dialog.get_by_role("button", name="Cancel").click()
        await expect(dialog).to_be_hidden()
        focused = await page.evaluate("document.activeElement.textContent")
        assert focused == "Clean up stuck runs…"  # focus went back to the opener

        assert await page.evaluate("window.notReloaded") is True


async def _fits(page: Any, width: int) -> None:
    """No element reaches past the right edge of a `width` wide screen."""
    layout = await page.evaluate(
        """() => {
          const width = document.documentElement.clientWidth;
          const over = [];
          for (const el of document.body.querySelectorAll('*')) {
            const box = el.getBoundingClientRect();
            if (box.width > 0 && box.right > width + 0.5) {
              over.push(`${el.tagName}.${el.className} ${Math.round(box.right)}`);
            }
          }
          return {width, scroll: document.documentElement.scrollWidth, over};
        }"""
    )
    assert layout["width"] == width
    assert layout["scroll"] <= width, layout
    assert layout["over"] == [], layout


async def _trigger(replica: Replica, key: str) -> int:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{replica.url}/jobs/emag-main/trigger", headers={"X-API-Key": key}) as response,
    ):
        assert response.status == 202, await response.text()
        run_id: int = (await response.json())["run_id"]
    return run_id
