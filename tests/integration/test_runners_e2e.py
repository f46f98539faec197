"""Issue 3's runner promises end to end, with every service a real process: the
per-workspace queue (one APPLY-AUTO/DESTROY at a time, PLANs beside it, queue positions on
`/ws` and the API) and routing by architecture (arm64 jobs only to arm64 runners, none
→ `no-runner` after the queue timeout).

The helpers here are shared by the other `test_runners_*.py` files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.client import ApiError, XoogifyClient
from services.common.config import Settings
from services.common.timefmt import parse_time
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers, eventually

FINAL = {"SUCCESS", "FAILURE"}


def unique(prefix: str) -> str:
    """A name no other test uses (also a marker to find a job's processes by)."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def submit(
    xo: XoogifyClient,
    module: str,
    *,
    action: str = "APPLY-AUTO",
    org: str = "acme",
    env: str = "stg",
    module_type: str = "amd64/script",
    variables: dict[str, str] | None = None,
    sensitive: list[str] | None = None,
    timeout_s: int | None = None,
) -> int:
    job = await xo.submit(
        organization=org,
        environment=env,
        module_name=module,
        module_type=module_type,
        action=action,
        variables=variables,
        sensitive=sensitive,
        timeout_s=timeout_s,
    )
    assert job["status"] == "IN-PROGRESS"
    return int(job["build_id"])


async def stored_job(
    xo: XoogifyClient, build_id: int, timeout: float = 30.0, **expect: Any
) -> dict[str, Any]:
    """The job as the API shows it, once every field in `expect` has that value."""
    return await _stored(
        xo, build_id, timeout, lambda j: all(j.get(k) == v for k, v in expect.items())
    )


async def stored_final(xo: XoogifyClient, build_id: int, timeout: float = 30.0) -> dict[str, Any]:
    return await _stored(xo, build_id, timeout, lambda j: j["status"] in FINAL)


