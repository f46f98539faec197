"""The pure parts of access control: principals and their scope, CSRF tokens, the login
redirect, header and cookie parsing, the websocket Origin check and message rate limit,
token rules, and which live events an organization's socket is offered."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from services.common import codec
from services.common.filters import JobFilter
from services.gateway import token_store
from services.gateway.auth import (
    COOKIE,
    Principal,
    TokenCache,
    bearer,
    cookie_header,
    csrf_ok,
    csrf_token,
    origin_matches,
    session_cookie,
    uses_state_credentials,
    without_login_param,
)
from services.gateway.errors import ApiError
from services.gateway.live_client import Item, LiveClient, Visibility, make_item
from services.gateway.ws import RateLimit
from tests.integration.ws_support import job_event


def test_an_admin_sees_every_organization() -> None:
    admin = Principal("root", "admin")
    assert admin.scope is None
    assert admin.may_see("acme") and admin.may_see("globex")
    admin.require_org("anything")


def test_an_org_token_sees_only_its_own() -> None:
    alice = Principal("alice", "org", frozenset({"globex", "acme"}))
    assert alice.scope == ["acme", "globex"]
    assert alice.may_see("acme") and not alice.may_see("initech") and not alice.may_see(None)
    with pytest.raises(ApiError) as refused:
        alice.require_org("initech")
    assert refused.value.status == 403
    assert refused.value.fields == {"organization": "not allowed for this token"}


def test_a_principal_with_no_organizations_sees_nothing() -> None:
    # An empty scope is "none", never "all" (the SQL reads [] as no organization).
    nobody = Principal("runner-1", "runner")
    assert nobody.scope == [] and not nobody.may_see("acme")


def test_csrf_token_is_bound_to_the_session() -> None:
    one, two = token_store.new_secret(), token_store.new_secret()
    assert csrf_token(one) == csrf_token(one) != csrf_token(two)
    assert len(csrf_token(one)) == 64
    assert csrf_ok(one, csrf_token(one))
    assert not csrf_ok(one, csrf_token(two))
    assert not csrf_ok(one, None) and not csrf_ok(one, "")
    assert one not in csrf_token(one)


def test_login_redirect_drops_only_the_token() -> None:
    assert without_login_param("/", b"token=xo_abc") == "/"
    assert (
        without_login_param("/", b"status=SUCCESS&token=xo_abc&q=a+b") == "/?status=SUCCESS&q=a+b"
    )
    assert without_login_param("/jobs/7", b"") == "/jobs/7"


def test_cookie_flags() -> None:
    plain = cookie_header("xo_s", secure=False)
    assert plain == f"{COOKIE}=xo_s; Path=/; HttpOnly; SameSite=Lax"
    assert cookie_header("xo_s", secure=True).endswith("; Secure")


def test_bearer_and_cookie_parsing() -> None:
    assert bearer({"authorization": "Bearer xo_a"}) == "xo_a"
    assert bearer({"authorization": "bearer  xo_a "}) == "xo_a"
    assert bearer({"authorization": "Basic dXNlcjpwdw=="}) is None
    assert bearer({"authorization": "Bearer "}) is None
    assert bearer({}) is None
    assert session_cookie({"cookie": f"a=1; {COOKIE}=xo_z; b=2"}) == "xo_z"
    assert session_cookie({"cookie": "a=1"}) is None
    assert session_cookie({"cookie": '\x00"broken'}) is None
    assert session_cookie({}) is None


def test_origin_must_be_this_gateway() -> None:
    assert origin_matches("http://127.0.0.1:8000", "127.0.0.1:8000", secure=False)
    assert origin_matches("HTTP://Example.com/", "example.com", secure=False)
    assert origin_matches("https://x.example", "x.example", secure=True)
    assert not origin_matches("http://x.example", "x.example", secure=True)
    assert not origin_matches("http://evil.example", "127.0.0.1:8000", secure=False)
    assert not origin_matches("http://127.0.0.1:9", "127.0.0.1:8000", secure=False)
    assert not origin_matches(None, "127.0.0.1:8000", secure=False)
    assert not origin_matches("null", "127.0.0.1:8000", secure=False)


def test_state_backend_paths_use_their_own_credentials_except_versions() -> None:
    assert uses_state_credentials("/api/state/acme/stg/vpc")
    assert not uses_state_credentials("/api/state/acme/stg/vpc/versions")
    # A module named "versions" is a workspace like any other.
    assert uses_state_credentials("/api/state/acme/stg/versions")
    assert not uses_state_credentials("/api/jobs")


def test_rate_limit_allows_bursts_up_to_the_rate_then_refills() -> None:
    now = [0.0]
    limit = RateLimit(50, clock=lambda: now[0])
    assert all(limit.allow() for _ in range(50))
    assert not limit.allow()
    now[0] += 0.1  # five more after a tenth of a second
    assert sum(limit.allow() for _ in range(10)) == 5
    now[0] += 100  # never more than a burst, however long the pause
    assert sum(limit.allow() for _ in range(100)) == 50


def test_token_rules() -> None:
    token_store.check_new("alice", "org", ["acme"])
    token_store.check_new("ci@build.1", "admin", [])
    for name, kind, orgs in (
        ("", "admin", []),
        ("has space", "admin", []),
        ("x", "root", []),
        ("x", "org", []),
        ("x", "org", ["Acme"]),
        ("x", "org", ["a.b"]),
        ("x", "admin", ["acme"]),
        ("x", "runner", ["acme"]),
    ):
        with pytest.raises(ValueError):
            token_store.check_new(name, kind, orgs)


def test_secrets_are_256_bit_and_hashed() -> None:
    secret = token_store.new_secret()
    assert secret.startswith("xo_") and len(secret) == 3 + 43
    assert token_store.token_hash(secret) == token_store.token_hash(secret)
    assert len(token_store.token_hash(secret)) == 32
    assert token_store.new_secret() != secret


def _item(seq: int, org: str) -> Item:
    return make_item(seq, codec.dumps(job_event(seq, 1, org=org)))


def test_a_socket_is_offered_only_its_organizations_events() -> None:
    client = LiveClient(orgs=frozenset({"acme"}))
    for seq, org in enumerate(["acme", "globex", "acme"], start=1):
        client.offer(_item(seq, org))
    assert [i.job["organization"] for i in client.take()] == ["acme", "acme"]
    # A new filter keeps the restriction, even one naming the other organization.
    client.set_filter(JobFilter(organization="globex"))
    client.offer(_item(4, "globex"))
    assert client.take() == []
    client.set_filter(JobFilter())
    client.offer(_item(5, "globex"))
    client.offer(_item(6, "acme"))
    assert [i.stream_seq for i in client.take()] == [6]


def test_an_admin_socket_sees_everything() -> None:
    client = LiveClient()
    client.offer(_item(1, "globex"))
    assert len(client.take()) == 1
    assert Visibility(JobFilter(), None).wants(_item(2, "x"))


async def test_token_cache_shares_lookups_and_forgets_revoked_tokens(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = token_store.TokenRecord(1, "alice", "org", ("acme",), datetime.now(UTC), None, None)
    answers: list[token_store.TokenRecord | None] = [record]
    calls: list[str] = []

    async def find_active(pool: object, secret: str) -> token_store.TokenRecord | None:
        calls.append(secret)
        await asyncio.sleep(0)  # concurrent lookups overlap here
        return answers[-1]

    monkeypatch.setattr(token_store, "find_active", find_active)
    cache = TokenCache(ttl=60)
    found = await asyncio.gather(*(cache.lookup(None, "xo_a") for _ in range(5)))  # type: ignore[arg-type]
    assert found == [record] * 5 and calls == ["xo_a"]
    assert await cache.lookup(None, "xo_a") is record  # type: ignore[arg-type]
    assert calls == ["xo_a"]  # cached

    expiring = TokenCache(ttl=0)  # every lookup asks again: a revocation shows at once
    assert await expiring.lookup(None, "xo_a") is record  # type: ignore[arg-type]
    answers.append(None)
    assert await expiring.lookup(None, "xo_a") is None  # type: ignore[arg-type]
    assert await expiring.lookup(None, "xo_a") is None  # type: ignore[arg-type]
    assert len(calls) == 4


async def test_token_cache_keeps_the_last_answer_while_postgres_is_away(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    record = token_store.TokenRecord(1, "alice", "org", ("acme",), datetime.now(UTC), None, None)
    postgres_up = [True]

    async def find_active(pool: object, secret: str) -> token_store.TokenRecord | None:
        if not postgres_up[0]:
            raise ConnectionRefusedError("postgres is away")
        return record

    monkeypatch.setattr(token_store, "find_active", find_active)
    cache = TokenCache(ttl=0)
    assert await cache.lookup(None, "xo_a") is record  # type: ignore[arg-type]
    postgres_up[0] = False
    # Known before the outage: still let in (nobody can revoke while Postgres is away).
    assert await cache.lookup(None, "xo_a") is record  # type: ignore[arg-type]
    # Never seen: the outage is reported, not turned into "unknown token".
    with pytest.raises(ConnectionRefusedError):
        await cache.lookup(None, "xo_b")  # type: ignore[arg-type]
