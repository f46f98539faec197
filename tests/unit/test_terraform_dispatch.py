"""The scheduler hands a terraform job its per-job state credentials in the dispatch
message, and nowhere else: not to script jobs, never in a status event."""

from __future__ import annotations

from typing import Any

import pytest

from services.common import codec, schemas, state_auth
from services.common.config import Settings
from services.scheduler.effects import Dispatch, PublishEvent, SaveJob
from services.scheduler.jobs import JobRecord, iso
from services.scheduler.machine import Limits, Machine
from services.scheduler.runners import RunnerInfo

T0 = 1_800_000_000.0
SETTINGS = Settings(state_secret="s3cret", gateway_url="http://gw.example:8000")


def submission(module_type: str, action: str = "APPLY-AUTO") -> dict[str, Any]:
    return schemas.check(
        "submit_message",
        {
            "organization": "acme",
            "environment": "stg",
            "module_type": module_type,
            "module_name": "network",
            "action": action,
            "variables": {},
            "sensitive": [],
            "timeout_s": None,
            "requested_by": "alice",
            "submitted_at": iso(T0),
        },
    )


def admit(module_type: str, action: str = "APPLY-AUTO") -> list[Any]:
    machine = Machine(Limits.from_settings(SETTINGS))
    runner = RunnerInfo(
        runner_id="r1", arch="amd64", kinds=frozenset({"terraform", "script"}), state="idle"
    )
    machine.observe_runners({"r1": runner}, T0)
    return machine.admit(42, submission(module_type, action), T0)


@pytest.mark.parametrize("action", ["PLAN", "APPLY-AUTO", "DESTROY"])
def test_terraform_dispatch_carries_credentials_for_its_workspace(action: str) -> None:
    [dispatch] = [e for e in admit("amd64/terraform", action) if isinstance(e, Dispatch)]
    state = schemas.check("dispatch", dispatch.payload)["state"]
    assert state == {
        "address": "http://gw.example:8000/api/state/acme/stg/network",
        "username": "build-42",
        "password": state["password"],
    }
    path = state_auth.state_path("acme", "stg", "network")
    assert state_auth.verify("s3cret", state["username"], state["password"], path) == 42
    assert state_auth.verify("s3cret", state["username"], state["password"], path + "x") is None


def test_script_dispatch_has_no_state() -> None:
    [dispatch] = [e for e in admit("amd64/script") if isinstance(e, Dispatch)]
    assert "state" not in dispatch.payload


def test_credentials_are_not_in_events_or_the_stored_record() -> None:
    effects = admit("amd64/terraform")
    [dispatch] = [e for e in effects if isinstance(e, Dispatch)]
    password = dispatch.payload["state"]["password"]
    others = [e for e in effects if isinstance(e, PublishEvent | SaveJob)]
    assert len(others) == 2
    for effect in others:
        text = codec.dumps_str(effect.payload if isinstance(effect, PublishEvent) else effect.value)
        assert password not in text and "state" not in codec.loads(text)


def test_the_secret_is_not_in_the_limits_repr() -> None:
    assert "s3cret" not in repr(Limits.from_settings(SETTINGS))


def test_a_state_of_the_wrong_shape_is_refused_by_the_schema() -> None:
    record = JobRecord(
        job={**_job_object(), "module_type": "amd64/terraform"},
        variables={},
        sensitive=[],
        timeout_s=60,
    )
    message = record.dispatch("s3cret", "http://gw")
    schemas.check("dispatch", message)
    message["state"] = {"address": "http://gw/api/state/acme/stg/network"}
    with pytest.raises(schemas.SchemaError):
        schemas.check("dispatch", message)


def _job_object() -> dict[str, Any]:
    return {
        "build_id": 5,
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "network",
        "action": "PLAN",
        "status": "IN-PROGRESS",
        "reason": None,
        "exit_code": None,
        "runner_id": None,
        "queue_position": None,
        "seq": 1,
        "requested_by": None,
        "submitted_at": iso(T0),
        "started_at": None,
        "finished_at": None,
        "updated_at": iso(T0),
    }
