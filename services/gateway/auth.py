"""Who is calling: every `/api/` call, `/ws` and page needs an API token (issue 6, Access).

Clients send `Authorization: Bearer <token>`. Browsers log in once with `/?token=…`: the
gateway sets an HttpOnly cookie holding the token and redirects to the same URL without
it. With cookie auth a state-changing request must carry the page's CSRF token (header
`X-CSRF-Token`), and `/ws` must come from a page of this gateway (`Origin` = `Host`).

The result is a `Principal` on the connection's state; the routes pass it to the query
layer, which scopes every read and write to the organizations it may see. `/healthz`,
`/readyz`, `/metrics` and `/static/` stay open; the Terraform state backend checks its own
per-job Basic credentials (services.gateway.state_backend).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode

import asyncpg
from starlette.requests import HTTPConnection
from starlette.responses import HTMLResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from services.gateway import token_store
from services.gateway.errors import UNAVAILABLE, ApiError, error_response

COOKIE = "xoogify_session"
CSRF_HEADER = "x-csrf-token"
LOGIN_PARAM = "token"
# Verified tokens are remembered this long, so a busy client costs no query per request;
# a revocation takes effect within it.
CACHE_TTL_S = 2.0
CACHE_MAX = 10_000
OPEN_PREFIXES = ("/healthz", "/readyz", "/metrics", "/static/")
STATE_BACKEND = "/api/state/"
_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
_CSRF_LABEL = b"xoogify-csrf-v1"


@dataclass(frozen=True)
class Principal:
    """A verified token: its name (the `requested_by` of what it submits), its kind and
    the organizations it may act for (every one for an admin)."""

    name: str
    kind: str
    organizations: frozenset[str] = frozenset()
    via_cookie: bool = False

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"

    @property
    def scope(self) -> list[str] | None:
        """The organizations the query layer limits reads to; None means every one."""
        return None if self.is_admin else sorted(self.organizations)

    def may_see(self, organization: str | None) -> bool:
        return self.is_admin or (organization is not None and organization in self.organizations)

    def require_org(self, organization: str) -> None:
        """For a write naming an organization (submit, webhook): 403 unless allowed."""
        if not self.may_see(organization):
            raise ApiError(
                403,
                f"this token may not act for organization {organization!r}",
                fields={"organization": "not allowed for this token"},
            )


def csrf_token(secret: str) -> str:
    """The CSRF token of a session: an HMAC keyed by the session's own token, so it needs no
    server-side state and cannot be computed by a page that does not hold the cookie."""
    return hmac.new(secret.encode(), _CSRF_LABEL, hashlib.sha256).hexdigest()


def csrf_ok(secret: str, presented: str | None) -> bool:
    return presented is not None and hmac.compare_digest(csrf_token(secret), presented)


def origin_matches(origin: str | None, host: str | None, secure: bool) -> bool:
    """True when a websocket's Origin is this gateway itself (scheme and host:port)."""
    if not origin or not host:
        return False
    scheme = "https" if secure else "http"
    return origin.rstrip("/").lower() == f"{scheme}://{host}".lower()


# The request headers Authenticate reads, by their raw (ASGI: lower-case) names.
_WANTED = {
    name.encode(): name for name in ("authorization", "cookie", "origin", "host", CSRF_HEADER)
}


def wanted_headers(scope: Scope) -> dict[str, str]:
    """The headers Authenticate reads, from one pass over the request's (the first of each,
    as starlette's `Headers.get` gives), instead of a search of them all per header."""
    found: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = _WANTED.get(raw_name)
        if name is not None and name not in found:
            found[name] = raw_value.decode("latin-1")
    return found


def bearer(headers: Any) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def session_cookie(headers: Any) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except Exception:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def cookie_header(secret: str, secure: bool) -> str:
    # Lax rather than Strict: a login link followed from another site (a chat, a mail) must
    # still log in; Lax cookies ride only on top-level GETs, which change nothing, and
    # every state-changing request also needs the CSRF token.
    parts = [f"{COOKIE}={secret}", "Path=/", "HttpOnly", "SameSite=Lax"]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def without_login_param(path: str, query_string: bytes) -> str:
    """The URL to redirect to after a login: the same path and query, minus the token."""
    pairs = [
        (k, v)
        for k, v in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
        if k != LOGIN_PARAM
    ]
    return path + ("?" + urlencode(pairs) if pairs else "")


class TokenCache:
    """Verified tokens for a couple of seconds, keyed by hash (no secret kept in memory).
    Concurrent misses for one token share a single query, so a burst of requests after
    expiry costs one round trip, not one each."""

    def __init__(self, ttl: float = CACHE_TTL_S) -> None:
        self.ttl = ttl
        self._entries: dict[bytes, tuple[float, token_store.TokenRecord]] = {}
        self._pending: dict[bytes, asyncio.Task[token_store.TokenRecord | None]] = {}

    async def lookup(self, pool: asyncpg.Pool, secret: str) -> token_store.TokenRecord | None:
        key = token_store.token_hash(secret)
        hit = self._entries.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        task = self._pending.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(pool, secret, key))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        # Shielded: one caller going away must not cancel the others' lookup.
        return await asyncio.shield(task)

    async def _fetch(
        self, pool: asyncpg.Pool, secret: str, key: bytes
    ) -> token_store.TokenRecord | None:
        try:
            record = await token_store.find_active(pool, secret)
        except UNAVAILABLE:
            stale = self._entries.get(key)
            if stale is None:
                raise
            # Postgres is away: nobody can revoke a token meanwhile (revoking writes to it),
            # so the last verified answer stands, and submissions, which go through NATS,
            # are still taken.
            return stale[1]
        if record is None:
            self._entries.pop(key, None)
            return None
        now = time.monotonic()
        if len(self._entries) >= CACHE_MAX:
            self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
            if len(self._entries) >= CACHE_MAX:
                self._entries.clear()
        self._entries[key] = (now + self.ttl, record)
        return record


