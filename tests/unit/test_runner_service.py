"""Small pure parts of the runner service: arch names, kinds, drain timeout, outcomes."""

from __future__ import annotations

import pytest

from services.runner.counters import job_result
from services.runner.job import Outcome
from services.runner.process import shell_exit_code
from services.runner.service import (
    DEFAULT_DRAIN_TIMEOUT_S,
    default_runner_id,
    drain_timeout_from_env,
    normalize_arch,
    runnable_kinds,
)


@pytest.mark.parametrize(
    ("raw", "arch"),
    [("x86_64", "amd64"), ("aarch64", "arm64"), ("amd64", "amd64"), ("riscv64", "riscv64")],
)
def test_normalize_arch(raw: str, arch: str) -> None:
    assert normalize_arch(raw) == arch


def test_runnable_kinds_drops_kinds_without_an_executor_and_repeats() -> None:
    assert runnable_kinds(["script", "nonesuch", "script"]) == ["script"]
    with pytest.raises(ValueError, match="none of the kinds"):
        runnable_kinds(["nonesuch"])


def test_default_runner_id_is_unique_and_valid() -> None:
    a, b = default_runner_id(), default_runner_id()
    assert a != b and a.startswith("runner-")


def test_drain_timeout_from_env() -> None:
    assert drain_timeout_from_env({}) == DEFAULT_DRAIN_TIMEOUT_S
    assert drain_timeout_from_env({"XOOGIFY_DRAIN_TIMEOUT_S": "2.5"}) == 2.5


def test_outcome_report_fields() -> None:
    assert Outcome(exit_code=3).report_fields() == {"exit_code": 3, "reason": None}
    assert Outcome(reason="cancelled").report_fields() == {"exit_code": None, "reason": "cancelled"}


def test_job_result_labels() -> None:
    assert job_result(0, None) == "success"
    assert job_result(3, None) == "exit-code"
    assert job_result(None, "cancelled") == "cancelled"


def test_shell_exit_code() -> None:
    assert shell_exit_code(0) == 0
    assert shell_exit_code(3) == 3
    assert shell_exit_code(-9) == 137  # killed by SIGKILL
