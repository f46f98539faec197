"""The job status state machine: which statuses and reasons exist and which moves are allowed.

Pure code shared by the scheduler (the only writer of status events) and by every reader
(gateway, page, CLI), who keep the copy of a job with the highest `seq`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Status(StrEnum):
    IN_PROGRESS = "IN-PROGRESS"
    WORKING = "WORKING"
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"


class Reason(StrEnum):
    EXIT_CODE = "exit-code"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    RUNNER_LOST = "runner-lost"
    NO_RUNNER = "no-runner"
    INVALID_MODULE = "invalid-module"
    INTERNAL = "internal"


FINAL = frozenset({Status.SUCCESS, Status.FAILURE})
ACTIONS = ("PLAN", "APPLY-AUTO", "DESTROY")
MUTATING_ACTIONS = frozenset({"APPLY-AUTO", "DESTROY"})

# Which FAILURE reasons the contract allows from each earlier status.
_FAILURE_REASONS: dict[Status, frozenset[Reason]] = {
    Status.IN_PROGRESS: frozenset(
        {
            Reason.CANCELLED,
            Reason.NO_RUNNER,
            Reason.INVALID_MODULE,
            Reason.INTERNAL,
        }
    ),
    Status.WORKING: frozenset(
        {
            Reason.EXIT_CODE,
            Reason.CANCELLED,
            Reason.TIMEOUT,
            Reason.RUNNER_LOST,
            Reason.INVALID_MODULE,
            Reason.INTERNAL,
        }
    ),
}


class TransitionError(ValueError):
    """A status change the contract does not allow."""


def is_final(status: str) -> bool:
    return status in FINAL


def check_transition(current: str, new: str, reason: str | None = None) -> None:
    """Raise TransitionError unless `current` → `new` (with `reason`) is allowed.

    IN-PROGRESS → IN-PROGRESS is allowed: it is a change of `queue_position`.
    """
    cur, nxt = Status(current), Status(new)
    if cur in FINAL:
        raise TransitionError(f"job is already {cur}; cannot become {nxt}")
    if nxt is not Status.FAILURE and reason is not None:
        # Only a FAILURE says why (a property test found IN-PROGRESS and WORKING let one by).
        raise TransitionError(f"{nxt} carries no reason")
    if nxt is Status.IN_PROGRESS:
        if cur is not Status.IN_PROGRESS:
            raise TransitionError(f"{cur} cannot go back to {nxt}")
        return
    if nxt is Status.WORKING:
        if cur is not Status.IN_PROGRESS:
            raise TransitionError(f"{cur} cannot become {nxt}")
        return
    if nxt is Status.SUCCESS:
        if cur is not Status.WORKING:
            raise TransitionError(f"{cur} cannot become {nxt}")
        return
    # FAILURE
    if reason is None:
        raise TransitionError("FAILURE needs a reason")
    try:
        why = Reason(reason)
    except ValueError:
        raise TransitionError(f"unknown reason {reason!r}") from None
    if why not in _FAILURE_REASONS[cur]:
        raise TransitionError(f"reason {why} is not allowed from {cur}")


def newest(current: dict[str, Any] | None, incoming: dict[str, Any]) -> dict[str, Any]:
    """The copy a reader keeps: the one with the highest `seq` (ties keep the current one).

    Applying events in any order, or twice, ends in the same job.
    """
    if current is None or int(incoming["seq"]) > int(current["seq"]):
        return incoming
    return current