def uses_state_credentials(path: str) -> bool:
    """Terraform's own calls, which carry the per-job Basic credentials instead of a token.
    Listing a workspace's versions is a person's call: it takes a token like the API."""
    if not path.startswith(STATE_BACKEND):
        return False
    # {organization}/{environment}/{module_name}/versions: a module may itself be called
    # "versions", whose state (three segments) is Terraform's like any other.
    segments = path[len(STATE_BACKEND) :].split("/")
    return not (len(segments) == 4 and segments[3] == "versions")


def principal_of(conn: HTTPConnection) -> Principal:
    """The principal the middleware verified for this request or websocket."""
    principal: Principal = conn.scope["state"]["principal"]
    return principal


def _is_page(path: str) -> bool:
    return not path.startswith("/api/") and path != "/ws"


def _denied_page(status: int, message: str) -> Response:
    body = (
        "<!doctype html><meta charset=utf-8><title>Xoogify · sign in</title>"
        f"<main style='font-family:sans-serif;margin:3rem'><h1>{status}</h1><p>{message}</p>"
        "<p>Open the login URL that <code>xoogify up</code> printed (<code>/?token=…</code>),"
        " or make a token with <code>xoogify token create</code>.</p></main>"
    )
    return HTMLResponse(body, status_code=status)


class Authenticate:
    """ASGI middleware: verify the caller, or answer 401/403 before any route runs."""

    def __init__(self, app: ASGIApp, cache: TokenCache | None = None) -> None:
        self.app = app
        self.cache = cache or TokenCache()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] not in ("http", "websocket")
            or path.startswith(OPEN_PREFIXES)
            or uses_state_credentials(path)
        ):
            await self.app(scope, receive, send)
            return
        pool = scope["app"].state.ctx.pool
        secure = scope.get("scheme") in ("https", "wss")

        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and _is_page(path):
            conn = HTTPConnection(scope)
            if LOGIN_PARAM in conn.query_params:
                await self._login(conn, pool, secure, scope, receive, send)
                return

        headers = wanted_headers(scope)
        secret = bearer(headers)
        via_cookie = False
        if secret is None:
            secret = session_cookie(headers)
            via_cookie = secret is not None
        try:
            record = await self.cache.lookup(pool, secret) if secret else None
        except UNAVAILABLE:
            await self._deny(scope, receive, send, 503, "cannot check the token now; retry")
            return
        if record is None:
            what = "a token is required" if secret is None else "unknown or revoked token"
            await self._deny(scope, receive, send, 401, what)
            return
        if record.kind == "runner":
            await self._deny(scope, receive, send, 403, "a runner token cannot use the API")
            return
        if via_cookie and scope["type"] == "websocket":
            if not origin_matches(headers.get("origin"), headers.get("host"), secure):
                await self._deny(scope, receive, send, 403, "cross-origin websocket refused")
                return
        if via_cookie and scope["type"] == "http" and scope["method"] not in _SAFE_METHODS:
            assert secret is not None
            if not csrf_ok(secret, headers.get(CSRF_HEADER)):
                await self._deny(scope, receive, send, 403, "missing or wrong CSRF token")
                return
        principal = Principal(record.name, record.kind, frozenset(record.organizations), via_cookie)
        scope.setdefault("state", {})["principal"] = principal
        if via_cookie:
            assert secret is not None
            scope["state"]["csrf"] = csrf_token(secret)
        await self.app(scope, receive, send)

    async def _login(
        self,
        conn: HTTPConnection,
        pool: asyncpg.Pool,
        secure: bool,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        secret = conn.query_params[LOGIN_PARAM]
        try:
            record = await self.cache.lookup(pool, secret) if secret else None
        except UNAVAILABLE:
            await self._deny(scope, receive, send, 503, "cannot check the token now; retry")
            return
        if record is None:
            await self._deny(scope, receive, send, 401, "this login link is not valid (any more)")
            return
        if record.kind == "runner":
            await self._deny(scope, receive, send, 403, "a runner token cannot open the pages")
            return
        target = without_login_param(scope["path"], scope.get("query_string", b""))
        response = Response(
            status_code=303,
            headers={
                "location": target,
                "set-cookie": cookie_header(secret, secure),
                "cache-control": "no-store",
                "referrer-policy": "no-referrer",
            },
        )
        await response(scope, receive, send)

    async def _deny(
        self, scope: Scope, receive: Receive, send: Send, status: int, message: str
    ) -> None:
        path = scope["path"]
        if scope["type"] == "websocket":
            if "websocket.http.response" in scope.get("extensions", {}):
                response: Response = error_response(status, message)
                await send(
                    {
                        "type": "websocket.http.response.start",
                        "status": status,
                        "headers": response.raw_headers,
                    }
                )
                await send({"type": "websocket.http.response.body", "body": response.body})
            else:
                # Closing before accept makes the server answer the handshake with 403.
                await send({"type": "websocket.close", "code": 1008, "reason": message})
            return
        if _is_page(path):
            response = _denied_page(status, message)
        else:
            response = error_response(status, message)
        if status == 401:
            response.headers["www-authenticate"] = 'Bearer realm="xoogify"'
        await response(scope, receive, send)
