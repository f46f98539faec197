"""Cancel, timeouts, no-runner and runner-lost: the decisions driven by the clock and by
the runner registry."""

from __future__ import annotations

from services.scheduler.effects import PublishEvent, SaveJob, SendCancel
from services.scheduler.machine import STOP_REPORT_SLACK_S
from tests.unit.test_scheduler_machine import (
    T0,
    claim,
    dispatches,
    events,
    finished,
    machine,
    runner,
    submission,
)


def cancels(effects: list) -> list[SendCancel]:
    return [e for e in effects if isinstance(e, SendCancel)]


# --- cancel -----------------------------------------------------------------------------
def test_cancel_running_job_asks_runner_and_waits_for_report() -> None:
    m = machine(cancel_grace_s=2.0)
    m.admit(1, submission(), T0)
    claim(m, 1)
    reply, effects = m.cancel({"build_id": 1}, T0 + 1)
    assert reply["ok"] and reply["job"]["status"] == "WORKING" and reply["error"] is None
    assert cancels(effects) == [SendCancel(1, "cancelled")]
    assert events(effects) == []  # no status change until the process is stopped
    [event] = events(finished(m, 1, now=T0 + 2, reason="cancelled"))
    assert (event["status"], event["reason"]) == ("FAILURE", "cancelled")


def test_killed_process_after_cancel_counts_as_cancelled() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    claim(m, 1)
    m.cancel({"build_id": 1}, T0)
    [event] = events(finished(m, 1, exit_code=130))
    assert (event["reason"], event["exit_code"]) == ("cancelled", 130)


def test_cancel_twice_asks_once_then_resends_until_report() -> None:
    m = machine(cancel_grace_s=2.0)
    m.admit(1, submission(), T0)
    claim(m, 1)
    m.cancel({"build_id": 1}, T0)
    reply, effects = m.cancel({"build_id": 1}, T0 + 0.1)
    assert reply["ok"] and effects == []
    assert m.tick(T0 + 1) == []
    assert cancels(m.tick(T0 + 2.5)) == [SendCancel(1, "cancelled")]


def test_cancel_without_report_ends_after_grace() -> None:
    m = machine(cancel_grace_s=2.0)
    m.admit(1, submission(), T0)
    claim(m, 1)
    m.cancel({"build_id": 1}, T0)
    deadline = T0 + 2.0 + STOP_REPORT_SLACK_S
    assert events(m.tick(deadline - 0.1)) == []
    [event] = events(m.tick(deadline))
    assert (event["status"], event["reason"]) == ("FAILURE", "cancelled")


def test_cancel_final_and_unknown() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    m.cancel({"build_id": 1}, T0)
    assert m.cancel({"build_id": 1}, T0) == ({"ok": False, "job": None, "error": "final"}, [])
    assert m.cancel({"build_id": 2}, T0)[0]["error"] == "unknown"


def test_cancel_after_compaction_is_still_final() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    m.cancel({"build_id": 1}, T0)
    m.compact(ack_floor=1)
    assert m.cancel({"build_id": 1}, T0)[0]["error"] == "final"


# --- timeout ----------------------------------------------------------------------------
def test_timeout_asks_runner_then_report_ends_it() -> None:
    m = machine()
    m.admit(1, submission(timeout_s=30), T0)
    claim(m, 1, now=T0 + 1)
    assert m.tick(T0 + 30.9) == []
    effects = m.tick(T0 + 31)
    assert cancels(effects) == [SendCancel(1, "timeout")]
    assert [type(e) for e in effects] == [SaveJob, SendCancel]  # stop is remembered
    assert effects[0].value["stop_reason"] == "timeout"
    [event] = events(finished(m, 1, now=T0 + 32, reason="timeout"))
    assert (event["status"], event["reason"]) == ("FAILURE", "timeout")


def test_timeout_without_report_ends_it_after_grace() -> None:
    m = machine(cancel_grace_s=2.0)
    m.admit(1, submission(timeout_s=10), T0)
    claim(m, 1)
    m.tick(T0 + 10)
    assert events(m.tick(T0 + 10 + 2 + STOP_REPORT_SLACK_S - 0.5)) == []
    [event] = events(m.tick(T0 + 10 + 2 + STOP_REPORT_SLACK_S))
    assert (event["status"], event["reason"]) == ("FAILURE", "timeout")
    assert m.jobs == {}


