"""A runner that was silent longer than its registry TTL (stopped, starved) stops the job
the scheduler has written off, as `runner-lost`; a runner in touch does nothing."""

from __future__ import annotations

from services.common.config import Settings
from services.common.status import Reason
from services.runner.control import StopRequest
from services.runner.registry import Registry
from services.runner.work import Worker


def _registry(heartbeat_s: float = 1.0) -> tuple[Registry, list[str]]:
    registry = Registry(None, "runner-t", "amd64", ["script"], {}, heartbeat_s)
    calls: list[str] = []
    registry.on_written_off = calls.append
    return registry, calls


def test_silence_within_the_ttl_writes_nothing_off() -> None:
    registry, calls = _registry()
    registry._last_ok -= 2.9  # just under 3 heartbeats
    registry._check_silence()
    assert calls == []


def test_silence_beyond_the_ttl_writes_the_job_off() -> None:
    registry, calls = _registry()
    registry._last_ok -= 10
    registry._check_silence()
    assert len(calls) == 1 and "counted lost" in calls[0]


def test_worker_stops_its_running_job_as_runner_lost() -> None:
    registry, _ = _registry()
    worker = Worker(None, None, None, Settings(), registry, 5.0)  # type: ignore[arg-type]
    worker.written_off("idle: nothing to stop")  # no job: nothing happens
    stop = StopRequest()
    worker._current = stop
    worker.written_off("out of touch")
    assert (stop.reason, stop.why) == (Reason.RUNNER_LOST, "out of touch")
