"""The scheduler when things go wrong: restart with jobs in flight, a runner that dies, a
job that overruns its timeout, and the real process stopping on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats.errors
import pytest

from services.common import codec
from services.common.config import Settings
from services.common.embedded import free_port
from tests.integration.test_scheduler_life import FakeRunner, Harness, make_harness, submission
from tests.stack import settings_env
from tests.support import eventually, gateway_streams


@pytest.fixture
async def h(settings: Settings) -> AsyncIterator[Harness]:
    async for harness in make_harness(settings):
        yield harness


async def _dispatched(h: Harness, expected: int) -> bool:
    return await h.dispatch_count() == expected


async def test_restart_keeps_jobs_without_second_dispatch(h: Harness) -> None:
    async with FakeRunner(h, "runner-1"):
        running = await h.submit(submission(action="APPLY-AUTO"))
        waiting = await h.submit(submission(action="APPLY-AUTO"))
        plan = await h.submit(submission(action="PLAN", module_name="db"))
        await h.events.status(plan, "IN-PROGRESS")
        msg = await h.take_dispatch()
        assert codec.loads(msg.data)["build_id"] == running
        assert (await h.claim(running, "runner-1"))["granted"]
        await msg.ack()
        await h.events.status(running, "WORKING")
        # The acked message leaves the work queue; the plan's stays.
        await eventually(lambda: _dispatched(h, 1), timeout=10)

        await h.halt()
        await h.start()

        # Nothing dispatched twice, nothing forgotten.
        assert await h.dispatch_count() == 1
        assert (await h.claim(running, "runner-2"))["reason"] == "taken"
        assert (await h.claim(waiting, "runner-2"))["reason"] == "queued"
        assert (await h.claim(plan, "runner-2"))["granted"]
        # The restart republished nothing: anything it had would be on the stream before
        # the plan's WORKING event.
        await h.events.status(plan, "WORKING")
        assert [e["seq"] for e in h.events.of(running)] == [1, 2]
        assert [e["seq"] for e in h.events.of(waiting)] == [1]

        await h.report(running, "runner-1", exit_code=0)
        await h.events.status(running, "SUCCESS")
        moved = await h.events.wait(lambda e: e["build_id"] == waiting and e["seq"] == 2)
        assert moved["queue_position"] is None
    assert [e["seq"] for e in h.events.of(running)] == [1, 2, 3]
    assert [e["seq"] for e in h.events.of(plan)] == [1, 2]


async def test_dead_runner_means_runner_lost(h: Harness) -> None:
    runner = FakeRunner(h, "runner-9")
    async with runner:
        build_id = await h.submit(submission())
        await (await h.take_dispatch()).ack()
        assert (await h.claim(build_id, "runner-9"))["granted"]
        runner.die()  # its key expires after ~3 heartbeats; no report ever comes
        final = await h.events.status(build_id, "FAILURE", timeout=20)
    assert (final["reason"], final["runner_id"], final["seq"]) == ("runner-lost", "runner-9", 3)


async def test_timeout_asks_runner_to_stop(h: Harness) -> None:
    stops: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def on_stop(m: Any) -> None:
        stops.put_nowait(codec.loads(m.data))

    async with FakeRunner(h, "runner-1"):
        build_id = await h.submit(submission(timeout_s=1))
        sub = await h.nc.subscribe(h.s.cancel(build_id), cb=on_stop)
        await (await h.take_dispatch()).ack()
        assert (await h.claim(build_id, "runner-1"))["granted"]
        stop = await asyncio.wait_for(stops.get(), 10)
        assert stop["reason"] == "timeout"
        await sub.unsubscribe()
        await h.report(build_id, "runner-1", reason="timeout")
        final = await h.events.status(build_id, "FAILURE")
    assert final["reason"] == "timeout"


async def test_process_serves_metrics_and_stops_on_sigterm(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    await gateway_streams(settings)
    log_path = tmp_path / "scheduler.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "scheduler", "--metrics-port", str(port)],
            env=settings_env(settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        async with httpx.AsyncClient() as client:

            async def metrics() -> str | None:
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
                except httpx.HTTPError:
                    return None
                return r.text if r.status_code == 200 else None

            text = await eventually(metrics, timeout=20)
            assert "xoogify_scheduler_claims_total" in text
            health = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            assert health.status_code == 200
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 12)
        logs = log_path.read_text()
        assert code == 0, logs
        assert '"msg":"scheduler stopped"' in logs
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


async def test_lost_compare_and_set_reloads_state(h: Harness) -> None:
    """Another writer touched a job's record: our next write to it fails, nothing is
    granted on a stale view, state is reloaded from KV and the retry works."""
    async with FakeRunner(h, "runner-1"):
        build_id = await h.submit(submission())
        await h.events.status(build_id, "IN-PROGRESS")
        kv = await h.js.key_value(h.s.sched_bucket)
        entry = await kv.get(f"job.{build_id}")
        await kv.put(f"job.{build_id}", entry.value)  # same content, new revision

        with pytest.raises(nats.errors.TimeoutError):
            await h.claim(build_id, "runner-1")  # CAS lost: no answer, the runner retries
        assert (await h.claim(build_id, "runner-1"))["granted"]
        working = await h.events.status(build_id, "WORKING")
    assert working["seq"] == 2 and [e["seq"] for e in h.events.of(build_id)] == [1, 2]
