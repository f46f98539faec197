"""A runner opens a job's sealed values just before running it, and only for that build."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from services.common import crypto, schemas
from services.runner.job import Job

PRIVATE, PUBLIC = crypto.generate_sealing_pair()


def dispatch(sealed_for: int = 7, **over: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "build_id": 7,
        "organization": "acme",
        "environment": "stg",
        "module_type": "amd64/script",
        "module_name": "hello",
        "action": "APPLY-AUTO",
        "variables": {"region": "eu", "password": "***"},
        "sensitive": ["password"],
        "timeout_s": 60,
        "attempt": 1,
    }
    message.update(over)
    binding = crypto.Binding.of(sealed_for, message)
    message["secrets"] = crypto.Sealer(PUBLIC).seal({"password": "hunter2"}, binding)
    return schemas.check("dispatch", message)


def test_opened_puts_the_clear_values_in_and_masks_them() -> None:
    job = Job.from_dispatch(dispatch())
    assert job.variables["password"] == "***" and job.secrets() == ["***"]
    opened = job.opened(PRIVATE)
    assert opened.variables == {"region": "eu", "password": "hunter2"}
    assert opened.sealed is None
    assert opened.secrets() == ["hunter2"]  # what the log masks


def test_a_ciphertext_sealed_for_another_build_does_not_open() -> None:
    job = Job.from_dispatch(dispatch(sealed_for=6))
    with pytest.raises(crypto.SecretsError, match="build 7"):
        job.opened(PRIVATE)


def test_a_ciphertext_moved_into_another_job_does_not_open() -> None:
    sealed = Job.from_dispatch(dispatch()).sealed
    other = Job.from_dispatch(dispatch(module_name="printer"))
    with pytest.raises(crypto.SecretsError):
        replace(other, sealed=sealed).opened(PRIVATE)


def test_names_must_match_the_sensitive_list() -> None:
    job = Job.from_dispatch(
        dispatch(variables={"password": "***", "x": "***"}, sensitive=["password", "x"])
    )
    with pytest.raises(crypto.SecretsError, match="names"):
        job.opened(PRIVATE)


def test_a_job_without_sealed_values_needs_no_key() -> None:
    message = dispatch()
    del message["secrets"]
    job = Job.from_dispatch(message)
    assert job.opened("") is job
