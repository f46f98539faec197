"""Property test of the `/ws` client messages (services/gateway/ws_messages.py): whatever a
client sends, parsing gives a message or a ClientMessageError, never another exception; a
filter that parses only holds values some job could have."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.filters import invalid_values
from services.gateway.ws_messages import ClientMessageError, FilterMsg, parse

KEYS = [
    "type", "organization", "environment", "status", "action", "module_type", "module_name",
    "q", "since", "build_id", "offset",
]  # fmt: skip
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.sampled_from(["filter", "follow_logs", "unfollow_logs", "acme", "amd64/script", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner),
    max_leaves=6,
)
messages = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), values, max_size=6)


def parse_or_refuse(raw: str | bytes) -> Any:
    try:
        return parse(raw)
    except ClientMessageError:
        return None


@settings(max_examples=500)
@given(body=messages, kind=st.sampled_from(["filter", "follow_logs", "unfollow_logs"]))
def test_any_object_is_a_message_or_refused(body: dict[str, Any], kind: str) -> None:
    body.setdefault("type", kind)
    msg = parse_or_refuse(json.dumps(body))  # any JSON a client may send, big ints too
    if isinstance(msg, FilterMsg):
        flt = msg.filter
        assert invalid_values(flt.__dict__) == {}
        assert msg.since is None or 0 <= msg.since < 2**63
    elif msg is not None:
        assert 1 <= msg.build_id < 2**63
        assert getattr(msg, "offset", 0) in range(2**63)


@given(raw=st.one_of(st.text(max_size=40), st.binary(max_size=40)))
def test_any_text_is_a_message_or_refused(raw: str | bytes) -> None:
    parse_or_refuse(raw)


@given(
    kind=st.sampled_from(["follow_logs", "unfollow_logs"]),
    build_id=st.integers() | st.sampled_from([2**63 - 1, 2**63, 2**64]),
    offset=st.integers() | st.sampled_from([2**63 - 1, 2**63]),
)
def test_log_messages_hold_only_ids_postgres_can_look_up(
    kind: str, build_id: int, offset: int
) -> None:
    raw = json.dumps({"type": kind, "build_id": build_id, "offset": offset})
    msg = parse_or_refuse(raw)
    fits = 1 <= build_id < 2**63 and (kind == "unfollow_logs" or 0 <= offset < 2**63)
    assert (msg is not None) == fits
