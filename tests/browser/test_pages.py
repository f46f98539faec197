"""The three pages in a real headless Chromium against the real stack (gateway, scheduler,
runner, NATS, Postgres): live rows, REFRESH, reconnect after a gateway restart, filters,
the job page's live log with colours, cancel, and hostile text shown literally."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, expect

from services.client import XoogifyClient
from services.common.config import EXAMPLE_MODULES_DIR, Settings
from tests.stack import Stack
from tests.support import eventually

HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
TIMEOUT_MS = 30_000


def _module(root: Path, name: str, script: str) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "module.toml").write_text(
        '[script]\nPLAN = "./run.sh"\nAPPLY-AUTO = "./run.sh"\nDESTROY = "./run.sh"\n'
    )
    (folder / "run.sh").write_text("#!/bin/sh\n" + script)
    (folder / "run.sh").chmod(0o755)


@pytest.fixture
async def web_stack(settings: Settings, tmp_path: Path) -> AsyncIterator[Stack]:
    modules = tmp_path / "modules"
    shutil.copytree(EXAMPLE_MODULES_DIR, modules)
    _module(
        modules,
        "colors",
        "printf 'plain line\\n'\nsleep 1\n"
        "printf '\\033[31mred text\\033[0m and \\033[1;32mbold green\\033[0m\\n'\n"
        "sleep 1\nprintf 'last line\\n'\n",
    )
    _module(modules, "hostile", f"echo '{HOSTILE}'\necho \"var: $XOOGIFY_VAR_note\"\n")
    stack = Stack(dataclasses.replace(settings, modules_dir=modules), tmp_path / "logs")
    await stack.start_all()
    try:
        yield stack
    finally:
        await stack.stop_all()


async def _logged_in(browser: Browser, stack: Stack, **options: Any) -> Page:
    """A page of a fresh browser context, logged in through the login URL: the gateway
    sets its cookie and redirects to the same page without the token."""
    context = await browser.new_context(**options)
    page = await context.new_page()
    await page.goto(f"{stack.url}/?token={stack.settings.token}")
    assert page.url == stack.url + "/"
    cookies = await context.cookies()
    assert [c["httpOnly"] for c in cookies if c["name"] == "xoogify_session"] == [True]
    return page


async def _submit(stack: Stack, module: str, org: str = "acme", **kw: object) -> int:
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        job = await xo.submit(
            organization=org,
            environment="stg",
            module_name=module,
            module_type="amd64/script",
            action="APPLY-AUTO",
            **kw,  # type: ignore[arg-type]
        )
    return int(job["build_id"])


async def _final(stack: Stack, build_id: int) -> dict:
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        return await xo.wait_final(build_id, timeout=60)


def _row(page: Page, build_id: int):
    return page.locator(f'tr[data-build-id="{build_id}"]')


async def _watch_statuses(page: Page) -> None:
    """Record every status a row's badge shows, to check the walk through statuses."""
    await page.evaluate(
        """() => {
          window.__seen = {};
          const note = () => document.querySelectorAll('tr[data-build-id]').forEach(tr => {
            const s = tr.querySelector('.badge')?.textContent;
            const id = tr.dataset.buildId;
            const seen = (window.__seen[id] ||= []);
            if (s && seen[seen.length - 1] !== s) seen.push(s);
          });
          note();
          new MutationObserver(note).observe(
            document.body, {subtree: true, childList: true, characterData: true});
        }"""
    )


async def test_rows_first_load_and_live_walk(
    web_stack: Stack, browser: Browser, artifacts: Path
) -> None:
    first = await _submit(web_stack, "hello")
    await _final(web_stack, first)

    # Rendered on the server: the row is there with scripts off.
    page = await _logged_in(browser, web_stack, java_script_enabled=False)
    await page.goto(web_stack.url + "/")
    await expect(_row(page, first)).to_contain_text("SUCCESS")
    headers = await page.locator("table#jobs thead th").all_inner_texts()
    assert [h.strip() for h in headers] == [
        "Build ID",
        "Environment Name",
        "Organization",
        "Module Type",
        "Module Name",
        "Action",
        "Status",
    ]
    await page.context.close()

    page = await _logged_in(browser, web_stack, viewport={"width": 1280, "height": 800})
    await page.goto(web_stack.url + "/")
    await expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)
    await _watch_statuses(page)
    second = await _submit(web_stack, "hello")
    await expect(_row(page, second).locator(".badge")).to_have_text("SUCCESS", timeout=TIMEOUT_MS)
    seen = await page.evaluate(f"window.__seen['{second}']")
    assert seen[-1] == "SUCCESS"
    assert "WORKING" in seen  # it walked through its statuses in place, no reload
    assert seen.index("WORKING") < seen.index("SUCCESS")
    # Newest on top.
    assert await page.locator("tbody tr").first.get_attribute("data-build-id") == str(second)
    await page.screenshot(path=str(artifacts / "jobs-page.png"), full_page=True)
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.screenshot(path=str(artifacts / "jobs-page-phone.png"), full_page=True)


