"""Issue 3's stop paths end to end on real processes: cancel (queued, no runner, running,
already final; over the API and with `xoogify cancel`), timeout, a SIGKILLed runner
(`runner-lost`, listed `lost`) and the SIGTERM drain (finish, or cancel at the deadline)."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

import pytest

from services.client import ApiError, XoogifyClient
from tests.integration.test_runner_jobs import job_pids
from tests.integration.test_runners_e2e import (
    FINAL,
    cli,
    epoch_s,
    runner_entry,
    stored_final,
    stored_job,
    submit,
    unique,
)
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers, eventually


async def no_processes(marker: str) -> None:
    """Wait until no process of the job (found by its organization) is left."""

    async def gone() -> bool:
        return not job_pids(marker)

    await eventually(gone, timeout=15)


async def some_processes(marker: str) -> list[int]:
    """Wait until the job's process runs (WORKING is published before it starts)."""

    async def pids() -> list[int]:
        return job_pids(marker)

    return await eventually(pids, timeout=15)


# --- cancel --------------------------------------------------------------------------------


async def test_cancel_queued_running_and_final(stack: Stack) -> None:
    await stack.start_all()
    org = unique("org")
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        running = await submit(xo, "slow", org=org, variables={"seconds": "600"})
        await ws.wait_job_status(running, {"WORKING"})
        await some_processes(org)

        # Queued behind it in its workspace: cancelled at once, never started.
        queued = await submit(xo, "slow", org=org, variables={"seconds": "1"})
        await stored_job(xo, queued, queue_position=1)
        answer = await xo.cancel(queued)
        assert (answer["status"], answer["reason"]) == ("FAILURE", "cancelled")
        assert answer["started_at"] is None and answer["runner_id"] is None
        final = await ws.wait_job_status(queued, FINAL, timeout=5)
        assert (final["status"], final["reason"]) == ("FAILURE", "cancelled")

        # Running: FAILURE/cancelled once its process is stopped, and the process is gone.
        answer = await xo.cancel(running)
        assert answer["build_id"] == running
        final = await ws.wait_job_status(running, FINAL, timeout=30)
        assert (final["status"], final["reason"]) == ("FAILURE", "cancelled")
        assert final["runner_id"] == "runner-1"
        await no_processes(org)
        stored = await stored_final(xo, running)
        assert [e["status"] for e in stored["events"]] == ["IN-PROGRESS", "WORKING", "FAILURE"]

        # A second cancel of a final job: 409.
        for build_id in (running, queued):
            with pytest.raises(ApiError) as caught:
                await xo.cancel(build_id)
            assert caught.value.status == 409

        # The runner is free again: a new job runs.
        after = await submit(xo, "hello", org=org)
        assert (await ws.wait_job_status(after, FINAL))["status"] == "SUCCESS"


async def test_cli_cancel_of_a_job_without_runner(stack: Stack) -> None:
    await stack.start_all()  # amd64 only; the queue timeout is long
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        build_id = await submit(xo, "hello", module_type="arm64/script")
        await stored_job(xo, build_id, status="IN-PROGRESS")
        started = time.monotonic()
        done = await asyncio.to_thread(cli, stack, "cancel", str(build_id))
        assert done.returncode == 0, done.stderr
        job = await stored_job(xo, build_id, status="FAILURE", timeout=10)
        assert job["reason"] == "cancelled"
        assert time.monotonic() - started < 10  # at once, not after the queue timeout
        again = await asyncio.to_thread(cli, stack, "cancel", str(build_id))
        assert again.returncode == 2
        assert "409" in again.stderr or "ended" in again.stderr


# --- timeout -------------------------------------------------------------------------------


async def test_timeout_ends_failure_timeout(stack: Stack) -> None:
    await stack.start_all()
    org = unique("org")
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        build_id = await submit(xo, "slow", org=org, variables={"seconds": "600"}, timeout_s=2)
        await some_processes(org)
        final = await ws.wait_job_status(build_id, FINAL, timeout=30)
        assert (final["status"], final["reason"]) == ("FAILURE", "timeout")
        await no_processes(org)
        log = await xo.read_logs(build_id)
        assert "slow: second 1 of 600" in log["data"]
        assert "slow: done" not in log["data"]


# --- a runner killed mid-job ---------------------------------------------------------------


