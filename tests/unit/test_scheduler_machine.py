"""The scheduler's decisions without servers: admission, dispatch, claims, reports,
restart. Every event produced is checked against the job_event schema."""

from __future__ import annotations

from typing import Any

from services.common import schemas
from services.scheduler.effects import (
    Dispatch,
    DropDispatch,
    Effect,
    PublishEvent,
    SaveJob,
    SendCancel,
)
from services.scheduler.jobs import JobRecord, iso
from services.scheduler.machine import Limits, Machine
from services.scheduler.runners import RunnerInfo

T0 = 1_800_000_000.0

JOB_FIELDS = {
    "build_id", "organization", "environment", "module_type", "module_name", "action",
    "status", "reason", "exit_code", "runner_id", "queue_position", "seq", "requested_by",
    "submitted_at", "started_at", "finished_at", "updated_at",
}  # fmt: skip


def submission(**over: Any) -> dict[str, Any]:
    message = {
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/terraform",
        "module_name": "vpc",
        "action": "PLAN",
        "variables": {"region": "eu-west-1", "password": "hunter2"},
        "sensitive": ["password"],
        "timeout_s": None,
        "requested_by": "alice",
        "submitted_at": iso(T0),
    }
    message.update(over)
    return schemas.check("submit_message", message)


def runner(runner_id: str = "r1", arch: str = "amd64", **over: Any) -> RunnerInfo:
    fields: dict[str, Any] = {"kinds": frozenset({"terraform", "script"}), "state": "idle"}
    fields.update(over)
    return RunnerInfo(runner_id=runner_id, arch=arch, **fields)


def machine(runners: list[RunnerInfo] | None = None, **limits: Any) -> Machine:
    m = Machine(Limits(**limits))
    m.observe_runners({r.runner_id: r for r in (runners or [runner()])}, T0)
    return m


def events(effects: list[Effect]) -> list[dict[str, Any]]:
    out = [e.payload for e in effects if isinstance(e, PublishEvent)]
    for payload in out:
        schemas.check("job_event", payload)
        assert JOB_FIELDS <= set(payload) <= JOB_FIELDS | {"event_id", "variables"}
    return out


def dispatches(effects: list[Effect]) -> list[Dispatch]:
    out = [e for e in effects if isinstance(e, Dispatch)]
    for d in out:
        schemas.check("dispatch", d.payload)
    return out


def claim(m: Machine, build_id: int, runner_id: str = "r1", attempt: int = 1, now: float = T0):
    return m.claim({"build_id": build_id, "runner_id": runner_id, "attempt": attempt}, now)


def finished(m: Machine, build_id: int, runner_id: str = "r1", now: float = T0, **over: Any):
    report = {"build_id": build_id, "runner_id": runner_id, "type": "finished", "at": iso(now)}
    report.update(over)
    return m.report(schemas.check("report", report), now)


# --- admission --------------------------------------------------------------------------
def test_admit_saves_then_publishes_seq1_then_dispatches() -> None:
    m = machine()
    effects = m.admit(5, submission(), T0 + 1)
    assert [type(e) for e in effects] == [SaveJob, PublishEvent, Dispatch]
    [event] = events(effects)
    assert event["event_id"] == "5-1" and event["seq"] == 1
    assert event["status"] == "IN-PROGRESS" and event["queue_position"] is None
    assert event["submitted_at"] == event["updated_at"] == iso(T0)
    assert event["variables"] == {"region": "eu-west-1", "password": "***"}
    [d] = dispatches(effects)
    assert (d.arch, d.kind, d.msg_id) == ("amd64", "terraform", "dispatch-5-1")
    assert d.payload["variables"]["password"] == "hunter2"  # clear for the runner
    assert d.payload["sensitive"] == ["password"] and d.payload["attempt"] == 1
    assert d.payload["timeout_s"] == 3600


def test_admit_keeps_explicit_timeout() -> None:
    [d] = dispatches(machine().admit(1, submission(timeout_s=30), T0))
    assert d.payload["timeout_s"] == 30


def test_redelivered_submission_makes_no_second_job() -> None:
    m = machine()
    m.admit(5, submission(), T0)
    assert m.admit(5, submission(), T0 + 1) == []
    claim(m, 5)
    finished(m, 5, exit_code=0)
    assert m.admit(5, submission(), T0 + 2) == []  # final but not yet compacted


def test_later_events_carry_no_variables() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    _, effects = claim(m, 1)
    assert "variables" not in events(effects)[0]


# --- claims -----------------------------------------------------------------------------
def test_claim_granted_records_runner_and_publishes_working() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    reply, effects = claim(m, 1, now=T0 + 2)
    assert reply == {"granted": True, "reason": None}
    schemas.check("claim_reply", reply)
    assert [type(e) for e in effects] == [SaveJob, PublishEvent]
    [event] = events(effects)
    assert (event["status"], event["seq"], event["runner_id"]) == ("WORKING", 2, "r1")
    assert event["started_at"] == event["updated_at"] == iso(T0 + 2)
    assert effects[0].value["job"]["runner_id"] == "r1"  # the assignment is stored


def test_double_claim_refused() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    assert claim(m, 1)[0]["granted"]
    reply, effects = claim(m, 1, runner_id="r2")
    assert reply == {"granted": False, "reason": "taken"} and effects == []
    reply, _ = claim(m, 1)  # even the same runner, twice
    assert not reply["granted"]


