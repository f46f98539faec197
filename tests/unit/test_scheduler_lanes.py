"""Which effect lists of a batch may go out concurrently (services.scheduler.lanes)."""

from __future__ import annotations

from typing import Any

from services.scheduler.effects import Dispatch, DropDispatch, Effect, PublishEvent, SaveJob
from services.scheduler.lanes import keys, lanes


def job(build_id: int, action: str = "PLAN", module: str = "vpc", env: str = "stg") -> Any:
    return {
        "build_id": build_id,
        "organization": "acme",
        "environment": env,
        "module_name": module,
        "action": action,
    }


def admitted(build_id: int, **over: Any) -> list[Effect]:
    fields = job(build_id, **over)
    return [
        SaveJob(build_id, {"job": fields}),
        PublishEvent("acme", fields["environment"], build_id, fields),
        Dispatch("amd64", "script", build_id, f"dispatch-{build_id}-1", fields),
    ]


def test_plans_of_one_workspace_are_independent() -> None:
    batches = [admitted(1), admitted(2), admitted(3)]
    assert lanes(batches) == [[0], [1], [2]]


def test_two_inputs_about_one_job_share_a_lane_in_order() -> None:
    batches = [admitted(1), admitted(2), [SaveJob(1, {"job": job(1)})]]
    assert lanes(batches) == [[0, 2], [1]]


def test_mutating_jobs_of_one_workspace_share_a_lane() -> None:
    batches = [
        admitted(1, action="APPLY-AUTO"),
        admitted(2, action="PLAN"),
        admitted(3, action="DESTROY"),
        admitted(4, action="APPLY-AUTO", module="dns"),
    ]
    assert lanes(batches) == [[0, 2], [1], [3]]


def test_a_list_linking_two_lanes_merges_them() -> None:
    # Job 1 ends and frees its queue for job 2 (the requeue is in the same list).
    finish = [
        SaveJob(1, {"job": job(1, action="APPLY-AUTO")}),
        Dispatch("amd64", "script", 2, "dispatch-2-1", job(2, action="APPLY-AUTO", env="prd")),
    ]
    batches = [admitted(1, action="APPLY-AUTO"), admitted(2, action="APPLY-AUTO", env="prd")]
    assert lanes([*batches, finish]) == [[0, 1, 2]]


def test_keys_name_jobs_workspaces_and_dispatches() -> None:
    found = keys([SaveJob(7, {"job": job(7, action="DESTROY")}), DropDispatch(42)])
    assert found == {("job", 7), ("workspace", "acme", "stg", "vpc"), ("dispatch", 42)}
    assert lanes([]) == []
    assert lanes([[], []]) == [[0], [1]]
