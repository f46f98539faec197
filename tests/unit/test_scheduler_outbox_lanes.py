"""`Outbox.perform_all` without servers: the effects themselves are recorded instead of
sent (`_one` replaced), so what is checked is the order, the concurrency (across lists,
and within a list between record writes) and what a failure stops."""

from __future__ import annotations

import asyncio
from typing import Any

from services.common.config import Settings
from services.scheduler.effects import Dispatch, Effect, PublishEvent, SaveJob
from services.scheduler.leader import NotLeader
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
        super().__init__(Settings(), None, None, None, None)  # type: ignore[arg-type]
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


def dispatched(build_id: int) -> list[Effect]:
    fields = job(build_id)
    return [*admitted(build_id), Dispatch("x86_64", "script", build_id, f"d-{build_id}", fields)]


async def test_an_event_and_its_dispatch_go_out_together_once_the_record_is_saved() -> None:
    outbox = Recording()
    effects = dispatched(1)
    assert await outbox.perform_all([effects], Machine()) == [3]
    assert outbox.most_in_flight == 2
    assert outbox.started == effects
    assert outbox.finished[0] == effects[0]


async def test_a_record_write_waits_for_every_effect_before_it() -> None:
    # A final job's record and event, then the next job of its queue: saved only once the
    # first event is acknowledged, dispatched only once its own record is saved.
    first, second = dispatched(1), dispatched(2)
    effects = [first[0], first[1], second[0], second[1], second[2]]
    outbox = Recording()
    assert await outbox.perform_all([effects], Machine()) == [5]
    assert outbox.finished.index(first[1]) < outbox.started.index(second[0])
    assert outbox.finished.index(second[0]) < outbox.started.index(second[1])
    assert outbox.finished.index(second[0]) < outbox.started.index(second[2])


async def test_saved_runs_after_the_record_write_before_the_rest_goes_out() -> None:
    outbox = Recording()
    effects = admitted(1)
    seen: list[tuple[list[Effect], list[Effect]]] = []

    async def saved() -> None:
        seen.append((list(outbox.started), list(outbox.finished)))

    assert await outbox.perform_all([effects], Machine(), [saved]) == [2]
    assert seen == [([effects[0]], [effects[0]])]
    assert outbox.finished == effects


async def test_saved_is_not_called_when_the_record_write_fails() -> None:
    effects = admitted(1)
    outbox = Recording(fail=effects[0])
    called: list[int] = []

    async def saved() -> None:
        called.append(1)

    [result] = await outbox.perform_all([effects], Machine(), [saved])
    assert isinstance(result, PerformError) and result.done == 0
    assert called == [] and outbox.started == [effects[0]]


async def test_a_failure_among_effects_sent_together_waits_for_all_and_names_the_first() -> None:
    effects = dispatched(1)
    outbox = Recording(fail=effects[2])
    [result] = await outbox.perform_all([effects], Machine())
    assert isinstance(result, PerformError) and result.done == 2
    assert outbox.finished == effects[:2]
    assert outbox.in_flight == 0


async def test_the_fence_is_checked_before_each_effect_sent_together() -> None:
    outbox = Recording()
    checked: list[int] = []

    def fence() -> None:
        checked.append(len(outbox.started))
        if len(checked) == 3:
            raise NotLeader("deposed")

    outbox.fence = fence
    effects = dispatched(1)
    [result] = await outbox.perform_all([effects], Machine())
    assert isinstance(result, PerformError) and result.done == 2
    assert isinstance(result.__cause__, NotLeader)
    assert outbox.started == effects[:2]
