"""The ingestion watermark: only a contiguous prefix of processed sequences counts."""

from __future__ import annotations

from services.gateway.watermark import Contiguity


def test_in_order_advances() -> None:
    c = Contiguity()
    assert c.add([1, 2, 3]) == 3
    assert c.waiting == 0


def test_a_hole_holds_the_watermark_until_filled() -> None:
    c = Contiguity()
    assert c.add([1, 3, 4]) == 1
    assert c.waiting == 2
    assert c.add([2]) == 4
    assert c.waiting == 0


def test_duplicates_and_old_sequences_change_nothing() -> None:
    c = Contiguity(5)
    assert c.add([3, 5, 5]) == 5
    assert c.waiting == 0
    assert c.add([7, 7]) == 5
    assert c.waiting == 1


def test_copy_is_independent() -> None:
    c = Contiguity()
    c.add([2])
    d = c.copy()
    d.add([1])
    assert (c.watermark, d.watermark) == (0, 2)


def test_skip_over_what_the_stream_no_longer_holds() -> None:
    c = Contiguity(2)
    c.add([10, 11, 13])
    assert c.skip_to(10) == 11  # 3..9 are gone for good; 12 may still come
    assert c.add([12]) == 13
    assert c.skip_to(5) == 13  # never backwards
