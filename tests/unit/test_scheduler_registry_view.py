"""The scheduler's registry view across NATS outages: a runner whose key expired while
NATS was away keeps its place for one TTL after we are back in touch."""

from __future__ import annotations

from services.scheduler.runners import RegistryView, RunnerInfo

R1 = RunnerInfo("r1", "amd64", frozenset({"script"}), "busy")
R2 = RunnerInfo("r2", "amd64", frozenset({"script"}), "idle")


def test_a_vanished_key_is_absent_at_once_without_an_outage() -> None:
    view = RegistryView(ttl_s=3)
    assert view.judge({"r1": R1, "r2": R2}, 0.0, reconnects=0).keys() == {"r1", "r2"}
    assert view.judge({"r2": R2}, 1.0, reconnects=0).keys() == {"r2"}


def test_after_a_reconnect_absent_runners_are_held_for_one_ttl() -> None:
    view = RegistryView(ttl_s=3)
    view.judge({"r1": R1, "r2": R2}, 0.0, reconnects=0)
    assert view.judge({"r2": R2}, 5.0, reconnects=1).keys() == {"r1", "r2"}
    assert view.judge({"r2": R2}, 7.9, reconnects=1).keys() == {"r1", "r2"}
    # r1 never came back within the TTL: now it is gone.
    assert view.judge({"r2": R2}, 8.0, reconnects=1).keys() == {"r2"}


def test_a_failed_sweep_counts_as_an_outage() -> None:
    view = RegistryView(ttl_s=3)
    view.judge({"r1": R1}, 0.0, reconnects=0)
    view.failed()
    assert view.judge({}, 4.0, reconnects=0).keys() == {"r1"}
    assert view.judge({}, 7.0, reconnects=0) == {}


def test_a_fresh_registration_replaces_the_held_one() -> None:
    view = RegistryView(ttl_s=3)
    view.judge({"r1": R1}, 0.0, reconnects=0)
    again = RunnerInfo("r1", "amd64", frozenset({"script"}), "idle", started_at=9.0)
    assert view.judge({"r1": again}, 5.0, reconnects=1)["r1"] is again
