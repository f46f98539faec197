"""Issue 6: the scheduler SIGKILLed in the middle of a burst and started again. Its state
is in JetStream KV, so the new process carries on: no job stuck, none run twice (one
execution per build by the trace module's evidence, one WORKING event per build)."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from services.common.config import Settings
from tests.faults.burst import Burst, start_services
from tests.faults.modules import Trace
from tests.faults.nothing_lost import check_nothing_lost, record_figures, wait_all_final
from tests.stack import Stack

JOBS = 600


# A burst on a shared, loaded machine can take longer than the suite's default.
@pytest.mark.timeout(300)
async def test_scheduler_sigkill_mid_burst(settings: Settings, stack: Stack, trace: Trace) -> None:
    await start_services(stack)
    burst = Burst(settings, JOBS)
    submitting = await burst.start()

    conn = await asyncpg.connect(settings.database_url)
    try:
        counts = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'WORKING') AS working,"
            " count(*) FILTER (WHERE status IN ('SUCCESS', 'FAILURE')) AS final FROM jobs"
        )
        assert counts is not None
        accepted_at_kill = len(burst.accepted)
        stack.kill("scheduler")
        killed = time.monotonic()
        # Submissions go on meanwhile: they wait in the submit stream.
        await burst.wait_accepted(accepted_at_kill + JOBS // 6)
        await stack.start_scheduler("scheduler-again")
        await submitting

        async def one_more_final() -> float:
            # The first job the new scheduler finishes: the time it took to take over.
            base = await conn.fetchval(
                "SELECT count(*) FROM jobs WHERE status IN ('SUCCESS', 'FAILURE')"
            )
            while True:
                now = await conn.fetchval(
                    "SELECT count(*) FROM jobs WHERE status IN ('SUCCESS', 'FAILURE')"
                )
                if now > base:
                    return time.monotonic() - killed
                await asyncio.sleep(0.1)  # a poll interval inside the caller's deadline

        takeover_s = await asyncio.wait_for(one_more_final(), 60)
    finally:
        await conn.close()
    settle_s = await wait_all_final(settings.database_url, burst.build_ids)
    figures = await check_nothing_lost(settings, burst.build_ids, trace)
    figures.update(
        {
            "fault": "scheduler SIGKILL, then restart",
            "faults_injected": 1,
            "accepted_before_fault": accepted_at_kill,
            "in_flight_at_fault": accepted_at_kill - counts["final"],
            "working_at_fault": counts["working"],
            "first_final_after_kill_s": round(takeover_s, 2),
            "all_final_after_burst_s": round(settle_s, 2),
        }
    )
    record_figures("scheduler_kill", figures)
    # The kill is sudden, but the runners kept running and reporting: every job succeeds.
    assert figures["final_statuses"] == {"SUCCESS": JOBS}