async def _stored(
    xo: XoogifyClient, build_id: int, timeout: float, ok: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        try:
            job = await xo.get_job(build_id)
        except ApiError as exc:
            if exc.status != 404:  # 404: just submitted, not stored yet
                raise
            return None
        return job if ok(job) else None

    return await eventually(probe, timeout=timeout)


async def runner_entry(
    xo: XoogifyClient, runner_id: str, timeout: float = 30.0, **expect: Any
) -> dict[str, Any]:
    """The runner as `GET /api/runners` lists it, once it shows the `expect`ed fields."""

    async def probe() -> dict[str, Any] | None:
        for item in await xo.runners():
            if item["runner_id"] == runner_id and all(item[k] == v for k, v in expect.items()):
                return item
        return None

    return await eventually(probe, timeout=timeout, interval=0.1)


def first_seq(ws: WsRecorder, build_id: int, status: str) -> int:
    """The stream sequence of the job's first update with `status` seen on `/ws`."""
    return min(i["stream_seq"] for i in ws.job_items(build_id) if i["status"] == status)


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """`xoogify ARGS` as a user runs it, against this stack."""
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        env=stack.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- the per-workspace queue ---------------------------------------------------------------


async def test_workspace_queue_one_apply_at_a_time_plans_beside(stack: Stack) -> None:
    await stack.start_gateway()
    await stack.start_scheduler()
    await stack.start_runner("runner-1")
    await stack.start_runner("runner-2")
    slow = {"seconds": "3"}
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        first = await submit(xo, "slow", variables=slow)
        await ws.wait_job_status(first, {"WORKING"})
        second = await submit(xo, "slow", variables=slow)
        third = await submit(xo, "slow", variables=slow)
        plan = await submit(xo, "slow", action="PLAN", variables={"seconds": "1"})

        # Queued behind the first: positions 1 and 2, on /ws and over the API.
        queued = await ws.wait_job_status(second, {"IN-PROGRESS"})
        assert queued["queue_position"] == 1
        queued_third = await ws.wait_job_status(third, {"IN-PROGRESS"})
        assert queued_third["queue_position"] == 2
        await stored_job(xo, second, status="IN-PROGRESS", queue_position=1)
        await stored_job(xo, third, status="IN-PROGRESS", queue_position=2)

        # The PLAN of the same workspace runs at once, while the first APPLY-AUTO works.
        plan_final = await ws.wait_job_status(plan, FINAL)
        assert plan_final["status"] == "SUCCESS"
        assert ws.job_items(plan)[0]["queue_position"] is None
        await ws.wait_job_status(first, FINAL)
        assert first_seq(ws, plan, "WORKING") < first_seq(ws, first, "SUCCESS")

        # The third moves up to 1 when the first ends; it shows 1 over the API too.
        await ws.wait_for(
            lambda m: (
                m.get("type") == "jobs"
                and any(i["build_id"] == third and i["queue_position"] == 1 for i in m["items"])
            )
        )
        await stored_job(xo, third, status="IN-PROGRESS", queue_position=1)

        for build_id in (second, third):
            await ws.wait_job_status(build_id, FINAL, timeout=60)

    # Each starts only after the one ahead of it is final.
    for ahead, behind in ((first, second), (second, third)):
        assert first_seq(ws, behind, "WORKING") > first_seq(ws, ahead, "SUCCESS")
    third_positions = [i["queue_position"] for i in ws.job_items(third)]
    assert third_positions == [2, 1, None, None, None]
    assert [i["status"] for i in ws.job_items(third)] == [
        "IN-PROGRESS",
        "IN-PROGRESS",
        "IN-PROGRESS",
        "WORKING",
        "SUCCESS",
    ]
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        jobs = [await stored_final(xo, b) for b in (first, second, third)]
    for ahead_job, behind_job in itertools.pairwise(jobs):
        assert behind_job["started_at"] >= ahead_job["finished_at"]
        assert behind_job["status"] == "SUCCESS"


# --- routing by architecture ---------------------------------------------------------------


async def test_arm64_jobs_go_only_to_the_arm64_runner(stack: Stack) -> None:
    await stack.start_gateway()
    await stack.start_scheduler()
    await stack.start_runner("runner-amd", arch="amd64", kinds="script,terraform")
    await stack.start_runner("runner-arm", arch="arm64", kinds="script")
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        await runner_entry(xo, "runner-arm", arch="arm64", state="idle")
        arm = [await submit(xo, "hello", module_type="arm64/script", env=f"a{i}") for i in range(3)]
        amd = [await submit(xo, "hello", module_type="amd64/script", env=f"b{i}") for i in range(2)]
        arm_jobs = [await stored_final(xo, b, timeout=60) for b in arm]
        amd_jobs = [await stored_final(xo, b, timeout=60) for b in amd]
    assert [(j["status"], j["runner_id"]) for j in arm_jobs] == [("SUCCESS", "runner-arm")] * 3
    assert [(j["status"], j["runner_id"]) for j in amd_jobs] == [("SUCCESS", "runner-amd")] * 2


async def test_no_runner_of_that_arch_fails_after_the_queue_timeout(
    settings: Settings, tmp_path: Path
) -> None:
    stack = Stack(dataclasses.replace(settings, queue_timeout_s=3), tmp_path / "logs")
    try:
        await stack.start_all()  # one amd64 runner only
        async with (
            WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
            XoogifyClient(stack.url, stack.settings.token) as xo,
        ):
            build_id = await submit(xo, "hello", module_type="arm64/script")
            # It waits, IN-PROGRESS, meanwhile.
            await stored_job(xo, build_id, status="IN-PROGRESS")
            final = await ws.wait_job_status(build_id, FINAL, timeout=30)
            assert (final["status"], final["reason"]) == ("FAILURE", "no-runner")
            assert final["runner_id"] is None and final["started_at"] is None
            job = await stored_final(xo, build_id)
        assert [e["status"] for e in job["events"]] == ["IN-PROGRESS", "FAILURE"]
        waited = epoch_s(job["finished_at"]) - epoch_s(job["submitted_at"])
        assert 2.5 <= waited < 15, waited
    finally:
        await stack.stop_all()


def epoch_s(stamp: str) -> float:
    return parse_time(stamp).timestamp()


async def test_cli_and_api_agree_on_queue_positions(stack: Stack) -> None:
    """`xoogify jobs --json` shows the queue position the API shows."""
    await stack.start_all()
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        first = await submit(xo, "slow", variables={"seconds": "30"})
        await stored_job(xo, first, status="WORKING")
        second = await submit(xo, "slow", variables={"seconds": "1"})
        await stored_job(xo, second, queue_position=1)
        listed = await asyncio.to_thread(cli, stack, "jobs", "--org", "acme", "--json")
        assert listed.returncode == 0, listed.stderr
        assert f'"build_id":{second}' in listed.stdout.replace(" ", "")
        assert '"queue_position":1' in listed.stdout.replace(" ", "")
        await xo.cancel(first)
        await stored_job(xo, second, status="WORKING", timeout=30)


async def test_a_busy_runner_is_not_no_runner_and_a_late_runner_is_in_time(
    settings: Settings, tmp_path: Path
) -> None:
    """`no-runner` means no live runner of that arch + kind: a job waiting behind a busy
    one is not failed, and a job whose runner starts within the queue timeout runs."""
    stack = Stack(dataclasses.replace(settings, queue_timeout_s=4), tmp_path / "logs")
    try:
        await stack.start_all()  # runner-1, amd64
        async with (
            WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
            XoogifyClient(stack.url, stack.settings.token) as xo,
        ):
            busy = await submit(xo, "slow", env="one", variables={"seconds": "6"})
            await ws.wait_job_status(busy, {"WORKING"})
            waiting = await submit(xo, "hello", env="two")
            arm = await submit(xo, "hello", module_type="arm64/script")
            await stack.start_runner("runner-arm", arch="arm64", kinds="script")

            arm_final = await ws.wait_job_status(arm, FINAL, timeout=30)
            assert (arm_final["status"], arm_final["runner_id"]) == ("SUCCESS", "runner-arm")
            final = await ws.wait_job_status(waiting, FINAL, timeout=30)
            assert (final["status"], final["runner_id"]) == ("SUCCESS", "runner-1")
            job = await stored_final(xo, waiting)
        # It did wait longer than the queue timeout for the busy runner.
        assert epoch_s(job["started_at"]) - epoch_s(job["submitted_at"]) > 4
    finally:
        await stack.stop_all()
