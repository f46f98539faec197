"""What the decision logic asks the edges to do. Plain values: the machine returns them in
the order they must happen, and `outbox.Outbox` performs them over NATS."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SaveJob:
    """Write the job's record to KV (compare-and-set against the last revision we wrote)."""

    build_id: int
    value: dict[str, Any]


@dataclass(frozen=True)
class DeleteJob:
    """Forget a final job's record once its submission can no longer be redelivered."""

    build_id: int


@dataclass(frozen=True)
class PublishEvent:
    """A status event on xoogify.events.<org>.<env>.<build_id>, Nats-Msg-Id = event_id."""

    organization: str
    environment: str
    build_id: int
    payload: dict[str, Any]
    # After a restart: publish only if the stream's last event of the job is another one
    # (the duplicate window is only minutes; a repeat would be a second stored message).
    repair: bool = False

    @property
    def status(self) -> str:
        return str(self.payload["status"])


@dataclass(frozen=True)
class Dispatch:
    """Hand the job to runners of arch + kind (work queue), Nats-Msg-Id dispatch-<id>-<n>."""

    arch: str
    kind: str
    build_id: int
    msg_id: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class DropDispatch:
    """Remove a dispatch message nobody claimed (the job ended while it waited)."""

    seq: int


@dataclass(frozen=True)
class SendCancel:
    """Ask the job's runner to stop it (core publish on xoogify.cancel.<build_id>)."""

    build_id: int
    reason: str


Effect = SaveJob | DeleteJob | PublishEvent | Dispatch | DropDispatch | SendCancel
