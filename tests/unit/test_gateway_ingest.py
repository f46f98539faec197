"""Ingestion's pure part: a delivery checked against its schema and subject, and what the
reader (`pull.PullReader`) reads from nats-py's raw deliveries (stream sequence, status
messages)."""

from __future__ import annotations

from typing import Any

import pytest

from services.common import codec
from services.common.pull import Delivery, reply_stream_seq, status_of, stream_seq
from services.gateway.ingest import _chunk_matches_subject, _decode, _event_matches_subject

AT = "2026-11-24T07:00:00.123Z"
REPLY = "$JS.ACK.XOOGIFY_EVENTS.ingest-events-gw.1.{seq}.12.1732431600000000000.3"


def event(build_id: int, seq: int, status: str = "WORKING") -> dict[str, Any]:
    return {
        "build_id": build_id,
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "PLAN",
        "status": status,
        "reason": None,
        "exit_code": None,
        "runner_id": None,
        "queue_position": None,
        "seq": seq,
        "requested_by": "alice",
        "submitted_at": AT,
        "started_at": None,
        "finished_at": None,
        "updated_at": AT,
        "event_id": f"{build_id}-{seq}",
    }


def delivery(body: Any, subject: str = "xoogify.events.acme.stg.1", seq: int = 7) -> Delivery:
    data = body if isinstance(body, bytes) else codec.dumps(body)
    return Delivery(subject, REPLY.format(seq=seq), data)


def test_a_valid_event_is_kept_as_received() -> None:
    d = _decode(delivery(event(1, 2)), "job_event", _event_matches_subject)
    assert d.error is None and d.body == event(1, 2)
    assert d.stream_seq == 7 and d.raw == codec.dumps(event(1, 2))


@pytest.mark.parametrize(
    ("data", "subject", "error"),
    [
        (b"{not json", "xoogify.events.acme.stg.1", "not valid JSON"),
        ({"build_id": 1}, "xoogify.events.acme.stg.1", "organization"),
        (event(1, 2), "xoogify.events.acme.stg.2", "does not match"),
        (event(1, 2), "xoogify.events.other.stg.1", "does not match"),
        (event(1, 2) | {"event_id": "1-3"}, "xoogify.events.acme.stg.1", "event_id"),
        # The separator of payloads on their way to Postgres: never in valid JSON.
        (codec.dumps(event(1, 2)) + b"\x1e", "xoogify.events.acme.stg.1", "RS"),
    ],
)
def test_a_bad_event_is_an_error_that_names_the_problem(
    data: Any, subject: str, error: str
) -> None:
    d = _decode(delivery(data, subject), "job_event", _event_matches_subject)
    assert d.body is None and d.error is not None and error in d.error
    assert d.stream_seq == 7  # recorded with its place in the stream


def test_a_chunk_must_be_on_its_builds_subject() -> None:
    chunk = {"build_id": 4, "offset": 0, "data": "x", "eof": False}
    good = _decode(delivery(chunk, "xoogify.logs.4"), "log_chunk", _chunk_matches_subject)
    bad = _decode(delivery(chunk, "xoogify.logs.5"), "log_chunk", _chunk_matches_subject)
    assert good.error is None and bad.error is not None and "does not match" in bad.error


def test_stream_seq_from_both_reply_subject_forms() -> None:
    from nats.aio.msg import Msg

    def msg(reply: str) -> Msg:
        return Msg(_client=None, subject="xoogify.events.acme.stg.1", reply=reply)  # type: ignore[arg-type]

    v1 = "$JS.ACK.XOOGIFY_EVENTS.ingest-events-gw.1.4711.12.1732431600000000000.3"
    v2 = "$JS.ACK.hub.ACCHASH.XOOGIFY_EVENTS.ingest-events-gw.2.4712.13.1732431600000000000.0.tok"
    assert reply_stream_seq(v1) == stream_seq(msg(v1)) == 4711
    assert reply_stream_seq(v2) == stream_seq(msg(v2)) == 4712
    with pytest.raises(ValueError):
        reply_stream_seq("_INBOX.abc")


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, None),
        (b"NATS/1.0\r\nNats-Msg-Id: 1-1\r\n\r\n", None),
        (b"NATS/1.0 404 No Messages\r\n\r\n", ("404", "No Messages")),
        (
            b"NATS/1.0 408 Request Timeout\r\nNats-Pending-Messages: 1\r\n\r\n",
            ("408", "Request Timeout"),
        ),
        (b"NATS/1.0 409 Consumer Deleted\r\n\r\n", ("409", "Consumer Deleted")),
        (b"NATS/1.0 100 Idle Heartbeat\r\n\r\n", ("100", "Idle Heartbeat")),
        (b"NATS/1.0 503\r\n\r\n", ("503", "")),
    ],
)
def test_status_messages_are_told_from_deliveries(
    headers: bytes | None, expected: tuple[str, str] | None
) -> None:
    assert status_of(headers) == expected
