"""A job as the scheduler keeps it: the public job object plus what it needs to dispatch,
time out and cancel it. One JSON value per job in KV `xoogify-sched`, so a restarted
scheduler carries on where the last one stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.common import state_auth
from services.common.status import FINAL, MUTATING_ACTIONS, Status
from services.common.subjects import event_msg_id
from services.common.timefmt import format_time, parse_time

MASK = "***"


def iso(moment: float) -> str:
    """The contract's time format for an epoch instant (the scheduler's clock is epoch s)."""
    return format_time(datetime.fromtimestamp(moment, UTC))


def epoch(text: str) -> float:
    return parse_time(text).timestamp()


@dataclass
class JobRecord:
    job: dict[str, Any]  # exactly the contract's job object; what every event carries
    variables: dict[str, str]
    sensitive: list[str]
    timeout_s: int
    attempt: int = 1
    # The sensitive values sealed by the gateway for the runners (services.common.crypto),
    # bound to this build; the scheduler cannot open it and only passes it on. `variables`
    # holds "***" for those names.
    sealed: str | None = None
    # A stop was asked of the runner ("cancelled" or "timeout"), and when: the runner has
    # cancel_grace_s + 10 s to report before the scheduler ends the job itself.
    stop_reason: str | None = None
    stop_asked_at: float | None = None
    # The `started_at` of the claiming runner's registration (its own clock): another value
    # under the same runner_id later means that runner process restarted.
    runner_started_at: str | None = None
    # In memory only: rebuilt on reload (a re-dispatch of the same attempt is deduplicated
    # by its Nats-Msg-Id, and a duplicate message is refused at claim time anyway).
    dispatched: bool = field(default=False, compare=False)
    dispatch_seq: int | None = field(default=None, compare=False)
    no_runner_since: float | None = field(default=None, compare=False)
    stop_last_sent: float | None = field(default=None, compare=False)

    # --- views ----------------------------------------------------------------------------
    @property
    def build_id(self) -> int:
        return int(self.job["build_id"])

    @property
    def status(self) -> str:
        return str(self.job["status"])

    @property
    def final(self) -> bool:
        return self.job["status"] in FINAL

    @property
    def mutating(self) -> bool:
        return self.job["action"] in MUTATING_ACTIONS

    @property
    def workspace(self) -> tuple[str, str, str]:
        return (self.job["organization"], self.job["environment"], self.job["module_name"])

    @property
    def arch(self) -> str:
        return str(self.job["module_type"]).split("/", 1)[0]

    @property
    def kind(self) -> str:
        return str(self.job["module_type"]).split("/", 1)[1]

    @property
    def runner_id(self) -> str | None:
        value = self.job["runner_id"]
        return None if value is None else str(value)

    @property
    def started(self) -> float | None:
        value = self.job["started_at"]
        return None if value is None else epoch(value)

    @property
    def waiting(self) -> bool:
        """Held back by the workspace queue: a mutating job with others ahead of it."""
        return self.job["queue_position"] is not None

    @property
    def dispatchable(self) -> bool:
        return self.status == Status.IN_PROGRESS and self.runner_id is None and not self.waiting

    # --- messages -------------------------------------------------------------------------
    def event(self) -> dict[str, Any]:
        """The status event for the job's current seq (schema job_event)."""
        payload = dict(self.job)
        payload["event_id"] = event_msg_id(self.build_id, int(self.job["seq"]))
        if self.job["seq"] == 1:
            # Only the first event carries the variables, sensitive values masked.
            payload["variables"] = {
                k: MASK if k in self.sensitive else v for k, v in self.variables.items()
            }
        return payload

    def dispatch(self, state_secret: str = "", gateway_url: str = "") -> dict[str, Any]:
        """The work message for runners (schema dispatch), with the variables (sensitive ones
        only sealed, in `secrets`); a terraform
        job also gets its workspace's state backend address and per-job credentials (only
        here: never in a status event)."""
        job = self.job
        message: dict[str, Any] = {
            "build_id": self.build_id,
            "organization": job["organization"],
            "environment": job["environment"],
            "module_type": job["module_type"],
            "module_name": job["module_name"],
            "action": job["action"],
            "variables": dict(self.variables),
            "sensitive": list(self.sensitive),
            "timeout_s": self.timeout_s,
            "attempt": self.attempt,
        }
        if self.sealed is not None:
            message["secrets"] = self.sealed
        if self.kind == "terraform":
            message["state"] = state_auth.issue(
                state_secret, gateway_url, self.build_id, *self.workspace
            ).as_dict()
        return message

    @property
    def dispatch_msg_id(self) -> str:
        return f"dispatch-{self.build_id}-{self.attempt}"

    # --- storage --------------------------------------------------------------------------
    def to_value(self) -> dict[str, Any]:
        # Copies: an effect holds this value while the record goes on changing.
        return {
            "job": dict(self.job),
            "variables": dict(self.variables),
            "sensitive": list(self.sensitive),
            "timeout_s": self.timeout_s,
            "attempt": self.attempt,
            "sealed": self.sealed,
            "stop_reason": self.stop_reason,
            "stop_asked_at": self.stop_asked_at,
            "runner_started_at": self.runner_started_at,
        }

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> JobRecord:
        return cls(
            job=dict(value["job"]),
            variables=dict(value["variables"]),
            sensitive=list(value["sensitive"]),
            timeout_s=int(value["timeout_s"]),
            attempt=int(value.get("attempt", 1)),
            sealed=value.get("sealed"),
            stop_reason=value.get("stop_reason"),
            stop_asked_at=value.get("stop_asked_at"),
            runner_started_at=value.get("runner_started_at"),
        )
