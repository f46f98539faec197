"""A pull `Delivery`'s acknowledgements: the payloads JetStream expects on its reply
subject (as nats-py's `Msg` sends them), and one final reply only."""

from __future__ import annotations

from typing import Any, cast

import pytest
from nats.aio.client import Client

from services.common.pull import Delivery

REPLY = "$JS.ACK.XOOGIFY_SUBMIT.scheduler.1.42.40.1700000000000000000.0"


class Recorder:
    """Stands in for the connection: records what would be published where."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, payload: bytes = b"") -> None:
        self.sent.append((subject, payload))


def delivery() -> tuple[Delivery, Recorder]:
    recorder = Recorder()
    return Delivery("xoogify.submit", REPLY, b"{}", cast(Client, recorder)), recorder


@pytest.mark.parametrize(
    ("reply", "payload"),
    [
        (lambda d: d.ack(), b""),
        (lambda d: d.nak(), b"-NAK"),
        (lambda d: d.nak(delay=1), b'-NAK {"delay":1000000000}'),
        (lambda d: d.nak(delay=0.25), b'-NAK {"delay":250000000}'),
        (lambda d: d.term(), b"+TERM"),
    ],
)
async def test_each_reply_sends_what_jetstream_expects(reply: Any, payload: bytes) -> None:
    d, recorder = delivery()
    await reply(d)
    assert recorder.sent == [(REPLY, payload)]


async def test_only_the_first_final_reply_is_sent() -> None:
    d, recorder = delivery()
    await d.in_progress()
    await d.in_progress()
    await d.ack()
    await d.nak(delay=1)
    await d.term()
    assert recorder.sent == [(REPLY, b"+WPI"), (REPLY, b"+WPI"), (REPLY, b"")]


def test_the_stream_sequence_comes_from_the_reply_subject() -> None:
    d, _ = delivery()
    assert d.stream_seq == 42


async def test_a_delivery_without_a_connection_cannot_be_acknowledged() -> None:
    d = Delivery("s", REPLY, b"")
    with pytest.raises(RuntimeError):
        await d.ack()
