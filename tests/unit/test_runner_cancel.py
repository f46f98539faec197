"""A runner hears every job's cancel subject on one subscription: a cancel stops the job it
names if that job is being claimed or run here, and nothing else."""

from __future__ import annotations

from typing import Any

from services.common import codec
from services.common.config import Settings
from services.common.status import Reason
from services.runner.control import StopRequest
from services.runner.registry import Registry
from services.runner.work import Worker

SUBJECTS = Settings().subjects


class Received:
    def __init__(self, subject: str, body: dict[str, Any] | bytes) -> None:
        self.subject = subject
        self.data = body if isinstance(body, bytes) else codec.dumps(body)


def _worker() -> Worker:
    registry = Registry(None, "runner-t", "amd64", ["script"], {}, 1.0)
    return Worker(None, None, None, Settings(), registry, 5.0)  # type: ignore[arg-type]


async def test_a_cancel_stops_the_job_it_names() -> None:
    worker = _worker()
    stop = worker._stops[8] = StopRequest()
    body = {"build_id": 8, "reason": "cancelled", "requested_by": "alice"}
    await worker._on_cancel(Received(SUBJECTS.cancel(8), body))  # type: ignore[arg-type]
    assert (stop.reason, stop.why) == (Reason.CANCELLED, "cancelled by alice")


async def test_a_timeout_from_the_scheduler() -> None:
    worker = _worker()
    stop = worker._stops[9] = StopRequest()
    body = {"build_id": 9, "reason": "timeout"}
    await worker._on_cancel(Received(SUBJECTS.cancel(9), body))  # type: ignore[arg-type]
    assert stop.reason == Reason.TIMEOUT


async def test_cancels_of_other_jobs_and_mismatched_ones_are_ignored() -> None:
    worker = _worker()
    stop = worker._stops[8] = StopRequest()
    other = {"build_id": 9, "reason": "cancelled"}
    await worker._on_cancel(Received(SUBJECTS.cancel(9), other))  # type: ignore[arg-type]
    # The body names this runner's job, the subject another one: not for us.
    moved = {"build_id": 8, "reason": "cancelled"}
    await worker._on_cancel(Received(SUBJECTS.cancel(9), moved))  # type: ignore[arg-type]
    await worker._on_cancel(Received(SUBJECTS.cancel(8), b"not json"))  # type: ignore[arg-type]
    assert not stop.requested
