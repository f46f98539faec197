"""The event that ends a job lost with the NATS store (services/gateway/store_reset.py)."""

from __future__ import annotations

import pytest

from services.common import schemas
from services.common.job_object import new_job
from services.common.status import TransitionError
from services.gateway.store_reset import lost_event

AT = "2026-11-25T10:00:00.000Z"


def _job(status: str, seq: int, **extra: object) -> dict[str, object]:
    message = {
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "APPLY-AUTO",
        "requested_by": "alice",
        "submitted_at": "2026-11-25T09:00:00.000Z",
    }
    return {**new_job(7, message, 2), "status": status, "seq": seq, **extra}


@pytest.mark.parametrize(
    "job",
    [
        _job("IN-PROGRESS", 1),
        _job("WORKING", 3, runner_id="r1", started_at=AT, queue_position=None),
    ],
)
def test_the_next_event_is_failure_internal_and_a_valid_job_event(job: dict[str, object]) -> None:
    event = lost_event(job, AT)
    schemas.check("job_event", event)
    assert event["status"] == "FAILURE" and event["reason"] == "internal"
    assert event["seq"] == int(job["seq"]) + 1  # type: ignore[call-overload]
    assert event["event_id"] == f"7-{event['seq']}"
    assert (event["finished_at"], event["updated_at"], event["queue_position"]) == (AT, AT, None)
    # Everything else is the job as it was.
    unchanged = set(job) - {
        "status",
        "reason",
        "seq",
        "finished_at",
        "updated_at",
        "queue_position",
    }
    assert {k: event[k] for k in unchanged} == {k: job[k] for k in unchanged}


def test_a_final_job_is_never_ended_again() -> None:
    with pytest.raises(TransitionError):
        lost_event(_job("SUCCESS", 3), AT)