async def test_refresh_and_gateway_restart(web_stack: Stack, browser: Browser) -> None:
    page = await _logged_in(browser, web_stack)
    await page.goto(web_stack.url + "/")
    await expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)

    ids = [await _submit(web_stack, "hello") for _ in range(3)]
    await page.click("#refresh")  # a resync while the jobs change
    for build_id in ids:
        await expect(_row(page, build_id).locator(".badge")).to_have_text(
            "SUCCESS", timeout=TIMEOUT_MS
        )

    # Restart the gateway while a job runs: reconnecting, then live, and the table right.
    running = await _submit(web_stack, "slow", variables={"seconds": "3"})
    await expect(_row(page, running).locator(".badge")).to_have_text("WORKING", timeout=TIMEOUT_MS)
    web_stack.kill("gateway")
    await expect(page.locator("#conn")).to_have_text("reconnecting", timeout=TIMEOUT_MS)
    await web_stack.start_gateway()
    await expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)
    await expect(_row(page, running).locator(".badge")).to_have_text("SUCCESS", timeout=60_000)
    async with XoogifyClient(web_stack.url, web_stack.settings.token) as xo:
        page_data = await xo.list_jobs(limit=50)
    for job in page_data["items"]:
        await expect(_row(page, job["build_id"]).locator(".badge")).to_have_text(job["status"])
    assert await page.locator("tbody tr").count() == len(page_data["items"])


async def test_filter_by_organization_hides_others_live(web_stack: Stack, browser: Browser) -> None:
    other_before = await _submit(web_stack, "hello", org="globex")
    await _final(web_stack, other_before)
    page = await _logged_in(browser, web_stack)
    await page.goto(web_stack.url + "/?organization=acme")
    await expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)
    await expect(_row(page, other_before)).to_have_count(0)

    other = await _submit(web_stack, "hello", org="globex")
    mine = await _submit(web_stack, "hello", org="acme")
    await expect(_row(page, mine).locator(".badge")).to_have_text("SUCCESS", timeout=TIMEOUT_MS)
    await _final(web_stack, other)
    await expect(_row(page, other)).to_have_count(0)
    assert await page.locator('input[name="organization"]').input_value() == "acme"


async def test_job_page_tails_colours_and_cancels(
    web_stack: Stack, browser: Browser, artifacts: Path
) -> None:
    page = await _logged_in(browser, web_stack)
    await page.goto(web_stack.url + "/")
    await expect(page.locator("#conn")).to_have_text("live", timeout=TIMEOUT_MS)
    build_id = await _submit(web_stack, "colors")
    await expect(_row(page, build_id)).to_have_count(1, timeout=TIMEOUT_MS)
    await _row(page, build_id).locator("a").click()
    await page.wait_for_url(f"**/jobs/{build_id}")
    log = page.locator("#log")
    await expect(log).to_contain_text("last line", timeout=TIMEOUT_MS)
    await expect(page.locator("#log-state")).to_contain_text("complete", timeout=TIMEOUT_MS)
    text = await log.inner_text()
    assert "\x1b" not in text and "[31m" not in text
    assert text.count("plain line") == 1 and text.count("last line") == 1  # no gap, no repeat
    red = log.locator("span.fg-1", has_text="red text")
    await expect(red).to_have_count(1)
    colour = await red.evaluate("el => getComputedStyle(el).color")
    assert colour not in ("rgb(0, 0, 0)", "")
    await expect(page.locator("#status")).to_contain_text("SUCCESS")
    await page.screenshot(path=str(artifacts / "job-page.png"), full_page=True)

    # Cancel a running slow job from its page.
    slow = await _submit(web_stack, "slow", variables={"seconds": "60"})
    await expect(page.locator("#conn")).to_have_text("live")
    await page.goto(web_stack.url + "/")
    await _row(page, slow).locator("a").click(timeout=TIMEOUT_MS)  # as a user gets there
    await expect(page.locator("#log")).to_contain_text("slow: second 1", timeout=TIMEOUT_MS)
    page.once("dialog", lambda dialog: dialog.accept())
    await page.click("#cancel")
    await expect(page.locator("#status")).to_contain_text("FAILURE", timeout=TIMEOUT_MS)
    job = await _final(web_stack, slow)
    assert (job["status"], job["reason"]) == ("FAILURE", "cancelled")


async def test_hostile_text_is_shown_literally(
    web_stack: Stack, browser: Browser, artifacts: Path
) -> None:
    build_id = await _submit(web_stack, "hostile", variables={"note": HOSTILE})
    await _final(web_stack, build_id)
    page = await _logged_in(browser, web_stack)
    await page.goto(f"{web_stack.url}/jobs/{build_id}")
    await expect(page.locator("#log")).to_contain_text("<script>window.__pwned = 1</script>")
    await expect(page.locator("#log")).to_contain_text(f"var: {HOSTILE}")
    await expect(page.locator("body")).to_contain_text('<img src=x onerror="window.__pwned = 2">')
    assert await page.evaluate("window.__pwned") is None
    assert await page.locator("#log img, #log script, main img").count() == 0

    await page.goto(web_stack.url + "/runners")
    await expect(page.locator("[data-runner-id]")).to_have_count(1, timeout=TIMEOUT_MS)
    await page.screenshot(path=str(artifacts / "runners-page.png"), full_page=True)

    async def escaped() -> bool:
        return await page.evaluate("window.__pwned") is None

    assert await eventually(escaped, timeout=2)


async def test_without_login_the_pages_ask_for_one(web_stack: Stack, browser: Browser) -> None:
    page = await browser.new_page()
    response = await page.goto(web_stack.url + "/")
    assert response is not None and response.status == 401
    await expect(page.locator("body")).to_contain_text("login URL")
    # A wrong login link sets no cookie.
    await page.goto(web_stack.url + "/?token=xo_wrong")
    assert await page.context.cookies() == []
