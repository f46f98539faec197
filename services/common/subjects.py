"""Every NATS subject, stream, consumer and KV bucket name, built from one prefix.

The public ones are in CONTRACT.md; the internal ones in DESIGN.md. Nothing else in the
code spells a subject by hand.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Subjects:
    prefix: str = "xoogify"

    # --- streams -----------------------------------------------------------------------
    @property
    def _stream_prefix(self) -> str:
        return self.prefix.upper().replace("-", "_")

    @property
    def submit_stream(self) -> str:
        return f"{self._stream_prefix}_SUBMIT"

    @property
    def events_stream(self) -> str:
        return f"{self._stream_prefix}_EVENTS"

    @property
    def logs_stream(self) -> str:
        return f"{self._stream_prefix}_LOGS"

    @property
    def dispatch_stream(self) -> str:
        return f"{self._stream_prefix}_DISPATCH"

    @property
    def reports_stream(self) -> str:
        return f"{self._stream_prefix}_REPORTS"

    @property
    def numbered_by_postgres(self) -> tuple[str, str, str]:
        """The streams whose sequences Postgres records (build IDs, watermarks): only the
        gateway makes them (services/common/bus.py says why)."""
        return (self.submit_stream, self.events_stream, self.logs_stream)

    # --- KV buckets --------------------------------------------------------------------
    @property
    def runners_bucket(self) -> str:
        return f"{self.prefix}-runners"

    @property
    def sched_bucket(self) -> str:
        return f"{self.prefix}-sched"

    @property
    def leader_bucket(self) -> str:
        return f"{self.prefix}-leader"

    # --- subjects ----------------------------------------------------------------------
    @property
    def submit(self) -> str:
        return f"{self.prefix}.submit"

    def event(self, organization: str, environment: str, build_id: int) -> str:
        return f"{self.prefix}.events.{organization}.{environment}.{build_id}"

    def events_filter(self, organization: str | None = None, environment: str | None = None) -> str:
        """The narrowest subject filter for an organization and/or environment."""
        org = organization or "*"
        if environment:
            return f"{self.prefix}.events.{org}.{environment}.*"
        if organization:
            return f"{self.prefix}.events.{organization}.>"
        return f"{self.prefix}.events.>"

    def log(self, build_id: int) -> str:
        return f"{self.prefix}.logs.{build_id}"

    @property
    def logs_all(self) -> str:
        return f"{self.prefix}.logs.>"

    def dispatch(self, arch: str, kind: str) -> str:
        return f"{self.prefix}.dispatch.{arch}.{kind}"

    @property
    def dispatch_all(self) -> str:
        return f"{self.prefix}.dispatch.>"

    def dispatch_consumer(self, arch: str, kind: str) -> str:
        """One durable pull consumer per <arch>.<kind> (see DESIGN.md, Dispatch)."""
        return f"dispatch-{arch}-{kind}"

    @property
    def claim(self) -> str:
        return f"{self.prefix}.claim"

    def report(self, runner_id: str) -> str:
        return f"{self.prefix}.report.{runner_id}"

    @property
    def reports_all(self) -> str:
        return f"{self.prefix}.report.>"

    def cancel(self, build_id: int) -> str:
        return f"{self.prefix}.cancel.{build_id}"

    @property
    def cancel_all(self) -> str:
        return f"{self.prefix}.cancel.*"

    @property
    def control_cancel(self) -> str:
        """Gateway → scheduler: a user asked to cancel a job (request/reply)."""
        return f"{self.prefix}.control.cancel"


def family(subjects: Subjects, subject: str) -> str:
    """The wildcard a concrete subject belongs to (`xoogify.report.runner-7` →
    `xoogify.report.>`): a metric label per subject family, never one per runner or build."""
    prefix = subjects.prefix + "."
    if not subject.startswith(prefix):
        return subject
    first = subject[len(prefix) :].split(".", 1)[0]
    if first == "cancel":
        return f"{prefix}cancel.*"
    if first in ("events", "logs", "report"):
        return f"{prefix}{first}.>"
    return subject


def event_msg_id(build_id: int, seq: int) -> str:
    """Nats-Msg-Id of a status event: a republished event is dropped by the stream."""
    return f"{build_id}-{seq}"
