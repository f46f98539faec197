"""The runner's life: registration and heartbeat in KV, `busy` while it works, graceful
drain on SIGTERM (or stop), and a loud stop when its heartbeat cannot be kept."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from services.common import codec, schemas
from services.common.config import Settings
from services.common.embedded import EmbeddedNats, free_port
from services.runner.registry import VERSION, HeartbeatLost
from services.runner.service import RunnerService
from tests.integration.test_runner_jobs import (  # the fake scheduler and its fixtures
    TIMEOUT,
    FakeScheduler,
    job_pids,
    modules_dir,
    nc,
    poll,
    rsettings,
    runner_logs_on,
    running,
    sched,
    unique_org,
)
from tests.stack import Stack
from tests.support import gateway_streams

__all__ = ["modules_dir", "nc", "rsettings", "runner_logs_on", "sched"]


async def registration(sched: FakeScheduler, runner_id: str) -> dict[str, Any] | None:
    try:
        kv = await sched.js.key_value(sched.settings.subjects.runners_bucket)
        entry = await kv.get(runner_id)
    except NotFoundError:
        return None
    return None if entry.value is None else dict(codec.loads(entry.value))


async def test_process_registers_serves_metrics_and_leaves_on_sigterm(
    settings: Settings, sched: FakeScheduler, tmp_path: Path
) -> None:
    stack = Stack(settings, tmp_path / "logs")
    port = free_port()
    stack.spawn(
        "runner-p",
        ["runner", "--arch", "x86_64", "--kinds", "script,terraform", "--label", "zone=a"]
        + ["--runner-id", "runner-p", "--metrics-port", str(port)],
    )
    try:

        async def registered() -> dict[str, Any] | None:
            return await registration(sched, "runner-p")

        await poll(registered)
        reg = await registered()
        assert reg is not None
        schemas.check("runner_registration", reg)
        assert (reg["arch"], reg["labels"], reg["state"]) == ("amd64", {"zone": "a"}, "idle")
        assert "script" in reg["kinds"] and reg["current_build_id"] is None
        assert reg["version"] == VERSION and reg["hostname"] == socket.gethostname()
        async with httpx.AsyncClient() as client:
            health = await client.get(f"http://127.0.0.1:{port}/healthz")
            metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert health.status_code == 200
        assert "xoogify_rejected_messages_total" in metrics.text
        assert "xoogify_runner_jobs_total" in metrics.text
        # The heartbeat refreshes last_seen.
        first_seen = reg["last_seen"]

        async def refreshed() -> bool:
            now = await registered()
            return now is not None and now["last_seen"] != first_seen

        await poll(refreshed)
    finally:
        code = await stack.stop("runner-p")
    assert code == 0, stack.logs("runner-p")
    assert await registration(sched, "runner-p") is None


async def test_a_bucket_that_takes_no_writes_yet_is_waited_for(
    rsettings: Settings, sched: FakeScheduler, caplog: pytest.LogCaptureFixture
) -> None:
    """On a cluster just started, the registry bucket exists before it takes writes (its
    replicas are still electing a leader). The runner waits for it instead of exiting."""
    bucket = rsettings.subjects.runners_bucket
    # A bucket whose stream takes none of the runners' keys yet: a put finds no stream,
    # as on a bucket with no leader.
    config = StreamConfig(
        name=f"KV_{bucket}", subjects=[f"$KV.{bucket}.not-yet"], max_msgs_per_subject=1
    )
    await sched.js.add_stream(config)
    caplog.set_level(logging.WARNING, logger="services.common.bus")
    service = RunnerService(rsettings, "amd64", ["script"], {}, "runner-w")
    task = asyncio.create_task(service.serve())
    try:

        async def retried() -> bool:
            if task.done():
                task.result()  # raises why it gave up
            return any(
                getattr(r, "what", None) == "registration and consumers" for r in caplog.records
            )

        await poll(retried)
        config.subjects = [f"$KV.{bucket}.>"]
        await sched.js.update_stream(config)
        await asyncio.wait_for(service.ready.wait(), TIMEOUT)
        reg = await registration(sched, "runner-w")
        assert reg is not None and reg["state"] == "idle"
        await sched.dispatch(31, "hello")
        assert (await sched.report(31))["exit_code"] == 0
    finally:
        service.stop()
        await asyncio.wait_for(task, TIMEOUT)
    assert await registration(sched, "runner-w") is None


async def test_busy_while_working_then_idle(rsettings: Settings, sched: FakeScheduler) -> None:
    async with running(rsettings, runner_id="runner-b"):
        await sched.dispatch(21, "slow", variables={"seconds": "3"})
        await sched.wait_for(lambda: "slow: second 1" in sched.log_text(21))

        async def busy() -> bool:
            # Written within the registry's spacing (0.25 s) of its previous put, not at
            # once: poll rather than expect it by the job's first output.
            reg = await registration(sched, "runner-b")
            return reg is not None and (reg["state"], reg["current_build_id"]) == ("busy", 21)

        await poll(busy)
        await sched.report(21)

        async def idle() -> bool:
            reg = await registration(sched, "runner-b")
            return reg is not None and reg["state"] == "idle"

        await poll(idle)


async def test_drain_lets_the_job_finish_and_takes_no_more(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    service = RunnerService(rsettings, "amd64", ["script"], {}, "runner-d", drain_timeout_s=30)
    task = asyncio.create_task(service.serve())
    await asyncio.wait_for(service.ready.wait(), TIMEOUT)
    await sched.dispatch(22, "hello")
    await sched.wait_for(lambda: "hello: step 1" in sched.log_text(22))
    service.stop()

    async def draining() -> bool:
        reg = await registration(sched, "runner-d")
        return reg is not None and reg["state"] == "draining"

    await poll(draining)  # said at once, while the job still runs
    assert sched.reports(22) == []
    await sched.dispatch(23, "hello")
    report = await sched.report(22)
    assert report["exit_code"] == 0
    await asyncio.wait_for(task, TIMEOUT)
    assert await registration(sched, "runner-d") is None
    assert not any(c["build_id"] == 23 for c in sched.claims)
    info = await sched.js.stream_info(rsettings.subjects.dispatch_stream)
    assert info.state.messages == 1  # job 23 waits for another runner


async def test_drain_deadline_cancels_the_job(rsettings: Settings, sched: FakeScheduler) -> None:
    org = unique_org()
    service = RunnerService(rsettings, "amd64", ["script"], {}, "runner-x", drain_timeout_s=0.5)
    task = asyncio.create_task(service.serve())
    await asyncio.wait_for(service.ready.wait(), TIMEOUT)
    await sched.dispatch(24, "slow", organization=org, variables={"seconds": "30"})
    await sched.wait_for(lambda: "slow: second 1" in sched.log_text(24))
    service.stop()
    report = await sched.report(24)
    assert report["reason"] == "cancelled"
    await asyncio.wait_for(task, TIMEOUT)
    assert job_pids(org) == []
    assert "[xoogify] runner shutting down (drain deadline of 0.5s)" in sched.log_text(24)
    assert sched.chunks(24)[-1]["eof"] is True
    assert await registration(sched, "runner-x") is None


async def test_lost_heartbeat_stops_the_runner_loudly(
    settings: Settings, nats_server: EmbeddedNats | None, modules_dir: Path
) -> None:
    if nats_server is None:
        pytest.fail("this test stops its own nats-server; unset XOOGIFY_TEST_NATS_URL")
    fast = replace(settings, heartbeat_s=0.3, modules_dir=modules_dir)
    await gateway_streams(fast)
    service = RunnerService(fast, "amd64", ["script"], {}, "runner-h", drain_timeout_s=1)
    task = asyncio.create_task(service.serve())
    await asyncio.wait_for(service.ready.wait(), TIMEOUT)
    nats_server.kill()
    with pytest.raises(ExceptionGroup) as caught:
        await asyncio.wait_for(task, TIMEOUT)
    assert caught.group_contains(HeartbeatLost)
    with contextlib.suppress(Exception):
        nats_server.start()


def children_of(parent: int, marker: str) -> list[int]:
    """The job's processes whose parent is `parent`."""
    found = []
    for pid in job_pids(marker):
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            # Fields after the command (which may hold spaces) : state, ppid, pgrp, ...
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(pid)
    return found