async def test_sigkilled_runner_job_is_runner_lost_and_its_queue_moves_on(stack: Stack) -> None:
    await stack.start_all()
    org = unique("org")
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        build_id = await submit(xo, "slow", org=org, variables={"seconds": "600"})
        await ws.wait_job_status(build_id, {"WORKING"})
        await some_processes(org)
        busy = await runner_entry(xo, "runner-1", state="busy")
        assert busy["current_build_id"] == build_id
        behind = await submit(xo, "slow", org=org, variables={"seconds": "1"})
        await stored_job(xo, behind, queue_position=1)

        async def logged() -> bool:
            return "slow: second 1 of 600" in (await xo.read_logs(build_id))["data"]

        await eventually(logged, timeout=15)
        killed_at = time.monotonic()
        stack.kill("runner-1")
        await stack.start_runner("runner-2")
        final = await ws.wait_job_status(build_id, FINAL, timeout=30)
        assert time.monotonic() - killed_at < 30
        assert (final["status"], final["reason"]) == ("FAILURE", "runner-lost")
        # The job's shell died with its runner (PDEATHSIG), nothing is left behind.
        await no_processes(org)

        # Its registry key expires (3 heartbeats): the API lists it as lost.
        lost = await runner_entry(xo, "runner-1", state="lost")
        assert lost["current_build_id"] is None

        # Its log has no eof chunk, yet following it ends (exit 1: the job failed).
        followed = await asyncio.to_thread(cli, stack, "logs", str(build_id), "--follow")
        assert followed.returncode == 1, followed.stderr
        assert "slow: second 1 of 600" in followed.stdout

        # The workspace is free again: the next APPLY-AUTO runs, on the live runner.
        done = await ws.wait_job_status(behind, FINAL, timeout=30)
        assert (done["status"], done["runner_id"]) == ("SUCCESS", "runner-2")


# --- SIGTERM drain -------------------------------------------------------------------------


async def test_sigterm_drain_finishes_the_job_and_takes_no_more(stack: Stack) -> None:
    await stack.start_gateway()
    await stack.start_scheduler()
    await stack.start_runner("runner-1", XOOGIFY_DRAIN_TIMEOUT_S="30")
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        build_id = await submit(xo, "slow", variables={"seconds": "3"})
        await ws.wait_job_status(build_id, {"WORKING"})
        proc = stack.procs["runner-1"]
        proc.send_signal(signal.SIGTERM)
        # WORKING is published at the grant, a moment before the runner says busy: wait for
        # the registry to show both the drain and the job.
        await runner_entry(xo, "runner-1", state="draining", current_build_id=build_id)

        # Submitted while it drains: it must not take it.
        later = await submit(xo, "hello", env="other")
        final = await ws.wait_job_status(build_id, FINAL, timeout=30)
        assert (final["status"], final["runner_id"]) == ("SUCCESS", "runner-1")
        assert await asyncio.to_thread(proc.wait, 20) == 0

        job = await xo.get_job(later)
        assert job["status"] == "IN-PROGRESS" and job["runner_id"] is None
        await stack.start_runner("runner-2")
        done = await ws.wait_job_status(later, FINAL, timeout=30)
        assert (done["status"], done["runner_id"]) == ("SUCCESS", "runner-2")
        log = await xo.read_logs(build_id)
        assert "slow: done" in log["data"]


async def test_sigterm_drain_deadline_cancels_the_job(stack: Stack) -> None:
    await stack.start_gateway()
    await stack.start_scheduler()
    await stack.start_runner("runner-1", XOOGIFY_DRAIN_TIMEOUT_S="1")
    org = unique("org")
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        build_id = await submit(xo, "slow", org=org, variables={"seconds": "60"})
        await ws.wait_job_status(build_id, {"WORKING"})
        await some_processes(org)
        proc = stack.procs["runner-1"]
        proc.send_signal(signal.SIGTERM)
        final = await ws.wait_job_status(build_id, FINAL, timeout=30)
        assert (final["status"], final["reason"]) == ("FAILURE", "cancelled")
        assert await asyncio.to_thread(proc.wait, 20) == 0
        await no_processes(org)
        log = await stored_final(xo, build_id)
        assert log["runner_id"] == "runner-1"


async def test_drain_of_an_idle_runner_is_quick(stack: Stack) -> None:
    """A runner with nothing to do leaves at once on SIGTERM, exit 0, and is no longer
    listed: it deleted its key, so it is stopped, not `lost` (a killed runner's key expires
    instead, and that one is listed `lost`: the SIGKILL test above)."""
    await stack.start_gateway()
    await stack.start_runner("runner-1")
    async with XoogifyClient(stack.url, stack.settings.token) as xo:
        await runner_entry(xo, "runner-1", state="idle")
        started = time.monotonic()
        assert await stack.stop("runner-1") == 0
        assert time.monotonic() - started < 10

        async def unlisted() -> bool:
            return all(r["runner_id"] != "runner-1" for r in await xo.runners())

        await eventually(unlisted, timeout=10)


async def test_cancel_of_the_waiting_head_moves_the_queue_on(stack: Stack) -> None:
    """The head of a workspace queue that waits for a runner is cancelled: the one behind
    it becomes the head (position null) and is the one a runner gets when it comes."""
    await stack.start_all()  # no arm64 runner yet
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        head = await submit(xo, "hello", module_type="arm64/script")
        behind = await submit(xo, "hello", module_type="arm64/script")
        await stored_job(xo, behind, queue_position=1)
        answer = await xo.cancel(head)
        assert (answer["status"], answer["reason"]) == ("FAILURE", "cancelled")
        moved = await stored_job(xo, behind, status="IN-PROGRESS", queue_position=None)
        assert moved["seq"] == 2

        await stack.start_runner("runner-arm", arch="arm64", kinds="script")
        final = await ws.wait_job_status(behind, FINAL, timeout=30)
        assert (final["status"], final["runner_id"]) == ("SUCCESS", "runner-arm")
        # The cancelled head never ran anywhere.
        assert [i["status"] for i in ws.job_items(head)][-1] == "FAILURE"
        assert all(i["status"] != "WORKING" for i in ws.job_items(head))
        log = await xo.read_logs(head)
        assert log["data"] == ""


