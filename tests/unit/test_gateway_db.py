"""The gateway's pure query helpers: a `jobs` row as the contract's job object, and a
filter as the list query's parameters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from services.common.filters import JobFilter
from services.common.status import Status
from services.gateway.db import JOB_FIELDS, job_from_row, list_params


def row(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "build_id": 7,
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "PLAN",
        "status": "SUCCESS",
        "reason": None,
        "exit_code": 0,
        "runner_id": "r1",
        "queue_position": None,
        "seq": 3,
        "requested_by": "alice",
        "submitted_at": datetime(2026, 11, 24, 7, 0, 0, 123456, tzinfo=UTC),
        "started_at": datetime(2026, 11, 24, 9, 0, 1, tzinfo=timezone(timedelta(hours=2))),
        "finished_at": None,
        "updated_at": datetime(2026, 11, 24, 7, 0, 2, 5000, tzinfo=UTC),
        "variables": None,
        "stream_seq": 99,
    }
    base.update(changes)
    return base


def test_job_has_exactly_the_contract_fields_with_z_times_in_ms() -> None:
    job = job_from_row(row())
    assert tuple(job) == JOB_FIELDS
    assert job["submitted_at"] == "2026-11-24T07:00:00.123Z"
    assert job["started_at"] == "2026-11-24T07:00:01.000Z"  # converted to UTC
    assert job["updated_at"] == "2026-11-24T07:00:02.005Z"
    assert job["finished_at"] is None
    assert "stream_seq" not in job


def test_variables_are_included_only_when_known() -> None:
    assert "variables" not in job_from_row(row())
    assert job_from_row(row(variables={"A": "1"}))["variables"] == {"A": "1"}


def test_empty_filter_selects_everything_and_asks_one_row_more() -> None:
    params = list_params(JobFilter(), 50, None)
    assert params == (None, None, None, None, None, None, None, None, None, 51, None, False)


def test_scope_limits_the_list_to_those_organizations() -> None:
    assert list_params(JobFilter(), 50, None, ["globex", "acme"])[10] == ["globex", "acme"]
    assert list_params(JobFilter(), 50, None, [])[10] == []  # nothing, not everything


def test_each_filter_field_lands_in_its_own_parameter() -> None:
    flt = JobFilter.from_mapping(
        {
            "organization": "acme",
            "environment": "stg",
            "status": "FAILURE",
            "action": "APPLY",
            "module_type": "amd64/terraform",
            "module_name": "network",
        }
    )
    assert list_params(flt, 10, 42) == (
        "acme",
        "stg",
        "FAILURE",
        "APPLY",
        "amd64/terraform",
        "network",
        None,
        None,
        42,
        11,
        None,
        False,
    )


def test_only_an_unfinished_status_walks_the_unfinished_jobs() -> None:
    unfinished = {s: list_params(JobFilter(status=s), 5, None)[11] for s in Status}
    assert unfinished == {
        Status.IN_PROGRESS: True,
        Status.WORKING: True,
        Status.SUCCESS: False,
        Status.FAILURE: False,
    }


def test_q_is_lowered_and_like_wildcards_escaped() -> None:
    params = list_params(JobFilter(q="Net_100%\\"), 5, None)
    assert params[6] == "Net_100%\\"  # compared with the build ID as given
    assert params[7] == "net\\_100\\%\\\\"


def test_blank_q_means_no_q() -> None:
    assert list_params(JobFilter.from_mapping({"q": "   "}), 5, None)[6:8] == (None, None)
