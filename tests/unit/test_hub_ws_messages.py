"""Client messages of /ws: what is accepted and what is refused with a reason."""

from __future__ import annotations

import pytest

from services.gateway.event_replay import replay_start
from services.gateway.log_follow import trim
from services.gateway.ws_messages import (
    ClientMessageError,
    FilterMsg,
    FollowLogsMsg,
    UnfollowLogsMsg,
    parse,
    parse_query,
)


def test_filter_with_every_key() -> None:
    msg = parse(
        '{"type":"filter","organization":"acme","environment":"stg","status":"WORKING",'
        '"action":"PLAN","module_type":"amd64/script","module_name":"vpc","q":"Vp","since":7}'
    )
    assert isinstance(msg, FilterMsg)
    assert msg.since == 7
    assert msg.filter.organization == "acme" and msg.filter.q == "Vp"


def test_filter_keys_are_optional_and_empty_means_unset() -> None:
    msg = parse('{"type":"filter","organization":"","since":null}')
    assert isinstance(msg, FilterMsg)
    assert msg.filter.is_empty() and msg.since is None


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"type":"nope"}',
        '{"type":"filter","organization":"acme.>"}',
        '{"type":"filter","environment":"*"}',
        # A `$`-anchored re.match let a trailing newline into a subject token.
        '{"type":"filter","organization":"acme\\n"}',
        '{"type":"filter","module_type":"amd64/script\\n"}',
        '{"type":"filter","status":"DONE"}',
        '{"type":"filter","action":"apply"}',
        '{"type":"filter","since":-1}',
        '{"type":"filter","since":"5"}',
        '{"type":"filter","since":true}',
        '{"type":"filter","colour":"red"}',
        '{"type":"filter","organization":5}',
        '{"type":"follow_logs"}',
        '{"type":"follow_logs","build_id":0}',
        '{"type":"follow_logs","build_id":3,"offset":-2}',
        '{"type":"unfollow_logs","build_id":"x"}',
    ],
)
def test_malformed_messages_are_refused(raw: str) -> None:
    with pytest.raises(ClientMessageError):
        parse(raw)


def test_follow_and_unfollow() -> None:
    assert parse('{"type":"follow_logs","build_id":3}') == FollowLogsMsg(3, 0)
    assert parse('{"type":"follow_logs","build_id":3,"offset":12}') == FollowLogsMsg(3, 12)
    assert parse('{"type":"unfollow_logs","build_id":3}') == UnfollowLogsMsg(3)


def test_oversized_message_is_refused() -> None:
    with pytest.raises(ClientMessageError):
        parse('{"type":"filter","q":"' + "x" * 20000 + '"}')


def test_replay_start_reports_a_gap() -> None:
    assert replay_start(since=10, first_seq=5).start == 11
    assert not replay_start(since=10, first_seq=11).gap
    gap = replay_start(since=3, first_seq=10)
    assert gap.gap and gap.start == 10 and gap.first_available == 10


def test_trim_counts_bytes() -> None:
    assert trim(0, "héllo", 0) == ("héllo", 6)
    assert trim(0, "héllo", 3) == ("llo", 6)
    assert trim(10, "abc", 20) == ("", 13)
    assert trim(10, "abc", 5) == ("abc", 13)


def test_a_filter_in_the_url_query() -> None:
    msg = parse_query({"organization": "acme", "since": "12", "token": "ignored"})
    assert isinstance(msg, FilterMsg)
    assert msg.filter.organization == "acme" and msg.since == 12
    # No filter key at all: the socket starts with the default (every job, live only).
    assert parse_query({"utm": "x"}) is None


@pytest.mark.parametrize(
    "query",
    [{"since": "-1"}, {"since": "1e3"}, {"since": "\u0661"}, {"organization": "a.>"}],
)
def test_a_bad_filter_in_the_url_query_names_its_field(query: dict[str, str]) -> None:
    with pytest.raises(ClientMessageError, match=next(iter(query))):
        parse_query(query)
