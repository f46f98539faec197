"""Two schedulers on the JetStream cluster: one leads; SIGKILL it, the standby takes over
from the state in KV, and a job submitted afterwards runs to SUCCESS exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from services.common.config import Settings
from services.common.embedded import free_port
from tests.cluster.failover import job_body, submit_until_accepted, the_leader, wait_takeover
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers, eventually


async def test_standby_takes_over_after_the_leader_is_killed(
    stack: Stack, settings: Settings, tmp_path: Path
) -> None:
    evidence = tmp_path / "runs.txt"
    schedulers = {"scheduler-1": free_port(), "scheduler-2": free_port()}
    await stack.start_gateway()
    for name, port in schedulers.items():
        await stack.start_scheduler(name, metrics_port=port)
    await stack.start_runner("runner-1")
    leader = await the_leader(stack, schedulers)
    standby = next(name for name in schedulers if name != leader)

    async with (
        httpx.AsyncClient(base_url=stack.url, headers=auth_headers(settings)) as client,
        WsRecorder(stack.ws_url, headers=auth_headers(settings)) as ws,
    ):
        before = await submit_until_accepted(client, job_body("e1", "PLAN", str(evidence)), "k1")
        await ws.wait_job_status(before, {"SUCCESS"})

        stack.kill(leader)
        took = await wait_takeover(standby, schedulers[standby])
        print(f"takeover after SIGKILL of the leader: {took:.2f} s")
        async with httpx.AsyncClient() as probe:
            health = await probe.get(f"http://127.0.0.1:{schedulers[standby]}/healthz")
        assert health.status_code == 200 and health.json()["leader"] is True

        after = await submit_until_accepted(
            client, job_body("e1", "APPLY-AUTO", str(evidence)), "k2"
        )
        done = await ws.wait_job_status(after, {"SUCCESS", "FAILURE"})
        assert done["status"] == "SUCCESS", done

        async def stored() -> dict[str, Any] | None:
            # The websocket runs ahead of Postgres: wait for the stored record.
            job = (await client.get(f"/api/jobs/{after}")).json()
            return job if job["status"] == "SUCCESS" else None

        job = await eventually(stored, timeout=30)
    assert [e["seq"] for e in job["events"]] == [1, 2, 3]
    assert [e["status"] for e in job["events"]] == ["IN-PROGRESS", "WORKING", "SUCCESS"]
    assert sorted(evidence.read_text().split()) == sorted([str(before), str(after)])
    assert '"msg":"scheduler leads"' in stack.logs(standby)
