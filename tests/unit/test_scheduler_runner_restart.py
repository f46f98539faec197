"""A runner restarted under the same runner_id at once (a service manager's restart, well
inside the registry TTL and the clock-skew allowance): its claim carried its
registration's `started_at`, so any other registration means its job is lost."""

from __future__ import annotations

from typing import Any

from services.common import schemas
from services.scheduler.jobs import JobRecord, iso
from services.scheduler.machine import Machine
from tests.unit.test_scheduler_machine import T0, events, machine, runner, submission


def _claim(m: Machine, build_id: int, started_at: float, now: float) -> dict[str, Any]:
    request = {
        "build_id": build_id,
        "runner_id": "r1",
        "attempt": 1,
        "runner_started_at": iso(started_at),
    }
    reply, _ = m.claim(schemas.check("claim", request), now)
    return dict(reply)


def test_restart_a_moment_after_the_claim_is_lost() -> None:
    m = machine(runners=[runner(started_at=T0)])
    m.admit(1, submission(), T0 + 10)
    assert _claim(m, 1, started_at=T0, now=T0 + 10)["granted"]
    assert events(m.observe_runners({"r1": runner(started_at=T0)}, T0 + 10.2)) == []
    # Back 0.3 s after the job started: under the 2 s clock-skew allowance.
    back = {"r1": runner(started_at=T0 + 10.3)}
    [event] = events(m.observe_runners(back, T0 + 10.5))
    assert (event["status"], event["reason"]) == ("FAILURE", "runner-lost")


def test_same_process_with_its_clock_ahead_is_not_lost() -> None:
    # Its registration says it started after the job did (its clock is ahead of ours):
    # still the process that claimed it.
    ahead = T0 + 11
    m = machine(runners=[runner(started_at=ahead)])
    m.admit(1, submission(), T0 + 10)
    assert _claim(m, 1, started_at=ahead, now=T0 + 10)["granted"]
    assert events(m.observe_runners({"r1": runner(started_at=ahead)}, T0 + 60)) == []
    assert m.jobs[1].status == "WORKING"


def test_the_stamp_survives_a_reload() -> None:
    m = machine(runners=[runner(started_at=T0)])
    m.admit(1, submission(), T0)
    _claim(m, 1, started_at=T0, now=T0)
    value = m.jobs[1].to_value()
    assert JobRecord.from_value(value).runner_started_at == iso(T0)
    # A record stored before the field existed loads too.
    del value["runner_started_at"]
    assert JobRecord.from_value(value).runner_started_at is None
