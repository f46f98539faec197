"""`jspub` without servers: what an answer means (ack, duplicate, error, no stream), which
publish an answer belongs to (out of order, strangers, late ones) and the timeout sweep."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, ServiceUnavailableError

from services.common.jspub import Ack, JsPublisher, outcome, token_of
from tests.support import eventually

WRONG_LAST = b'{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 4"}}'


def test_an_ack_with_and_without_the_duplicate_flag() -> None:
    assert outcome(b'{"stream":"EV","seq":42}', None) == Ack("EV", 42, False)
    assert outcome(b'{"stream":"EV","seq":42,"duplicate":true}', None) == Ack("EV", 42, True)
    assert outcome(b'{"stream":"EV","domain":"hub","seq":7}', None) == Ack("EV", 7, False)


def test_an_error_answer_is_nats_py_s_exception_for_its_code() -> None:
    error = outcome(WRONG_LAST, None)
    assert isinstance(error, BadRequestError)
    assert (error.code, error.err_code, error.description) == (400, 10071, "wrong last sequence: 4")
    unavailable = outcome(b'{"error":{"code":503,"description":"no leader"}}', None)
    assert isinstance(unavailable, ServiceUnavailableError)


def test_a_status_answer_or_junk_is_an_error() -> None:
    assert isinstance(outcome(b"", ("503", "")), NoStreamResponseError)
    timeout = outcome(b"", ("408", "Request Timeout"))
    assert isinstance(timeout, APIError) and timeout.code == 408
    assert isinstance(outcome(b"not json", None), APIError)
    assert isinstance(outcome(b'{"seq":1}', None), APIError)
    assert isinstance(outcome(b"[1]", None), APIError)


def test_the_token_is_the_reply_subject_s_last_part() -> None:
    assert token_of(b"_INBOX.abc.17", len("_INBOX.abc.")) == 17
    assert token_of("_INBOX.abc.17", len("_INBOX.abc.")) == 17
    assert token_of(b"_INBOX.abc.x", len("_INBOX.abc.")) is None


class FakeClient:
    """What JsPublisher needs of a nats-py client; keeps what was published."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, str, dict[str, str] | None]] = []

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any) -> Any:
        return type("Sub", (), {"_id": 1, "unsubscribe": staticmethod(_nothing)})()

    async def publish(
        self, subject: str, payload: bytes, reply: str, headers: dict[str, str] | None
    ) -> None:
        self.sent.append((subject, payload, reply, headers))


async def _nothing() -> None:
    return None


async def _started(**options: Any) -> tuple[JsPublisher, FakeClient]:
    """A publisher on a fake client; the tests hand it answers as the raw route would."""
    nc = FakeClient()
    pub = JsPublisher(nc, **options)  # type: ignore[arg-type]
    await pub.start(raw=False)
    return pub, nc


async def test_answers_reach_their_own_publish_in_any_order() -> None:
    pub, nc = await _started()
    first = await pub.send("ev.1", b"a", {"Nats-Msg-Id": "1"})
    second = await pub.send("ev.2", b"b")
    assert [reply for _, _, reply, _ in nc.sent] == ["_INBOX.test.1", "_INBOX.test.2"]
    assert nc.sent[0][3] == {"Nats-Msg-Id": "1"}
    pub._on_raw(b"_INBOX.test.2", b"", b'{"stream":"EV","seq":9}', None)
    pub._on_raw(b"_INBOX.test.99", b"", b'{"stream":"EV","seq":1}', None)  # not ours
    pub._on_raw(b"_INBOX.test.1", b"", WRONG_LAST, None)
    assert second.result() == Ack("EV", 9, False)
    with pytest.raises(BadRequestError):
        first.result()
    pub._on_raw(b"_INBOX.test.1", b"", b'{"stream":"EV","seq":1}', None)  # a late copy
    assert pub.in_flight == 0
    await pub.close()


async def test_a_no_responders_status_fails_its_publish() -> None:
    pub, _ = await _started()
    future = await pub.send("nowhere", b"a")
    pub._on_raw(b"_INBOX.test.1", b"", b"", b"NATS/1.0 503\r\n\r\n")
    with pytest.raises(NoStreamResponseError):
        future.result()
    await pub.close()


async def test_an_unanswered_publish_times_out_and_a_late_answer_is_dropped() -> None:
    pub, _ = await _started()
    future = await pub.send("ev.1", b"a", timeout=0.01)
    with pytest.raises(NatsTimeoutError):
        await asyncio.wait_for(future, 5)
    assert pub.in_flight == 0
    pub._on_raw(b"_INBOX.test.1", b"", b'{"stream":"EV","seq":1}', None)
    assert pub._timer is None  # nothing outstanding: no sweep scheduled
    await pub.close()


async def test_a_full_window_waits_for_an_answer() -> None:
    pub, nc = await _started(window=2)
    await pub.send("ev.1", b"a")
    await pub.send("ev.2", b"b")
    third = asyncio.ensure_future(pub.send("ev.3", b"c"))

    async def waiting_for_room() -> bool:
        return pub._waiting

    await eventually(waiting_for_room, timeout=5)
    assert not third.done() and len(nc.sent) == 2
    pub._on_raw(b"_INBOX.test.1", b"", b'{"stream":"EV","seq":1}', None)
    await asyncio.wait_for(third, 5)
    assert len(nc.sent) == 3
    await pub.close()
