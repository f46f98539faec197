"""Per-workspace queues: APPLY-AUTO and DESTROY of one organization + environment + module
run one at a time in submission order, waiting jobs show queue_position, PLANs never wait."""

from __future__ import annotations

from services.scheduler.machine import Machine
from tests.unit.test_scheduler_machine import (
    T0,
    claim,
    dispatches,
    events,
    finished,
    machine,
    submission,
)


def apply(**over: object) -> dict:
    return submission(action="APPLY-AUTO", **over)


def _three_applies() -> Machine:
    m = machine()
    m.admit(1, apply(), T0)
    m.admit(2, submission(action="DESTROY"), T0)
    m.admit(3, apply(), T0)
    return m


def test_waiting_jobs_get_positions_and_are_not_dispatched() -> None:
    m = machine()
    first = m.admit(1, apply(), T0)
    second = m.admit(2, apply(), T0)
    third = m.admit(3, submission(action="DESTROY"), T0)
    assert events(first)[0]["queue_position"] is None and len(dispatches(first)) == 1
    assert events(second)[0]["queue_position"] == 1 and dispatches(second) == []
    assert events(third)[0]["queue_position"] == 2 and dispatches(third) == []


def test_plans_never_wait() -> None:
    m = machine()
    m.admit(1, apply(), T0)
    effects = m.admit(2, submission(action="PLAN"), T0)
    assert events(effects)[0]["queue_position"] is None
    assert len(dispatches(effects)) == 1
    assert claim(m, 2)[0]["granted"]


def test_other_workspaces_do_not_wait() -> None:
    m = machine()
    m.admit(1, apply(), T0)
    for build_id, over in enumerate(
        [{"module_name": "db"}, {"environment": "prod"}, {"organization": "globex"}], start=2
    ):
        effects = m.admit(build_id, apply(**over), T0)
        assert events(effects)[0]["queue_position"] is None
        assert len(dispatches(effects)) == 1


def test_queue_moves_when_head_finishes() -> None:
    m = _three_applies()
    claim(m, 1)
    effects = finished(m, 1, exit_code=0)
    published = events(effects)
    assert [(e["build_id"], e["status"], e["queue_position"], e["seq"]) for e in published] == [
        (1, "SUCCESS", None, 3),
        (2, "IN-PROGRESS", None, 2),
        (3, "IN-PROGRESS", 1, 2),
    ]
    assert [d.build_id for d in dispatches(effects)] == [2]
    assert claim(m, 3)[0] == {"granted": False, "reason": "queued"}
    assert claim(m, 2)[0]["granted"]


def test_queue_moves_on_failure_too() -> None:
    m = _three_applies()
    claim(m, 1)
    effects = finished(m, 1, exit_code=1)
    assert [d.build_id for d in dispatches(effects)] == [2]


def test_running_head_counts_as_ahead() -> None:
    m = machine()
    m.admit(1, apply(), T0)
    claim(m, 1)
    assert events(m.admit(2, apply(), T0))[0]["queue_position"] == 1


def test_cancel_waiting_job_moves_those_behind() -> None:
    m = _three_applies()
    reply, effects = m.cancel({"build_id": 2}, T0)
    assert reply["ok"] and reply["job"]["status"] == "FAILURE"
    assert reply["job"]["reason"] == "cancelled" and reply["error"] is None
    published = events(effects)
    assert [(e["build_id"], e["status"], e["queue_position"]) for e in published] == [
        (2, "FAILURE", None),
        (3, "IN-PROGRESS", 1),
    ]
    assert dispatches(effects) == []  # job 1 still holds the workspace


def test_cancel_queued_head_dispatches_next() -> None:
    m = _three_applies()
    _, effects = m.cancel({"build_id": 1}, T0)
    assert [d.build_id for d in dispatches(effects)] == [2]
    assert [e["queue_position"] for e in events(effects)[1:]] == [None, 1]


def test_seq_increases_by_one_per_position_change() -> None:
    m = _three_applies()
    claim(m, 1)
    finished(m, 1, exit_code=0)
    claim(m, 2)
    effects = finished(m, 2, exit_code=0)
    job3 = [e for e in events(effects) if e["build_id"] == 3]
    assert [(e["seq"], e["queue_position"]) for e in job3] == [(3, None)]
    assert len(dispatches(effects)) == 1
