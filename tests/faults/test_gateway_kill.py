"""Issue 6: the gateway SIGKILLed in the middle of a burst of 2,000 jobs, then started
again. Submissions retried with their Idempotency-Key while it is down are the same jobs;
all 2,000 reach their final status in Postgres, each event stored exactly once."""

from __future__ import annotations

import time

import pytest

from services.common.config import Settings
from tests.faults.burst import Burst, count_final, start_services
from tests.faults.modules import Trace
from tests.faults.nothing_lost import check_nothing_lost, record_figures, wait_all_final
from tests.stack import Stack

JOBS = 2_000


# A burst on a shared, loaded machine can take longer than the suite's default.
@pytest.mark.timeout(300)
async def test_gateway_sigkill_mid_burst(settings: Settings, stack: Stack, trace: Trace) -> None:
    await start_services(stack)
    burst = Burst(settings, JOBS)
    submitting = await burst.start()

    final_at_kill = await count_final(settings.database_url)
    accepted_at_kill = len(burst.accepted)
    stack.kill("gateway")
    killed = time.monotonic()
    await stack.start_gateway("gateway-again")
    ready_s = time.monotonic() - killed

    await submitting
    assert len(burst.build_ids) == JOBS  # one job per key, however often it was retried
    settle_s = await wait_all_final(settings.database_url, burst.build_ids)
    figures = await check_nothing_lost(settings, burst.build_ids, trace)
    figures.update(
        {
            "fault": "gateway SIGKILL, then restart",
            "faults_injected": 1,
            "accepted_before_fault": accepted_at_kill,
            "in_flight_at_fault": accepted_at_kill - final_at_kill,
            "client_retries": burst.retries,
            "client_errors": burst.errors,
            "gateway_ready_again_s": round(ready_s, 2),
            "all_final_after_burst_s": round(settle_s, 2),
            "burst_s": round(burst.finished - burst.started, 2),
        }
    )
    record_figures("gateway_kill", figures)
    assert figures["final_statuses"] == {"SUCCESS": JOBS}
