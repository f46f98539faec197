"""Job filters, the one place their meaning is defined: used by the gateway's SQL for
`GET /api/jobs`, by the websocket hub for live updates, and by `xoogify watch`.

Each field is an exact match when set; `q` is a case-insensitive substring of the
organization, environment, module type, module name or action, or a build ID.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

FILTER_KEYS = ("organization", "environment", "status", "action", "module_type", "module_name")


@dataclass(frozen=True)
class JobFilter:
    organization: str | None = None
    environment: str | None = None
    status: str | None = None
    action: str | None = None
    module_type: str | None = None
    module_name: str | None = None
    q: str | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> JobFilter:
        """Build from query parameters or a `filter` message; empty strings mean unset."""
        kwargs: dict[str, str | None] = {}
        for f in fields(cls):
            value = values.get(f.name)
            kwargs[f.name] = str(value).strip() if value not in (None, "") else None
        return cls(**kwargs)

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))

    def matches(self, job: Mapping[str, Any]) -> bool:
        for key in FILTER_KEYS:
            wanted = getattr(self, key)
            if wanted is not None and job.get(key) != wanted:
                return False
        if self.q:
            needle = self.q.lower()
            if str(job.get("build_id")) == needle:
                return True
            haystack = " ".join(
                str(job.get(k) or "")
                for k in ("organization", "environment", "module_type", "module_name", "action")
            ).lower()
            return needle in haystack
        return True
