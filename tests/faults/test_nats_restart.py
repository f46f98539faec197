"""Issue 6: `nats-server` (JetStream, file store) killed in the middle of a burst and
started again on the same port and store. Every service reconnects by itself; no job that
got a 202 is lost."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from services.common.config import Settings
from services.common.embedded import EmbeddedNats
from tests.faults.burst import Burst, count_final, start_services
from tests.faults.modules import Trace
from tests.faults.nothing_lost import check_nothing_lost, record_figures, wait_all_final
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers

JOBS = 600
OUTAGE_S = 1.0
# The default heartbeat (registry TTL 15 s), not the tests' 1 s: a runner that cannot
# refresh its key for longer than the TTL stops on purpose (runner/registry.py), and the
# outage plus a loaded machine's JetStream recovery and reconnect took 3.6 s here.
HEARTBEAT_S = 5.0


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, heartbeat_s=HEARTBEAT_S)


# A burst on a shared, loaded machine can take longer than the suite's default.
@pytest.mark.timeout(300)
async def test_nats_restart_mid_burst(
    settings: Settings, stack: Stack, trace: Trace, nats_server: EmbeddedNats | None
) -> None:
    assert nats_server is not None, "this test restarts its own nats-server"
    await start_services(stack)
    # A live page open through the outage: the hub's consumer must come back by itself.
    async with WsRecorder(stack.ws_url, headers=auth_headers(settings)) as ws:
        burst = Burst(settings, JOBS)
        submitting = await burst.start()

        final_at_fault = await count_final(settings.database_url)
        accepted_at_fault = len(burst.accepted)
        nats_server.kill()
        down = time.monotonic()
        await asyncio.sleep(OUTAGE_S)  # the length of the outage, not a synchronisation
        await asyncio.to_thread(nats_server.start)
        await stack.wait_ready(timeout=60)
        ready_s = time.monotonic() - down

        await submitting
        assert len(burst.build_ids) == JOBS
        settle_s = await wait_all_final(settings.database_url, burst.build_ids)
        # The last job submitted ran after the restart: the socket opened before hears it.
        await ws.wait_job_status(max(burst.build_ids), {"SUCCESS"}, timeout=60)
    figures = await check_nothing_lost(settings, burst.build_ids, trace)
    figures.update(
        {
            "fault": f"nats-server SIGKILL, {OUTAGE_S:g} s down, restart on the same store",
            "heartbeat_s": HEARTBEAT_S,
            "faults_injected": 1,
            "accepted_before_fault": accepted_at_fault,
            "in_flight_at_fault": accepted_at_fault - final_at_fault,
            "client_retries": burst.retries,
            "client_errors": burst.errors,
            "gateway_ready_again_s": round(ready_s, 2),
            "all_final_after_burst_s": round(settle_s, 2),
        }
    )
    record_figures("nats_restart", figures)
    for name in ("scheduler", *(f"runner-{i + 1}" for i in range(3))):
        assert stack.procs[name].poll() is None, f"{name} exited:\n{stack.logs(name)[-3000:]}"
    assert figures["final_statuses"] == {"SUCCESS": JOBS}
