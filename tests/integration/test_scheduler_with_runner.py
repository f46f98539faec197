"""The scheduler with a real runner process: a submission published on NATS (as the
gateway does) runs the example modules and ends with the right events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.common.config import Settings
from tests.integration.test_scheduler_life import FINAL, Harness, make_harness, submission
from tests.stack import Stack


@pytest.fixture
async def h(settings: Settings) -> AsyncIterator[Harness]:
    async for harness in make_harness(settings):
        yield harness


async def test_real_runner_success_failure_and_cancel(h: Harness, tmp_path: Path) -> None:
    stack = Stack(h.settings, tmp_path / "logs")
    try:
        await stack.start_runner("runner-1")
        hello = await h.submit(submission(module_name="hello", action="APPLY-AUTO"))
        broken = await h.submit(submission(module_name="broken", action="APPLY-AUTO"))
        slow = await h.submit(
            submission(module_name="slow", environment="prod", variables={"seconds": "60"})
        )
        done = await h.events.wait(lambda e: e["build_id"] == hello and e["status"] in FINAL, 60)
        assert done["status"] == "SUCCESS", stack.logs("runner-1")[-3000:]
        assert done["runner_id"] == "runner-1" and done["seq"] == 3
        failed = await h.events.status(broken, "FAILURE", timeout=60)
        assert (failed["reason"], failed["exit_code"]) == ("exit-code", 3)

        await h.events.status(slow, "WORKING", timeout=60)
        reply = await h.cancel(slow)
        assert reply["ok"], reply
        stopped = await h.events.status(slow, "FAILURE", timeout=30)
        assert stopped["reason"] == "cancelled", stack.logs("runner-1")
        for build_id in (hello, broken, slow):
            assert [e["seq"] for e in h.events.of(build_id)] == [1, 2, 3]
    finally:
        await stack.stop_all()
