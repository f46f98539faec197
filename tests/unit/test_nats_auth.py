"""The generated NATS users and permissions, without a server."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from services.common import nats_auth
from services.common.subjects import Subjects

S = Subjects()


def _matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def may_publish(user: str, subject: str) -> bool:
    return any(_matches(p, subject) for p in nats_auth.role_permissions(S, user).publish)


def may_subscribe(user: str, subject: str) -> bool:
    return any(_matches(p, subject) for p in nats_auth.role_permissions(S, user).subscribe)


def test_runner_cannot_publish_events_or_read_events_and_submissions() -> None:
    assert may_publish("runner", "xoogify.logs.7")
    assert may_publish("runner", "xoogify.report.r1")
    assert may_publish("runner", "xoogify.claim")
    assert not may_publish("runner", "xoogify.events.acme.stg.1")
    assert not may_publish("runner", "xoogify.submit")
    assert not may_publish("runner", "$JS.API.CONSUMER.CREATE.XOOGIFY_EVENTS")
    assert not may_publish("runner", "$JS.API.STREAM.MSG.GET.XOOGIFY_SUBMIT")
    assert not may_publish("runner", "$JS.API.STREAM.UPDATE.XOOGIFY_EVENTS")
    assert not may_subscribe("runner", "xoogify.events.acme.stg.1")
    assert may_subscribe("runner", "xoogify.cancel.12")


def test_only_the_scheduler_publishes_events_dispatch_and_cancel() -> None:
    for subject in (
        "xoogify.events.acme.stg.1",
        "xoogify.dispatch.amd64.script",
        "xoogify.cancel.1",
    ):
        assert may_publish("scheduler", subject)
        assert not may_publish("gateway", subject)
    assert nats_auth.role_permissions(S, "scheduler").allow_responses
    assert may_subscribe("scheduler", "xoogify.claim")


def test_subscriber_only_creates_its_own_filtered_named_consumers() -> None:
    name = nats_auth.consumer_names("acme")[0]
    own = f"$JS.API.CONSUMER.CREATE.XOOGIFY_EVENTS.{name}.xoogify.events.acme.>"
    assert may_publish("sub-acme", own)
    assert may_publish("sub-acme", own.replace("acme.>", "acme.stg.*"))
    assert not may_publish("sub-acme", own.replace("events.acme", "events.globex"))
    assert not may_publish("sub-acme", "$JS.API.CONSUMER.CREATE.XOOGIFY_EVENTS")
    gateway_consumer = "ingest-events-gw1"
    assert not may_publish("sub-acme", own.replace(name, gateway_consumer))
    assert not may_publish("sub-acme", own.replace(name, nats_auth.consumer_names("globex")[0]))
    assert may_subscribe("sub-acme", "xoogify.events.acme.stg.1")
    assert not may_subscribe("sub-acme", "xoogify.events.globex.stg.1")
    assert not may_subscribe("sub-acme", "_INBOX.x")
    assert not may_publish("sub-acme", "xoogify.events.acme.stg.1")


def test_inboxes_are_per_user() -> None:
    assert may_subscribe("gateway", "_INBOX_gateway.abc")
    assert not may_subscribe("gateway", "_INBOX_scheduler.abc")
    url = "nats://runner:pw@127.0.0.1:4222"
    assert nats_auth.inbox_prefix_for_url(url) == "_INBOX_runner"
    assert nats_auth.inbox_prefix_for_url("nats://127.0.0.1:4222") is None


def test_config_puts_subscribers_in_their_own_account() -> None:
    passwords = {u: f"pw-{u}" for u in nats_auth.users_for(["acme"])}
    text = nats_auth.server_config(S, passwords, store_dir=Path("/data/js"))
    body = text.split("accounts: ", 1)[1]
    accounts = json.loads(body)
    services, subscribers = accounts["XOOGIFY"], accounts["XOOGIFY_SUBSCRIBERS"]
    assert {u["user"] for u in services["users"]} == {"gateway", "scheduler", "runner"}
    assert {u["user"] for u in subscribers["users"]} == {"sub-acme", "subscribers-admin"}
    assert subscribers["imports"] == [
        {"stream": {"account": "XOOGIFY", "subject": "xoogify.events.>"}}
    ]
    assert services["exports"][0]["accounts"] == ["XOOGIFY_SUBSCRIBERS"]
    assert 'jetstream: {"store_dir": "/data/js"}' in text


def test_prefix_changes_every_name() -> None:
    perms = nats_auth.role_permissions(Subjects("acmeco"), "runner")
    assert all("xoogify" not in p.lower() for p in perms.publish + perms.subscribe)
    assert "acmeco.logs.>" in perms.publish


def test_bad_organization_names_are_refused() -> None:
    for bad in ("Acme", "a.b", "a b", "-a", 'a"}'):
        with pytest.raises(ValueError):
            nats_auth.users_for([bad])
    with pytest.raises(ValueError):
        nats_auth.role_permissions(S, "admin")


def test_passwords_are_kept_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "nats-users.json"
    first = nats_auth.load_or_create_passwords(path, nats_auth.users_for([]))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = nats_auth.load_or_create_passwords(path, nats_auth.users_for(["acme"]))
    assert {u: again[u] for u in first} == first
    assert len(again["sub-acme"]) >= 32 and again["sub-acme"] not in first.values()


def test_user_url_carries_quoted_credentials() -> None:
    url = nats_auth.user_url("nats://127.0.0.1:4222", "sub-acme", "p@ss/word")
    assert url == "nats://sub-acme:p%40ss%2Fword@127.0.0.1:4222"
