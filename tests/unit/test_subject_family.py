"""Metric labels per subject family, never one per runner or build."""

from __future__ import annotations

from services.common.subjects import Subjects, family


def test_families_of_the_per_runner_and_per_build_subjects() -> None:
    s = Subjects("xoogify")
    assert family(s, s.report("runner-7")) == "xoogify.report.>"
    assert family(s, s.cancel(42)) == "xoogify.cancel.*"
    assert family(s, s.event("acme", "stg", 42)) == "xoogify.events.>"
    assert family(s, s.log(42)) == "xoogify.logs.>"


def test_bounded_subjects_and_strangers_are_their_own_family() -> None:
    s = Subjects("t1")
    assert family(s, s.submit) == "t1.submit"
    assert family(s, s.dispatch("amd64", "script")) == "t1.dispatch.amd64.script"
    assert family(s, "xoogify.report.r1") == "xoogify.report.r1"  # another prefix
