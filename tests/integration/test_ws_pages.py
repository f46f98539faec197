"""The HTML pages against the real gateway app and the jobs it ingested: the table's rows and
columns, the job page, the raw log, the runners page, and that user text stays text."""

from __future__ import annotations

import asyncio
import re

import httpx

from services.common.config import Settings
from tests.integration.ws_support import job_event, publisher, serve_gateway
from tests.support import auth_headers, eventually

HOSTILE = "<script>alert(1)</script>"
HOSTILE_IMG = '<img src=x onerror="alert(2)">'


async def test_pages_render_jobs_and_escape_user_text(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.event(job_event(11, 1, variables={"note": HOSTILE}))
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as http:

            async def first_stored() -> bool:
                return (await http.get("/api/jobs/11")).status_code == 200

            # Stored on its own: the variables ride on the first event only.
            await eventually(first_stored)
        await pub.event(job_event(11, 2, "WORKING"))
        line = f"\x1b[32mok\x1b[0m {HOSTILE_IMG}\n"
        await pub.chunk(11, 0, line)
        await pub.chunk(11, len(line.encode()), "", eof=True)
        await pub.event(job_event(11, 3, "SUCCESS"))
        await pub.event(job_event(12, 1, org="other", env="prod"))

        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as http:

            async def ingested() -> bool:
                r = await http.get("/api/jobs/11/logs")
                listed = await http.get("/api/jobs")
                return (
                    r.status_code == 200
                    and r.json()["complete"]
                    and len(listed.json()["items"]) == 2
                )

            await eventually(ingested)

            page = await http.get("/")
            assert page.status_code == 200
            html = page.text
            assert "Deployment Jobs" in html and ">REFRESH<" in html
            headers = re.findall(r'<th scope="col">([^<]+)</th>', html)
            assert headers == [
                "Build ID",
                "Environment Name",
                "Organization",
                "Module Type",
                "Module Name",
                "Action",
                "Status",
            ]
            rows = re.findall(r'<tr data-build-id="(\d+)"', html)
            assert rows == ["12", "11"]  # newest first
            assert '<a href="/jobs/11">11</a>' in html
            assert re.search(r'data-watermark="\d+"', html)
            assert 'type="module" src="/static/jobs.js"' in html

            filtered = await http.get("/", params={"organization": "other"})
            assert re.findall(r'<tr data-build-id="(\d+)"', filtered.text) == ["12"]

            job = await http.get("/jobs/11")
            assert job.status_code == 200
            assert HOSTILE not in job.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in job.text
            assert "<img src=x" not in job.text and "&lt;img src=x" in job.text
            assert "\x1b" not in job.text  # colours became classes
            assert '<span class="fg-2">ok</span>' in job.text
            assert 'data-log-complete="true"' in job.text

            raw = await http.get("/jobs/11/log.txt")
            assert raw.status_code == 200 and raw.text == line
            assert raw.headers["content-type"].startswith("text/plain")

            missing = await http.get("/jobs/999999")
            assert missing.status_code == 404 and "Not found" in missing.text

            runners = await http.get("/runners")
            assert runners.status_code == 200 and "<h1>Runners</h1>" in runners.text

            static = await http.get("/static/jobs.js")
            assert static.status_code == 200 and "LiveSocket" in static.text


async def test_job_page_of_a_just_submitted_job_waits_for_ingestion(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        # Build IDs are submit-stream sequences; no scheduler runs, so publish its part.
        ack = await pub.js.publish(settings.subjects.submit, b"{}")
        build_id = int(ack.seq)
        async with httpx.AsyncClient(
            base_url=gw.url, headers=auth_headers(settings), timeout=30
        ) as http:
            page = asyncio.create_task(http.get(f"/jobs/{build_id}"))
            await pub.event(job_event(build_id, 1))
            answer = await page
            assert answer.status_code == 200
            assert f"<h1>Job {build_id} " in answer.text

            started = asyncio.get_running_loop().time()
            never = await http.get(f"/jobs/{build_id + 1}")
            assert never.status_code == 404
            assert asyncio.get_running_loop().time() - started < 2  # not waited for
