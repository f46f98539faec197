"""The status state machine: every row of CONTRACT.md's reason table, the moves that are
refused, and readers that keep the newest copy whatever order events arrive in."""

from __future__ import annotations

import itertools
import random

import pytest

from services.common.status import Reason, Status, TransitionError, check_transition, newest

# CONTRACT.md: reason → (allowed from IN-PROGRESS, allowed from WORKING)
REASON_TABLE = {
    "exit-code": (False, True),
    "cancelled": (True, True),
    "timeout": (False, True),
    "runner-lost": (False, True),
    "no-runner": (True, False),
    "invalid-module": (True, True),
    "internal": (True, True),
}


def test_reason_table_covers_every_reason() -> None:
    assert set(REASON_TABLE) == {r.value for r in Reason}


@pytest.mark.parametrize("reason", sorted(REASON_TABLE))
@pytest.mark.parametrize("current", ["IN-PROGRESS", "WORKING"])
def test_failure_reasons_per_contract_table(current: str, reason: str) -> None:
    allowed = REASON_TABLE[reason][0 if current == "IN-PROGRESS" else 1]
    if allowed:
        check_transition(current, "FAILURE", reason)
    else:
        with pytest.raises(TransitionError):
            check_transition(current, "FAILURE", reason)


@pytest.mark.parametrize(
    ("current", "new", "reason"),
    [
        ("IN-PROGRESS", "WORKING", None),
        ("IN-PROGRESS", "IN-PROGRESS", None),  # a queue_position change
        ("WORKING", "SUCCESS", None),
    ],
)
def test_forward_moves_allowed(current: str, new: str, reason: str | None) -> None:
    check_transition(current, new, reason)


@pytest.mark.parametrize(
    ("current", "new", "reason"),
    [
        ("IN-PROGRESS", "SUCCESS", None),  # never ran
        ("WORKING", "IN-PROGRESS", None),  # backwards
        ("WORKING", "WORKING", None),
        ("WORKING", "SUCCESS", "exit-code"),  # success carries no reason
        ("WORKING", "FAILURE", None),  # failure needs one
        ("WORKING", "FAILURE", "bogus"),
        *[(final, new, None) for final in ("SUCCESS", "FAILURE") for new in Status],
        ("FAILURE", "FAILURE", "cancelled"),
    ],
)
def test_refused_moves(current: str, new: str, reason: str | None) -> None:
    with pytest.raises(TransitionError):
        check_transition(current, new, reason)


def _life() -> list[dict[str, object]]:
    """A job's events: queued twice (queue_position changes), working, failed."""
    base = {"build_id": 7, "status": "IN-PROGRESS", "queue_position": 2, "runner_id": None}
    return [
        {**base, "seq": 1},
        {**base, "seq": 2, "queue_position": 1},
        {**base, "seq": 3, "queue_position": None},
        {**base, "seq": 4, "status": "WORKING", "queue_position": None, "runner_id": "r1"},
        {**base, "seq": 5, "status": "FAILURE", "queue_position": None, "runner_id": "r1"},
    ]


def _fold(events: list[dict[str, object]]) -> dict[str, object] | None:
    job = None
    for event in events:
        job = newest(job, event)
    return job


def test_newest_in_order_ends_final() -> None:
    assert _fold(_life()) == _life()[-1]


def test_newest_every_permutation_and_duplicates_same_result() -> None:
    events = _life()
    expected = _fold(events)
    for order in itertools.permutations(events):
        assert _fold(list(order)) == expected
    assert _fold(events + events[::-1]) == expected


def test_newest_random_orders_with_repeats() -> None:
    events = _life()
    rng = random.Random(1234)
    for _ in range(500):
        stream = [rng.choice(events) for _ in range(rng.randint(1, 12))] + events
        rng.shuffle(stream)
        assert _fold(stream) == events[-1]


def test_newest_tie_keeps_current() -> None:
    first = {"seq": 3, "mark": "a"}
    assert newest(first, {"seq": 3, "mark": "b"}) is first
