"""Client → server messages of `/ws`, checked before use: a malformed one becomes a
`ClientMessageError` (answered with an `error` frame), never a crash.

Organization and environment become NATS subject tokens (the replay's subject filter), so
they must be names: a `*`, `>` or `.` in them would widen the filter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.common import codec
from services.common.filters import JobFilter, invalid_values
from services.common.status import ACTIONS, Status

MAX_MESSAGE = 16 * 1024
MAX_Q = 200
MAX_INT = 2**63 - 1

_FILTER_KEYS = {
    "organization",
    "environment",
    "status",
    "action",
    "module_type",
    "module_name",
    "q",
    "since",
}


class ClientMessageError(ValueError):
    """A client message that cannot be used; the text says why."""


@dataclass(frozen=True)
class FilterMsg:
    filter: JobFilter
    since: int | None


@dataclass(frozen=True)
class FollowLogsMsg:
    build_id: int
    offset: int


@dataclass(frozen=True)
class UnfollowLogsMsg:
    build_id: int


ClientMessage = FilterMsg | FollowLogsMsg | UnfollowLogsMsg


def _int(value: Any, name: str, minimum: int) -> int:
    # bool is an int in Python; JSON true is not a sequence number. Past int64 nothing
    # can match (Postgres bigint), and asking Postgres would fail rather than say so.
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise ClientMessageError(f"{name} must be an integer {minimum}..{MAX_INT}")
    return value


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ClientMessageError(f"{key} must be a string")
    return value


def _parse_filter(body: dict[str, Any]) -> FilterMsg:
    unknown = sorted(set(body) - _FILTER_KEYS - {"type"})
    if unknown:
        raise ClientMessageError(f"unknown filter keys: {', '.join(unknown)}")
    values = {key: _optional_str(body, key) for key in _FILTER_KEYS - {"since"}}
    bad = invalid_values(values)
    if bad:
        raise ClientMessageError("; ".join(f"{key}: {why}" for key, why in bad.items()))
    status = values["status"]
    if status is not None and status not in {s.value for s in Status}:
        raise ClientMessageError(f"status must be one of {', '.join(s.value for s in Status)}")
    action = values["action"]
    if action is not None and action not in ACTIONS:
        raise ClientMessageError(f"action must be one of {', '.join(ACTIONS)}")
    q = values["q"]
    if q is not None and len(q) > MAX_Q:
        raise ClientMessageError(f"q is longer than {MAX_Q} characters")
    since = body.get("since")
    return FilterMsg(
        JobFilter.from_mapping(values), None if since is None else _int(since, "since", 0)
    )


def parse_query(params: Mapping[str, str]) -> FilterMsg | None:
    """A `filter` given as the `/ws` URL's query (`/ws?organization=acme&since=0`), so that
    it applies before the first update is pushed; None when the URL names no filter key.

    Without it, a client's `filter` message arrives after the socket was already pushed
    some updates under the default (every job): a replay of older events would then
    arrive after newer ones, and a client counting on increasing `stream_seq` loses them.
    """
    body: dict[str, Any] = {k: v for k, v in params.items() if k in _FILTER_KEYS}
    if not body:
        return None
    since = body.get("since")
    if since is not None:
        if not since.isascii() or not since.isdigit():
            raise ClientMessageError(f"since must be an integer 0..{MAX_INT}")
        body["since"] = int(since)
    return _parse_filter(body)


def parse(raw: str | bytes) -> ClientMessage:
    if len(raw) > MAX_MESSAGE:
        raise ClientMessageError("message too large")
    try:
        body = codec.loads(raw)
    except ValueError:
        raise ClientMessageError("not valid JSON") from None
    if not isinstance(body, dict):
        raise ClientMessageError("a message is a JSON object")
    kind = body.get("type")
    if kind == "filter":
        return _parse_filter(body)
    if kind == "follow_logs":
        offset = body.get("offset", 0)
        return FollowLogsMsg(
            _int(body.get("build_id"), "build_id", 1),
            _int(0 if offset is None else offset, "offset", 0),
        )
    if kind == "unfollow_logs":
        return UnfollowLogsMsg(_int(body.get("build_id"), "build_id", 1))
    raise ClientMessageError("type must be filter, follow_logs or unfollow_logs")
