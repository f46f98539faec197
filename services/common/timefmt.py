"""Times as the contract writes them: RFC 3339, UTC, milliseconds, a trailing Z."""

from __future__ import annotations

from datetime import UTC, datetime


def now_iso() -> str:
    return format_time(datetime.now(UTC))


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
