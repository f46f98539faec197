"""Ingestion's pure part: a batch of events as rows, jobs collapsed to the newest seq."""

from __future__ import annotations

from typing import Any

from services.common import codec
from services.gateway.ingest import Decoded, event_rows
from services.gateway.pull import stream_seq

AT = "2026-11-24T07:00:00.123Z"


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


def decoded(stream_seq: int, body: dict[str, Any]) -> Decoded:
    return Decoded(stream_seq, "xoogify.events.acme.stg.1", body, None, codec.dumps(body))


def test_one_job_row_per_build_with_its_highest_seq() -> None:
    batch = [
        decoded(10, event(1, 1, "IN-PROGRESS")),
        decoded(11, event(1, 3, "SUCCESS")),
        decoded(12, event(1, 2, "WORKING")),  # late: must not win
        decoded(13, event(2, 1, "IN-PROGRESS")),
    ]
    upserts, inserts, _ = event_rows(batch)
    assert [i[0] for i in inserts] == ["1-1", "1-3", "1-2", "2-1"]
    # The stored payload is the message as received.
    assert [codec.loads(i[10]) for i in inserts] == [d.body for d in batch]
    by_build = {u[0]: u for u in upserts}
    assert set(by_build) == {1, 2}
    assert by_build[1][6] == "SUCCESS" and by_build[1][11] == 3 and by_build[1][17] == 11
    assert by_build[2][11] == 1


def test_variables_only_when_the_event_carries_them() -> None:
    with_vars = event(1, 1) | {"variables": {"A": "1"}}
    (u1,), _, fills1 = event_rows([decoded(1, with_vars)])
    (u2,), _, fills2 = event_rows([decoded(2, event(2, 1))])
    assert u1[18] == {"A": "1"} and u2[18] is None
    assert fills1 == [(1, {"A": "1"})] and fills2 == []


def test_collapsing_keeps_the_variables_of_the_first_event() -> None:
    first = event(1, 1, "IN-PROGRESS") | {"variables": {"A": "1", "S": "***"}}
    (upsert,), _, fills = event_rows(
        [decoded(1, first), decoded(2, event(1, 2)), decoded(3, event(1, 3, "SUCCESS"))]
    )
    assert upsert[11] == 3 and upsert[18] == {"A": "1", "S": "***"}
    assert fills == [(1, {"A": "1", "S": "***"})]


def test_stream_seq_from_both_reply_subject_forms() -> None:
    from nats.aio.msg import Msg

    def msg(reply: str) -> Msg:
        return Msg(_client=None, subject="xoogify.events.acme.stg.1", reply=reply)  # type: ignore[arg-type]

    v1 = "$JS.ACK.XOOGIFY_EVENTS.ingest-events-gw.1.4711.12.1732431600000000000.3"
    v2 = "$JS.ACK.hub.ACCHASH.XOOGIFY_EVENTS.ingest-events-gw.2.4712.13.1732431600000000000.0.tok"
    assert stream_seq(msg(v1)) == 4711
    assert stream_seq(msg(v2)) == 4712
