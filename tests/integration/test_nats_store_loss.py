"""NATS loses its store (a new volume, a wiped data dir) while Postgres keeps its jobs: the
stack is stopped, nats-server comes back empty on the same port, the services start again.

Numbering must go on past what Postgres holds (a new job never takes an old job's build
ID, and ingestion does not wait for sequences the new streams reach only much later), and
the job that was not final, lost with the scheduler's records, must end instead of
showing `IN-PROGRESS` for ever."""

from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any

import httpx
import nats
import pytest
from nats.js.errors import NotFoundError

from services.common import bus
from services.common.config import Settings
from services.common.embedded import EmbeddedNats
from services.gateway import db, store_reset
from services.gateway.store_reset import LOST_NOTE
from tests.stack import Stack
from tests.support import admin_token, auth_headers, eventually, stored_as_if_ingested


def _job(arch: str = "amd64") -> dict[str, Any]:
    return {
        "organization": "acme",
        "environment": "stg",
        "module_type": f"{arch}/script",
        "module_name": "hello",
        "action": "PLAN",
    }


async def _final(http: httpx.AsyncClient, build_id: int) -> dict[str, Any]:
    """The job once Postgres has it final, with its complete log."""

    async def probe() -> dict[str, Any] | None:
        job = (await http.get(f"/api/jobs/{build_id}")).json()
        if job.get("status") not in ("SUCCESS", "FAILURE"):
            return None
        log = (await http.get(f"/api/jobs/{build_id}/logs")).json()
        return {**job, "log": log} if log["complete"] else None

    return await eventually(probe, timeout=60)


@pytest.mark.timeout(180)
async def test_after_a_lost_store_numbering_goes_on_and_the_lost_job_ends(
    settings: Settings, stack: Stack, nats_server: EmbeddedNats | None
) -> None:
    assert nats_server is not None, "this test wipes its own nats-server's store"
    await stack.start_all()
    async with httpx.AsyncClient(base_url=stack.url, headers=auth_headers(settings)) as http:
        hook = {
            "organization": "acme",
            "url": "http://127.0.0.1:9/failures",  # nobody listens: the row is what counts
            "statuses": ["FAILURE"],
            "secret": "s" * 16,
        }
        r = await http.post("/api/webhooks", json=hook)
        assert r.status_code == 201, r.text
        hook_id = r.json()["id"]
        done = (await http.post("/api/jobs", json=_job())).json()["build_id"]
        before = await _final(http, done)
        assert before["status"] == "SUCCESS"
        # No arm64 runner: this one waits, and is in flight when the store goes.
        waiting = (await http.post("/api/jobs", json=_job("arm64"))).json()["build_id"]

        async def stored_in_progress() -> bool:
            r = await http.get(f"/api/jobs/{waiting}")
            return r.status_code == 200 and r.json()["status"] == "IN-PROGRESS"

        await eventually(stored_in_progress)
        watermark = (await http.get("/api/jobs")).json()["watermark"]

    async def filler_caught_up() -> bool:
        # The webhook filler's scan has passed every stored event: the lost job's last
        # event (stored at that watermark) is beyond its reach.
        cursor = "SELECT stream_seq FROM webhook_outbox_cursor WHERE name = 'job_events'"
        at = await pool.fetchval(cursor)
        return at is not None and at >= watermark

    pool = await db.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        await eventually(filler_caught_up)
    finally:
        await pool.close()

    await stack.stop_all()
    nats_server.stop()
    await asyncio.to_thread(shutil.rmtree, nats_server.store_dir)
    await asyncio.to_thread(nats_server.start)
    await stack.start_all()

    async with httpx.AsyncClient(base_url=stack.url, headers=auth_headers(settings)) as http:
        lost = await _final(http, waiting)
        assert (lost["status"], lost["reason"], lost["exit_code"]) == ("FAILURE", "internal", None)
        assert lost["seq"] == 2 and lost["finished_at"] is not None
        assert lost["log"]["data"].endswith(LOST_NOTE)
        # Its history: the event that ended it follows the one the lost store had sent.
        assert [e["status"] for e in lost["events"]] == ["IN-PROGRESS", "FAILURE"]
        # A webhook asking for FAILURE gets that event.
        deliveries = (await http.get(f"/api/webhooks/{hook_id}/deliveries")).json()["items"]
        assert [d["event_id"] for d in deliveries] == [f"{waiting}-2"]

        r = await http.post("/api/jobs", json=_job())
        assert r.status_code == 202, r.text
        new = r.json()["build_id"]
        assert new == waiting + 1  # numbering went on where the lost store stopped
        after = await _final(http, new)
        assert after["status"] == "SUCCESS"
        assert "hello" in after["log"]["data"].lower()
        assert LOST_NOTE not in after["log"]["data"]
        # The old job is as it was, its log its own.
        again = await _final(http, done)
        assert (again["status"], again["seq"], again["log"]) == (
            before["status"],
            before["seq"],
            before["log"],
        )
        # The new job's events were ingested past the old watermark.
        assert (await http.get("/api/jobs")).json()["watermark"] > watermark
    assert "NATS stream behind Postgres" in stack.logs("gateway")