async def test_job_process_dies_with_a_killed_runner(
    rsettings: Settings, sched: FakeScheduler, tmp_path: Path
) -> None:
    org = unique_org()
    stack = Stack(rsettings, tmp_path / "logs")
    await stack.start_runner("runner-k", arch="amd64", kinds="script")
    runner_pid = stack.procs["runner-k"].pid
    try:
        # `stubborn` writes nothing after its first line, so no SIGPIPE would end it.
        await sched.dispatch(25, "stubborn", organization=org)
        await sched.wait_for(lambda: "stubborn started" in sched.log_text(25))
        [child] = children_of(runner_pid, org)
        stack.kill("runner-k")  # SIGKILL: no drain, no cleanup of its own

        async def gone() -> bool:
            return child not in job_pids(org)

        # The runner's reaper sees its pipe close and kills the job's process group
        # (tests/integration/test_runner_reaper.py checks the grandchildren too).
        await poll(gone, timeout=5)
    finally:
        await stack.stop_all()
        # Should the test fail, leave nothing of the job running.
        for pid in job_pids(org):
            with contextlib.suppress(OSError):
                os.killpg(os.getpgid(pid), signal.SIGKILL)


async def test_second_stop_cancels_the_job_at_once(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    service = RunnerService(rsettings, "amd64", ["script"], {}, "runner-2", drain_timeout_s=60)
    task = asyncio.create_task(service.serve())
    await asyncio.wait_for(service.ready.wait(), TIMEOUT)
    await sched.dispatch(26, "slow", variables={"seconds": "60"})
    await sched.wait_for(lambda: "slow: second 1" in sched.log_text(26))
    service.stop()
    service.stop()  # like a second Ctrl-C
    report = await sched.report(26, timeout=10)  # well before the 60 s drain deadline
    assert report["reason"] == "cancelled"
    assert "[xoogify] runner shutting down (stop asked twice)" in sched.log_text(26)
    await asyncio.wait_for(task, TIMEOUT)
