"""The lease arithmetic: when a leader must stop acting, from what its KV calls answered."""

from __future__ import annotations

from services.scheduler.leader import LeaseClock, LeaseTimes


def test_timings_follow_the_ttl() -> None:
    times = LeaseTimes(6.0)
    assert (times.renew_every_s, times.safety_s, times.poll_every_s) == (2.0, 2.0, 0.5)
    assert LeaseTimes(1.5).poll_every_s == 0.25


def test_nothing_held_before_a_grant() -> None:
    clock = LeaseClock(LeaseTimes(6.0))
    assert not clock.held(0.0)
    assert clock.remaining(0.0) == 0.0


def test_grant_counts_from_when_the_request_was_sent() -> None:
    clock = LeaseClock(LeaseTimes(6.0))
    clock.granted(revision=7, sent_at=100.0)
    # The server stamped the key later than 100.0, so it cannot expire before 106.0; we
    # stop a safety margin earlier.
    assert clock.held(103.99)
    assert not clock.held(104.0)
    assert clock.remaining(101.0) == 3.0


def test_renewal_moves_the_deadline_and_revision() -> None:
    clock = LeaseClock(LeaseTimes(6.0))
    clock.granted(7, 100.0)
    clock.granted(9, 102.0)
    assert clock.revision == 9
    assert clock.held(105.9) and not clock.held(106.0)


def test_a_late_answer_to_an_old_request_does_not_extend_past_its_send_time() -> None:
    clock = LeaseClock(LeaseTimes(6.0))
    # A renew sent at 100 answered only at 103.5: valid until 104 all the same.
    clock.granted(8, 100.0)
    assert not clock.held(104.5)


def test_lost_is_lost_at_once() -> None:
    clock = LeaseClock(LeaseTimes(6.0))
    clock.granted(7, 100.0)
    clock.lost()
    assert not clock.held(100.5)
    assert clock.revision is None