@pytest.mark.timeout(180)
async def test_a_store_lost_under_running_services_stops_them_and_numbering_goes_on(
    settings: Settings, stack: Stack, nats_server: EmbeddedNats | None
) -> None:
    """The store goes while every service runs. Each stops (gateway and scheduler with
    exit code 75, the runner on its lost heartbeat) for a supervisor to start again, and
    until a gateway has checked the new streams against Postgres nobody makes them: a
    scheduler and a runner started first wait, so no job takes an old build ID."""
    assert nats_server is not None, "this test wipes its own nats-server's store"
    await stack.start_all()
    async with httpx.AsyncClient(base_url=stack.url, headers=auth_headers(settings)) as http:
        done = (await http.post("/api/jobs", json=_job())).json()["build_id"]
        before = await _final(http, done)
        assert before["status"] == "SUCCESS"

    nats_server.stop()
    await asyncio.to_thread(shutil.rmtree, nats_server.store_dir)
    await asyncio.to_thread(nats_server.start)

    async def all_exited() -> bool:
        return all(proc.poll() is not None for proc in stack.procs.values())

    await eventually(all_exited, timeout=60)
    codes = {name: proc.returncode for name, proc in stack.procs.items()}
    assert codes["gateway"] == codes["scheduler"] == bus.STORE_LOST_EXIT, codes
    assert codes["runner-1"] != 0
    assert "NATS lost its store" in stack.logs("gateway")
    assert "NATS lost its store" in stack.logs("scheduler")

    # Started again before any gateway: they wait for it, and make none of its streams.
    await stack.start_scheduler("scheduler-again")
    await stack.start_runner("runner-again")

    async def both_waiting() -> bool:
        waiting = "waiting for a gateway to make"
        return all(waiting in stack.logs(name) for name in ("scheduler-again", "runner-again"))

    await eventually(both_waiting, timeout=60)
    nc = await nats.connect(settings.nats_url)
    try:
        for stream in settings.subjects.numbered_by_postgres:
            with pytest.raises(NotFoundError):
                await nc.jetstream().stream_info(stream)
    finally:
        await nc.close()

    await stack.start_gateway("gateway-again")
    async with httpx.AsyncClient(base_url=stack.url, headers=auth_headers(settings)) as http:
        r = await http.post("/api/jobs", json=_job())
        assert r.status_code == 202, r.text
        new = r.json()["build_id"]
        assert new == done + 1  # not 1: the gateway numbered on before taking it
        after = await _final(http, new)
        assert after["status"] == "SUCCESS" and "hello" in after["log"]["data"].lower()
        again = await _final(http, done)
        assert (again["status"], again["log"]) == (before["status"], before["log"])


async def test_a_stream_behind_postgres_that_holds_messages_is_left_alone(
    settings: Settings, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Written to since the loss: renumbering it would purge those messages, so nothing is
    purged and nothing ended (a person must look)."""
    await admin_token(database_url)  # migrates
    await stored_as_if_ingested(database_url, 5, "IN-PROGRESS", 1, {"events": 1})
    nc = await nats.connect(settings.nats_url)
    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    try:
        js = nc.jetstream()
        await bus.ensure_streams(js, settings)
        s = settings.subjects
        await js.publish(s.submit, b"{}")  # seq 1, below build 5, not yet admitted
        with caplog.at_level(logging.ERROR):
            done = await store_reset.repair(pool, js, settings)
        # The events stream was empty: renumbered. The submit stream holds a message: not.
        assert done == store_reset.Repair([s.events_stream], [])
        info = await js.stream_info(s.submit_stream)
        assert (info.state.first_seq, info.state.messages) == (1, 1)
        assert "behind Postgres but not empty" in caplog.text
        assert await pool.fetchval("SELECT status FROM jobs WHERE build_id = 5") == "IN-PROGRESS"
    finally:
        await pool.close()
        await nc.close()
