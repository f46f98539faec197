"""`GET /api/runners` end to end: every live runner with its arch, kinds and labels, `idle`
or `busy` with the job it runs, and `lost` once a SIGKILLed runner's key has expired."""

from __future__ import annotations

import socket

from services.client import XoogifyClient
from services.common.timefmt import parse_time
from services.runner.registry import VERSION
from tests.integration.test_runners_e2e import FINAL, runner_entry, submit
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers


async def test_runners_listed_idle_busy_and_lost(stack: Stack) -> None:
    await stack.start_gateway()
    await stack.start_scheduler()
    # As an operator starts them: the machine's name for the arch, a label.
    stack.spawn(
        "runner-x86",
        ["runner", "--arch", "x86_64", "--kinds", "script,terraform", "--label", "zone=a"]
        + ["--runner-id", "runner-x86"],
    )
    await stack.start_runner("runner-arm", arch="aarch64", kinds="script")
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        x86 = await runner_entry(xo, "runner-x86", state="idle")
        arm = await runner_entry(xo, "runner-arm", state="idle")
        assert (x86["arch"], x86["kinds"], x86["labels"]) == (
            "amd64",
            ["script", "terraform"],
            {"zone": "a"},
        )
        assert (arm["arch"], arm["kinds"], arm["labels"]) == ("arm64", ["script"], {})
        for item in (x86, arm):
            assert item["current_build_id"] is None
            assert item["version"] == VERSION
            assert item["hostname"] == socket.gethostname()
            parse_time(item["last_seen"])  # RFC 3339
        assert {i["runner_id"] for i in await xo.runners()} == {"runner-x86", "runner-arm"}

        # Busy with its job, the other one still idle.
        build_id = await submit(xo, "slow", module_type="arm64/script", variables={"seconds": "60"})
        await ws.wait_job_status(build_id, {"WORKING"})
        busy = await runner_entry(xo, "runner-arm", state="busy")
        assert busy["current_build_id"] == build_id
        assert (await runner_entry(xo, "runner-x86"))["state"] == "idle"

        # Killed: listed lost after its key expires (3 heartbeats of 1 s), and the job is
        # runner-lost.
        stack.kill("runner-arm")
        lost = await runner_entry(xo, "runner-arm", state="lost", timeout=20)
        assert lost["current_build_id"] is None and lost["arch"] == "arm64"
        final = await ws.wait_job_status(build_id, FINAL, timeout=30)
        assert (final["status"], final["reason"]) == ("FAILURE", "runner-lost")
        assert (await runner_entry(xo, "runner-x86"))["state"] == "idle"
