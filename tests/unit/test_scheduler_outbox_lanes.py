"""`Outbox.perform_all` without servers: the effects themselves are recorded instead of
sent (`_one` replaced), so what is checked is the order, the concurrency and what a
failure stops."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common.config import Settings
from services.scheduler.effects import Effect, PublishEvent, SaveJob
from services.scheduler.machine import Machine
from services.scheduler.outbox import Outbox, PerformError


def job(build_id: int, action: str = "PLAN") -> dict[str, Any]:
    return {
        "build_id": build_id,
        "organization": "acme",
        "environment": "stg",
        "module_name": "vpc",
        "action": action,
    }


def admitted(build_id: int, action: str = "PLAN") -> list[Effect]:
    fields = job(build_id, action)
    return [SaveJob(build_id, {"job": fields}), PublishEvent("acme", "stg", build_id, fields)]


class Recording(Outbox):
    def __init__(self, fail: Effect | None = None) -> None:
        super().__init__(Settings(), None, None, None)  # type: ignore[arg-type]
        self.fail = fail
        self.started: list[Effect] = []
        self.finished: list[Effect] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def _one(self, effect: Effect, machine: Machine) -> None:
        self.started.append(effect)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(0)  # a round trip: others may go meanwhile
        self.in_flight -= 1
        if effect == self.fail:
            raise RuntimeError("nats away")
        self.finished.append(effect)


async def test_independent_lists_overlap_and_each_keeps_its_order() -> None:
    outbox = Recording()
    batches = [admitted(1), admitted(2), admitted(3)]
    assert await outbox.perform_all(batches, Machine()) == [2, 2, 2]
    assert outbox.most_in_flight == 3
    for effects in batches:
        assert [e for e in outbox.finished if e in effects] == effects


async def test_a_shared_workspace_queue_is_one_lane_in_input_order() -> None:
    outbox = Recording()
    batches = [admitted(1, "APPLY-AUTO"), admitted(2, "DESTROY")]
    assert await outbox.perform_all(batches, Machine()) == [2, 2]
    assert outbox.most_in_flight == 1
    assert outbox.finished == [*batches[0], *batches[1]]


async def test_a_failure_stops_its_lane_only() -> None:
    first, second, other = admitted(1, "APPLY-AUTO"), admitted(2, "DESTROY"), admitted(3)
    outbox = Recording(fail=first[1])
    results = await outbox.perform_all([first, second, other], Machine())
    failed, skipped, done = results
    assert isinstance(failed, PerformError) and failed.done == 1
    assert isinstance(failed.__cause__, RuntimeError)
    assert isinstance(skipped, PerformError) and skipped.done == 0
    assert isinstance(skipped.__cause__, RuntimeError)
    assert done == 2
    assert not any(e in outbox.started for e in second)


async def test_the_fence_is_checked_before_every_effect() -> None:
    outbox = Recording()
    calls: list[int] = []
    outbox.fence = lambda: calls.append(1)
    await outbox.perform_all([admitted(1), admitted(2)], Machine())
    assert len(calls) == 4
