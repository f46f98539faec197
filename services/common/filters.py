"""Job filters, the one place their meaning is defined: used by the gateway's SQL for
`GET /api/jobs`, by the websocket hub for live updates, and by `xoogify watch`.

Each field is an exact match when set; `q` is a case-insensitive substring of the
organization, environment, module type, module name or action, or a build ID.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

FILTER_KEYS = ("organization", "environment", "status", "action", "module_type", "module_name")
# schemas/defs.json `name` and `module_type`: what a job's fields can hold. Use fullmatch:
# with match, `$` would also accept a trailing newline.
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
MODULE_TYPE = re.compile(r"[a-z0-9]{1,32}/[a-z0-9][a-z0-9_-]{0,31}")
_NAME_KEYS = ("organization", "environment", "module_name")


def invalid_values(values: Mapping[str, Any]) -> dict[str, str]:
    """The filter values (or workspace names) no job could match, each with why: names and
    module_type off their pattern, a `q` with a NUL (Postgres text cannot hold one, so it
    would fail the query). Unset or empty values are fine: they mean "any"."""
    problems = {
        key: "not a valid name"
        for key in _NAME_KEYS
        if values.get(key) not in (None, "") and not NAME.fullmatch(str(values[key]))
    }
    module_type = values.get("module_type")
    if module_type not in (None, "") and not MODULE_TYPE.fullmatch(str(module_type)):
        problems["module_type"] = "must be <arch>/<kind>"
    if "\x00" in str(values.get("q") or ""):
        problems["q"] = "must not contain NUL"
    return problems


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
