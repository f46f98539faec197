"""Batches stored at once are acknowledged in the order they were read
(services/gateway/landing.py): an ack covers everything before it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.gateway.landing import InOrder


class Batch:
    def __init__(self, n: int) -> None:
        self.n = n


def test_a_batch_landing_before_an_earlier_one_waits_for_it() -> None:
    order: InOrder[Batch] = InOrder()
    first, second, third = Batch(1), Batch(2), Batch(3)
    for b in (first, second, third):
        order.start(b)
    assert order.land(second) == []
    assert len(order) == 3
    assert order.land(first) == [first, second]
    assert len(order) == 1
    assert order.land(third) == [third]
    assert len(order) == 0


def test_equal_batches_are_told_apart() -> None:
    # Two batches with the same contents (a redelivery) are still two batches.
    order: InOrder[list[int]] = InOrder()
    a, b = [1, 2], [1, 2]
    order.start(a)
    order.start(b)
    assert order.land(b) == []
    assert order.land(a) == [a, b]


@given(st.permutations(list(range(8))))
def test_whatever_order_they_land_in_they_come_out_in_start_order(landing: list[int]) -> None:
    order: InOrder[Batch] = InOrder()
    batches = [Batch(n) for n in range(8)]
    for b in batches:
        order.start(b)
    out: list[int] = []
    landed: set[int] = set()
    for n in landing:
        ready = order.land(batches[n])
        landed.add(n)
        out += [b.n for b in ready]
        # Handed back: exactly the longest prefix of started batches that all landed.
        prefix = 0
        while prefix in landed:
            prefix += 1
        assert out == list(range(prefix))
    assert out == list(range(8))
    assert len(order) == 0


def test_landing_again_after_being_handed_back_changes_nothing() -> None:
    # A batch whose ack step failed is stored and landed again. That must leave no mark: a
    # later object may get the same id (here: the same object started again).
    order: InOrder[Batch] = InOrder()
    first, second = Batch(1), Batch(2)
    order.start(first)
    assert order.land(first) == [first]
    assert order.land(first) == []
    order.start(first)
    order.start(second)
    assert order.land(second) == []
    assert len(order) == 2
    assert order.land(first) == [first, second]
