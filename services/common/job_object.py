"""The contract's job object as it starts: what the gateway answers a submission with and
what the scheduler publishes as its first event (seq 1, times = submitted_at); and each
next state of it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.common.status import Status, check_transition, is_final


def new_job(build_id: int, message: dict[str, Any], queue_position: int | None) -> dict[str, Any]:
    submitted_at = message["submitted_at"]
    return {
        "build_id": build_id,
        "organization": message["organization"],
        "environment": message["environment"],
        "module_type": message["module_type"],
        "module_name": message["module_name"],
        "action": message["action"],
        "status": Status.IN_PROGRESS.value,
        "reason": None,
        "exit_code": None,
        "runner_id": None,
        "queue_position": queue_position,
        "seq": 1,
        "requested_by": message.get("requested_by"),
        "submitted_at": submitted_at,
        "started_at": None,
        "finished_at": None,
        "updated_at": submitted_at,
    }


def advanced(job: Mapping[str, Any], at: str, **fields: Any) -> dict[str, Any]:
    """The job's next state, one event on: `fields` applied, `seq` + 1, updated `at`; a
    final one finished `at` and out of its queue. TransitionError if the change is not one
    the contract allows."""
    status = str(fields.get("status", job["status"]))
    check_transition(job["status"], status, fields.get("reason"))
    new = {**job, **fields, "status": status, "seq": int(job["seq"]) + 1, "updated_at": at}
    if is_final(status):
        new["finished_at"] = at
        new["queue_position"] = None
    return new