def test_default_timeout_applies() -> None:
    m = machine(default_timeout_s=60)
    m.admit(1, submission(), T0)
    claim(m, 1)
    assert cancels(m.tick(T0 + 59)) == []
    assert cancels(m.tick(T0 + 60)) == [SendCancel(1, "timeout")]


# --- no runner --------------------------------------------------------------------------
def test_no_runner_for_whole_queue_timeout_fails() -> None:
    m = machine(runners=[runner(arch="amd64")], queue_timeout_s=5)
    effects = m.admit(1, submission(module_type="arm64/script"), T0)
    assert len(dispatches(effects)) == 1  # kept for a runner that may come
    assert events(m.tick(T0 + 4.9)) == []
    [event] = events(m.tick(T0 + 5))
    assert (event["status"], event["reason"]) == ("FAILURE", "no-runner")
    assert claim(m, 1)[0] == {"granted": False, "reason": "final"}


def test_runner_arriving_stops_the_no_runner_clock() -> None:
    m = machine(runners=[], queue_timeout_s=5)
    m.admit(1, submission(module_type="arm64/script"), T0)
    m.observe_runners({"a": runner("a", arch="arm64")}, T0 + 3)
    assert events(m.tick(T0 + 100)) == []
    # It leaves again: the clock restarts from then.
    m.observe_runners({}, T0 + 100)
    assert events(m.tick(T0 + 104)) == []
    assert events(m.tick(T0 + 105))[0]["reason"] == "no-runner"


def test_wrong_kind_or_draining_runner_does_not_count() -> None:
    m = machine(
        runners=[runner("a", kinds=frozenset({"script"})), runner("b", state="draining")],
        queue_timeout_s=5,
    )
    m.admit(1, submission(module_type="amd64/terraform"), T0)
    assert events(m.tick(T0 + 5))[0]["reason"] == "no-runner"


def test_job_waiting_in_workspace_queue_does_not_time_out() -> None:
    m = machine(runners=[], queue_timeout_s=5)
    m.observe_runners({"r1": runner()}, T0)
    m.admit(1, submission(action="APPLY-AUTO"), T0)
    claim(m, 1)
    m.admit(2, submission(action="APPLY-AUTO"), T0)
    m.observe_runners({"r1": runner()}, T0 + 1)
    assert [e for e in m.tick(T0 + 1000) if isinstance(e, PublishEvent)] == []
    assert m.jobs[2].status == "IN-PROGRESS"


# --- runner lost ------------------------------------------------------------------------
def test_runner_gone_fails_working_job_runner_lost() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    claim(m, 1)
    assert events(m.observe_runners({"r1": runner()}, T0 + 20)) == []
    [event] = events(m.observe_runners({}, T0 + 21))
    assert (event["status"], event["reason"], event["runner_id"]) == (
        "FAILURE", "runner-lost", "r1",
    )  # fmt: skip


def test_fresh_claim_from_unseen_runner_gets_grace() -> None:
    m = machine(runners=[])
    m.admit(1, submission(), T0)
    claim(m, 1, runner_id="new", now=T0)
    assert events(m.observe_runners({}, T0 + 1)) == []
    assert events(m.observe_runners({}, T0 + 6))[0]["reason"] == "runner-lost"


def test_runner_restarted_under_same_id_is_lost() -> None:
    m = machine()
    m.admit(1, submission(), T0)
    claim(m, 1, now=T0 + 10)
    same = {"r1": runner(started_at=T0)}
    assert events(m.observe_runners(same, T0 + 11)) == []
    again = {"r1": runner(started_at=T0 + 30)}
    assert events(m.observe_runners(again, T0 + 31))[0]["reason"] == "runner-lost"


def test_lost_head_frees_the_workspace() -> None:
    m = machine()
    m.admit(1, submission(action="DESTROY"), T0)
    claim(m, 1)
    m.admit(2, submission(action="APPLY-AUTO"), T0)
    effects = m.observe_runners({}, T0 + 30)
    assert [d.build_id for d in dispatches(effects)] == [2]
