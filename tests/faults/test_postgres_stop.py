"""Issue 6: Postgres stopped for 10 s in the middle of a burst (a Postgres of this test's
own: the session's is shared). Meanwhile `/readyz` says 503 naming Postgres, submissions
are still accepted (they go to JetStream), and ingestion resumes by itself once Postgres
is back: nothing lost."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from services.common.config import Settings
from services.common.embedded import EmbeddedPostgres
from tests.faults.burst import Burst, count_final, start_services
from tests.faults.modules import Trace
from tests.faults.nothing_lost import check_nothing_lost, record_figures, wait_all_final
from tests.stack import Stack
from tests.support import auth_headers, eventually

JOBS = 600
OUTAGE_S = 10.0


@pytest.fixture
def database_url(own_database_url: str) -> str:
    """The stack's database lives on the Postgres this test may stop."""
    return own_database_url


# A burst on a shared, loaded machine can take longer than the suite's default.
@pytest.mark.timeout(300)
async def test_postgres_down_10s_mid_burst(
    settings: Settings, stack: Stack, trace: Trace, own_postgres: EmbeddedPostgres
) -> None:
    await start_services(stack)
    burst = Burst(settings, JOBS)
    submitting = await burst.start()

    final_at_fault = await count_final(settings.database_url)
    accepted_at_fault = len(burst.accepted)
    async with httpx.AsyncClient(
        base_url=settings.gateway_url, headers=auth_headers(settings), timeout=5
    ) as http:
        await asyncio.to_thread(own_postgres.stop)
        down = time.monotonic()

        async def not_ready() -> httpx.Response | None:
            r = await http.get("/readyz")
            return r if r.status_code == 503 else None

        first = await eventually(not_ready, timeout=10)
        assert first.json()["postgres"] == "down" and first.json()["nats"] == "up"
        # For the rest of the outage /readyz keeps saying so, and submissions go on.
        answers = []
        accepted_while_down = len(burst.accepted)
        while time.monotonic() - down < OUTAGE_S:
            answers.append((await http.get("/readyz")).status_code)
            await asyncio.sleep(0.5)  # sampling /readyz through the outage
        assert set(answers) == {503}, answers
        accepted_while_down = len(burst.accepted) - accepted_while_down

        await asyncio.to_thread(own_postgres.start)
        back = time.monotonic()
        await stack.wait_ready(timeout=60)
        ready_s = time.monotonic() - back

    await submitting
    assert len(burst.build_ids) == JOBS
    settle_s = await wait_all_final(settings.database_url, burst.build_ids)
    figures = await check_nothing_lost(settings, burst.build_ids, trace)
    figures.update(
        {
            "fault": f"Postgres stopped (fast shutdown) for {OUTAGE_S:g} s, then started",
            "faults_injected": 1,
            "accepted_before_fault": accepted_at_fault,
            "in_flight_at_fault": accepted_at_fault - final_at_fault,
            "accepted_while_postgres_down": accepted_while_down,
            "readyz_503_samples": len(answers),
            "client_retries": burst.retries,
            "client_errors": burst.errors,
            "ready_after_postgres_back_s": round(ready_s, 2),
            "all_final_after_burst_s": round(settle_s, 2),
        }
    )
    record_figures("postgres_stop", figures)
    assert figures["final_statuses"] == {"SUCCESS": JOBS}
    assert accepted_while_down > 0, "no submission was accepted while Postgres was down"