def test_the_same_runner_process_asking_again_is_granted_again() -> None:
    """Its first answer was lost (a NATS outage): the same answer, no second WORKING."""
    m = machine()
    m.admit(1, submission(), T0)
    ask = {"build_id": 1, "runner_id": "r1", "attempt": 1, "runner_started_at": "t-1"}
    reply, effects = m.claim(ask, T0)
    assert reply["granted"] and effects
    reply, effects = m.claim(ask, T0 + 5)
    assert reply == {"granted": True, "reason": None} and effects == []
    # Another process under the same runner_id is not that runner.
    reply, _ = m.claim({**ask, "runner_started_at": "t-2"}, T0 + 6)
    assert reply == {"granted": False, "reason": "taken"}


def test_claim_refusals() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    assert claim(m, 1, attempt=2)[0] == {"granted": False, "reason": "stale-attempt"}
    assert claim(m, 99)[0] == {"granted": False, "reason": "unknown"}
    m.cancel({"build_id": 1}, T0)
    assert claim(m, 1)[0] == {"granted": False, "reason": "final"}


# --- reports ----------------------------------------------------------------------------
def _working(m: Machine, build_id: int = 1, **over: Any) -> None:
    m.admit(build_id, submission(**over), T0)
    assert claim(m, build_id)[0]["granted"]


def test_exit_zero_is_success() -> None:
    m = machine()
    _working(m)
    [event] = events(finished(m, 1, now=T0 + 9, exit_code=0))
    assert (event["status"], event["reason"], event["exit_code"], event["seq"]) == (
        "SUCCESS", None, 0, 3,
    )  # fmt: skip
    assert event["finished_at"] == event["updated_at"] == iso(T0 + 9)
    assert m.jobs == {} and m.finished == {1}


def test_nonzero_exit_is_failure_exit_code() -> None:
    m = machine()
    _working(m)
    [event] = events(finished(m, 1, exit_code=3))
    assert (event["status"], event["reason"], event["exit_code"]) == ("FAILURE", "exit-code", 3)


def test_report_reason_is_kept() -> None:
    m = machine()
    _working(m)
    [event] = events(finished(m, 1, reason="invalid-module"))
    assert (event["status"], event["reason"]) == ("FAILURE", "invalid-module")


def test_report_reason_not_allowed_from_working_becomes_internal() -> None:
    m = machine()
    _working(m)
    [event] = events(finished(m, 1, reason="no-runner"))
    assert event["reason"] == "internal"


def test_report_from_other_runner_or_unknown_job_ignored() -> None:
    m = machine()
    _working(m)
    assert finished(m, 1, runner_id="r2", exit_code=0) == []
    assert finished(m, 42, exit_code=0) == []
    started = {"build_id": 1, "runner_id": "r1", "type": "started", "at": iso(T0)}
    assert m.report(started, T0) == []
    assert m.jobs[1].status == "WORKING"


def test_report_before_claim_ignored_and_twice_applied_once() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    assert finished(m, 1, exit_code=0) == []
    claim(m, 1)
    assert len(events(finished(m, 1, exit_code=0))) == 1
    assert finished(m, 1, exit_code=0) == []


# --- restart ----------------------------------------------------------------------------
def _saved(effects: list[Effect]) -> dict[int, dict[str, Any]]:
    """What KV holds after these effects (the last value per job)."""
    return {e.build_id: e.value for e in effects if isinstance(e, SaveJob)}


def test_restart_reloads_and_repairs_without_a_second_job() -> None:
    m = machine()
    kv = _saved(m.admit(1, submission(), T0))
    kv |= _saved(m.admit(2, submission(module_name="db"), T0))
    kv |= _saved(claim(m, 1)[1])
    fresh = Machine(Limits())
    fresh.observe_runners({"r1": runner()}, T0)
    effects = fresh.load([JobRecord.from_value(v) for v in kv.values()], ack_floor=2, now=T0 + 5)
    # The current events are republished (deduplicated by Nats-Msg-Id) ...
    assert sorted(e["event_id"] for e in events(effects)) == ["1-2", "2-1"]
    assert all(e.repair for e in effects if isinstance(e, PublishEvent))
    # ... and only the unclaimed job is dispatched again, with the same Nats-Msg-Id.
    assert [d.msg_id for d in dispatches(effects)] == ["dispatch-2-1"]
    assert fresh.admit(1, submission(), T0) == [] and fresh.admit(2, submission(), T0) == []
    assert claim(fresh, 1, runner_id="r2")[0]["reason"] == "taken"
    assert claim(fresh, 2, runner_id="r2")[0]["granted"]


def test_load_keeps_final_records_until_compacted() -> None:
    m = machine()
    kv = _saved(m.admit(1, submission(), T0))
    claim(m, 1)
    kv |= _saved(finished(m, 1, exit_code=0))
    fresh = Machine(Limits())
    effects = fresh.load([JobRecord.from_value(v) for v in kv.values()], ack_floor=0, now=T0)
    assert [e["status"] for e in events(effects)] == ["SUCCESS"]
    assert fresh.jobs == {} and fresh.admit(1, submission(), T0) == []
    assert fresh.compact(ack_floor=0) == []
    [delete] = fresh.compact(ack_floor=1)
    assert delete.build_id == 1 and fresh.finished == set()


def test_record_round_trips() -> None:
    m = machine()
    effects = m.admit(3, submission(), T0)
    value = effects[0].value
    assert JobRecord.from_value(value).to_value() == value


def test_cancel_of_dispatched_job_drops_its_message() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    m.note_dispatched(1, 77)
    reply, effects = m.cancel({"build_id": 1}, T0)
    assert reply["ok"] and reply["job"]["reason"] == "cancelled"
    assert DropDispatch(77) in effects
    assert not any(isinstance(e, SendCancel) for e in effects)
