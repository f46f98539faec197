"""A runner drops a copy of a dispatch message for a job it was already granted (its ack
was lost in a NATS failover): the scheduler would grant that same runner process its job
again, so claiming it would run the job twice."""

from __future__ import annotations

from typing import Any

from services.common import codec
from services.common.config import Settings
from services.runner.registry import Registry
from services.runner.work import Worker

DISPATCH = {
    "build_id": 7,
    "organization": "acme",
    "environment": "stg",
    "module_type": "amd64/script",
    "module_name": "hello",
    "action": "PLAN",
    "variables": {},
    "sensitive": [],
    "timeout_s": 60,
    "attempt": 1,
}


class Delivered:
    """What _handle needs of a JetStream message: its data, and the answer it gets."""

    subject = "xoogify.dispatch.amd64.script"

    def __init__(self, body: dict[str, Any]) -> None:
        self.data = codec.dumps(body)
        self.answers: list[str] = []

    async def ack(self) -> None:
        self.answers.append("ack")

    async def nak(self, delay: float | None = None) -> None:
        self.answers.append("nak")


async def test_a_copy_of_a_granted_dispatch_is_acked_and_never_claimed() -> None:
    registry = Registry(None, "runner-t", "amd64", ["script"], {}, 1.0)
    # No NATS connection: any attempt to claim (subscribe, request) would fail the test.
    worker = Worker(None, None, None, Settings(), registry, 5.0)  # type: ignore[arg-type]
    worker._granted[(7, 1)] = None
    msg = Delivered(DISPATCH)
    await worker._handle(msg)  # type: ignore[arg-type]
    assert msg.answers == ["ack"]
