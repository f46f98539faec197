"""Properties of the status state machine (services/common/status.py): check_transition
agrees with CONTRACT.md's rules for any move, a walk of allowed moves only goes forward and
ends at most once, and a reader keeping `newest` ends with the last event whatever order
and however many times the events arrive."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.status import FINAL, Reason, Status, TransitionError, check_transition, newest

STATUSES = [s.value for s in Status]
REASONS = [None, *(r.value for r in Reason), "bogus"]
# CONTRACT.md's table, written out again here as the oracle.
FAILURE_FROM = {
    "IN-PROGRESS": {"cancelled", "no-runner", "invalid-module", "internal"},
    "WORKING": {"exit-code", "cancelled", "timeout", "runner-lost", "invalid-module", "internal"},
}
MOVES = {("IN-PROGRESS", "IN-PROGRESS"), ("IN-PROGRESS", "WORKING"), ("WORKING", "SUCCESS")}
RANK = {"IN-PROGRESS": 0, "WORKING": 1, "SUCCESS": 2, "FAILURE": 2}


def contract_allows(current: str, new: str, reason: str | None) -> bool:
    if current in FINAL:
        return False
    if new == "FAILURE":
        return reason in FAILURE_FROM[current]
    # Only a FAILURE carries a reason.
    return reason is None and (current, new) in MOVES


def allowed(current: str, new: str, reason: str | None) -> bool:
    try:
        check_transition(current, new, reason)
    except TransitionError:
        return False
    return True


@given(
    current=st.sampled_from(STATUSES),
    new=st.sampled_from(STATUSES),
    reason=st.sampled_from(REASONS),
)
def test_check_transition_is_the_contract(current: str, new: str, reason: str | None) -> None:
    assert allowed(current, new, reason) == contract_allows(current, new, reason)


moves = st.lists(st.tuples(st.sampled_from(STATUSES), st.sampled_from(REASONS)), max_size=30)


@given(proposals=moves)
def test_a_walk_of_allowed_moves_only_goes_forward_and_ends_once(
    proposals: list[tuple[str, str | None]],
) -> None:
    status = "IN-PROGRESS"
    ended = 0
    for new, reason in proposals:
        if not allowed(status, new, reason):
            continue
        assert RANK[new] >= RANK[status]
        if new == "FAILURE":
            assert reason is not None
        status = new
        ended += status in FINAL
    assert ended <= 1


def life(statuses: list[tuple[str, str | None]]) -> list[dict[str, Any]]:
    """A job's events, seq 1.., from a walk of allowed moves (refused ones dropped)."""
    events = [{"build_id": 7, "seq": 1, "status": "IN-PROGRESS", "reason": None}]
    for new, reason in statuses:
        last = events[-1]
        if allowed(str(last["status"]), new, reason):
            events.append({**last, "seq": int(last["seq"]) + 1, "status": new, "reason": reason})
    return events


@st.composite
def deliveries(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(a job's events, the same events as a reader gets them: any order, with repeats)."""
    events = life(draw(moves))
    repeats = draw(st.lists(st.sampled_from(events), max_size=10))
    return events, draw(st.permutations(events + repeats))


@settings(max_examples=300)
@given(case=deliveries())
def test_newest_ends_with_the_last_event_whatever_the_order(
    case: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    events, arrived = case
    kept: dict[str, Any] | None = None
    for event in arrived:
        before = kept
        kept = newest(kept, event)
        # Never backwards: a late or repeated event does not replace a newer copy.
        assert before is None or kept["seq"] >= before["seq"]
        assert before is None or RANK[kept["status"]] >= RANK[before["status"]]
    assert kept == events[-1]
