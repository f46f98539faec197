"""`xoogify watch`: where it starts reading and what it prints (pure, no servers)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from nats.js.api import DeliverPolicy

from services.cli.watch import Since, event_line, parse_since, plan_start
from services.common import codec

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)


def _event(status: str = "IN-PROGRESS") -> bytes:
    return codec.dumps(
        {
            "build_id": 7,
            "organization": "acme",
            "environment": "stg",
            "module_type": "amd64/script",
            "module_name": "hello",
            "action": "PLAN",
            "status": status,
            "reason": None,
            "exit_code": 0 if status == "SUCCESS" else None,
            "runner_id": None,
            "queue_position": None,
            "seq": 1,
            "requested_by": "alice",
            "submitted_at": "2026-11-24T07:00:00.123Z",
            "started_at": None,
            "finished_at": None,
            "updated_at": "2026-11-24T07:00:00.123Z",
            "event_id": "7-1",
        }
    )


def test_parse_since_sequence_and_durations() -> None:
    assert parse_since(None) == Since()
    assert parse_since("42") == Since(seq=42)
    assert parse_since("0") == Since(seq=0)
    assert parse_since("10m", NOW).moment == datetime(2026, 11, 24, 11, 50, tzinfo=UTC)
    assert parse_since("30s", NOW).moment == datetime(2026, 11, 24, 11, 59, 30, tzinfo=UTC)
    assert parse_since("2h", NOW).moment == datetime(2026, 11, 24, 10, 0, tzinfo=UTC)
    assert parse_since("1d", NOW).moment == datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["-3", "m", "10w", "1.5h", "ten", "", "²"])
def test_parse_since_rejects_other_text(bad: str) -> None:
    with pytest.raises(ValueError, match="--since"):
        parse_since(bad)


def test_plan_start_resumes_just_after_the_sequence() -> None:
    start = plan_start(Since(seq=10), first_seq=1)
    assert (start.deliver_policy, start.opt_start_seq, start.gap) == (
        DeliverPolicy.BY_START_SEQUENCE,
        11,
        None,
    )
    # Exactly the first retained one is no gap.
    assert plan_start(Since(seq=9), first_seq=10).gap is None


def test_plan_start_reports_a_gap_and_starts_at_the_first_retained() -> None:
    start = plan_start(Since(seq=3), first_seq=10)
    assert start.gap == {"type": "gap", "requested": 3, "first_available": 10}
    assert start.opt_start_seq == 10


def test_plan_start_by_time_and_live() -> None:
    start = plan_start(parse_since("10m", NOW), first_seq=1)
    assert start.deliver_policy is DeliverPolicy.BY_START_TIME
    assert start.opt_start_time == datetime(2026, 11, 24, 11, 50, tzinfo=UTC)
    assert plan_start(Since(), first_seq=5).deliver_policy is DeliverPolicy.NEW


def test_event_line_adds_stream_seq_and_filters_by_status() -> None:
    line = event_line(99, _event(), None)
    assert line is not None
    job = codec.loads(line)
    assert job["stream_seq"] == 99 and job["build_id"] == 7 and job["event_id"] == "7-1"
    assert event_line(99, _event(), "SUCCESS") is None
    assert event_line(99, _event("SUCCESS"), "SUCCESS") is not None


def test_event_line_skips_malformed_messages() -> None:
    assert event_line(1, b"not json", None) is None
    assert event_line(1, codec.dumps({"build_id": 1}), None) is None
