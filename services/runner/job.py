"""The job as a runner receives it (a validated dispatch message), and how its run ends."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from services.common import crypto


@dataclass(frozen=True)
class Job:
    build_id: int
    organization: str
    environment: str
    module_type: str
    module_name: str
    action: str
    variables: dict[str, str]
    sensitive: list[str]
    timeout_s: int
    attempt: int
    state: dict[str, Any] | None = None
    # The sensitive values, sealed for the runners and bound to this build; `variables`
    # holds "***" for them until `opened` puts the clear values in, just before the run.
    sealed: str | None = None

    @classmethod
    def from_dispatch(cls, msg: dict[str, Any]) -> Job:
        """Build from a dispatch message already checked against `schemas/dispatch.json`."""
        return cls(
            build_id=int(msg["build_id"]),
            organization=msg["organization"],
            environment=msg["environment"],
            module_type=msg["module_type"],
            module_name=msg["module_name"],
            action=msg["action"],
            variables=dict(msg["variables"]),
            sensitive=list(msg["sensitive"]),
            timeout_s=int(msg["timeout_s"]),
            attempt=int(msg["attempt"]),
            state=msg.get("state"),
            sealed=msg.get("secrets"),
        )

    def opened(self, private_keys: str) -> Job:
        """This job with its sensitive values in clear (raises SecretsError when they do not
        open for this build). A job without sealed values needs no key."""
        if self.sealed is None:
            return self
        opener = crypto.Opener(private_keys)
        binding = crypto.Binding(
            self.build_id,
            self.organization,
            self.environment,
            self.module_name,
            self.module_type,
            self.action,
        )
        values = opener.open(self.sealed, binding)
        expected = {name for name in self.sensitive if name in self.variables}
        if set(values) != expected:
            raise crypto.SecretsError(
                f"the sealed values are for {sorted(values)}, the job names {sorted(expected)}"
            )
        return replace(self, variables={**self.variables, **values}, sealed=None)

    @property
    def arch(self) -> str:
        return self.module_type.split("/", 1)[0]

    @property
    def kind(self) -> str:
        return self.module_type.split("/", 1)[1]

    def secrets(self) -> list[str]:
        """Values to mask in the log: those of the variables named in `sensitive`, and the
        job's state backend password (a module that prints its environment shows it)."""
        values = [self.variables[name] for name in self.sensitive if self.variables.get(name)]
        if self.state and self.state.get("password"):
            values.append(str(self.state["password"]))
        return values


@dataclass(frozen=True)
class Outcome:
    """How a run ended: an exit code, or a reason when it could not run or was stopped."""

    exit_code: int | None = None
    reason: str | None = None

    def report_fields(self) -> dict[str, Any]:
        if self.reason is not None:
            return {"exit_code": None, "reason": str(self.reason)}
        return {"exit_code": self.exit_code, "reason": None}