async def test_runner_back_from_a_long_pause_drops_the_job_it_lost(stack: Stack) -> None:
    """A runner paused (SIGSTOP) past its registry TTL has its job failed runner-lost and
    the workspace moves on; when it wakes it must not go on running that job beside the
    next one: it stops it, and is free for new work."""
    await stack.start_all()
    org = unique("org")
    runner = stack.procs["runner-1"]
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        build_id = await submit(xo, "slow", org=org, variables={"seconds": "600"})
        await ws.wait_job_status(build_id, {"WORKING"})
        await some_processes(org)
        runner.send_signal(signal.SIGSTOP)
        try:
            final = await ws.wait_job_status(build_id, FINAL, timeout=30)
        finally:
            runner.send_signal(signal.SIGCONT)
        assert (final["status"], final["reason"]) == ("FAILURE", "runner-lost")

        await no_processes(org)
        await runner_entry(xo, "runner-1", state="idle", current_build_id=None)
        after = await submit(xo, "hello", org=org)
        done = await ws.wait_job_status(after, FINAL, timeout=30)
        assert (done["status"], done["runner_id"]) == ("SUCCESS", "runner-1")
        # The lost job stays as the scheduler decided.
        assert (await stored_final(xo, build_id))["reason"] == "runner-lost"
        log = await xo.read_logs(build_id)
        assert "counted lost" in log["data"]


async def test_cli_cancel_of_a_running_job_ends_its_follower(stack: Stack) -> None:
    """`xoogify submit --follow` of a long job, `xoogify cancel` from another shell: the
    follower prints the runner's stop notes and exits 1."""
    await stack.start_all()
    org = unique("org")
    common = ["--org", org, "--env", "stg", "--type", "amd64/script", "--action", "APPLY-AUTO"]
    follower = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.cli.main",
        "submit",
        "--module",
        "slow",
        "--var",
        "seconds=600",
        *common,
        "--follow",
        env=stack.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert follower.stdout is not None and follower.stderr is not None
        async with asyncio.timeout(30):
            build_id = int((await follower.stderr.readline()).decode().strip())
            first = await follower.stdout.readline()
        assert first.decode().startswith("slow: second 1 of 600")
        done = await asyncio.to_thread(cli, stack, "cancel", str(build_id))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"{build_id} WORKING")
        async with asyncio.timeout(30):
            rest, _ = await follower.communicate()
        assert follower.returncode == 1
        assert "[xoogify] cancelled" in rest.decode()
        await no_processes(org)
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()


async def test_timeout_counts_from_the_start_not_the_submission(stack: Stack) -> None:
    """A job with timeout_s 2 that waits 3 s in its workspace queue, then runs for 1 s,
    succeeds: the time it waited is not counted."""
    await stack.start_all()
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        ahead = await submit(xo, "slow", variables={"seconds": "3"})
        await ws.wait_job_status(ahead, {"WORKING"})
        behind = await submit(xo, "slow", variables={"seconds": "1"}, timeout_s=2)
        final = await ws.wait_job_status(behind, FINAL, timeout=30)
        assert final["status"] == "SUCCESS", final
        job = await stored_final(xo, behind)
    waited = epoch_s(job["started_at"]) - epoch_s(job["submitted_at"])
    assert waited > 2, waited


async def test_runner_restarted_under_the_same_id_loses_its_old_job(stack: Stack) -> None:
    """A runner SIGKILLed and restarted at once with the same id (a service manager's
    restart), well within its key's TTL: the job it ran is runner-lost, not WORKING
    forever, and the new process takes new work."""
    await stack.start_all()
    org = unique("org")
    async with (
        WsRecorder(stack.ws_url, headers=auth_headers(stack.settings)) as ws,
        XoogifyClient(stack.url, stack.settings.token) as xo,
    ):
        build_id = await submit(xo, "slow", org=org, variables={"seconds": "600"})
        await ws.wait_job_status(build_id, {"WORKING"})
        await some_processes(org)
        stack.kill("runner-1")
        await stack.start_runner("runner-1")
        final = await ws.wait_job_status(build_id, FINAL, timeout=30)
        assert (final["status"], final["reason"]) == ("FAILURE", "runner-lost")
        await no_processes(org)
        after = await submit(xo, "hello", org=org, env="other")
        done = await ws.wait_job_status(after, FINAL, timeout=30)
        assert (done["status"], done["runner_id"]) == ("SUCCESS", "runner-1")
