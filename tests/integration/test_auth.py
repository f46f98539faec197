"""Access (issue 6) on a real gateway: tokens, the login cookie, CSRF, the websocket Origin
check, runner and revoked tokens, and no token ever in the gateway's log."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import asyncpg
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from services.common.config import Settings
from services.gateway import token_store
from services.gateway.auth import COOKIE
from tests.integration.ws_support import serve_gateway
from tests.stack import Stack, settings_env
from tests.support import bearer, eventually, make_token

WEBHOOK = {
    "organization": "acme",
    "url": "http://127.0.0.1:9/hook",
    "statuses": ["SUCCESS"],
    "secret": "s3cret-s3cret",
}


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={token}"}


async def ws_refused(url: str, headers: dict[str, str]) -> int:
    """The HTTP status a refused websocket handshake got."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, additional_headers=headers):
            pass
    return refused.value.response.status_code


async def test_everything_but_health_and_static_needs_a_token(settings: Settings) -> None:
    async with serve_gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        for path in ("/api/jobs", "/api/runners", "/api/webhooks", "/api/openapi.json"):
            answer = await http.get(path)
            assert answer.status_code == 401, path
            assert answer.json()["error"]["code"] == "unauthenticated"
        wrong = await http.get("/api/jobs", headers=bearer("xo_not-a-token"))
        assert wrong.status_code == 401
        assert (await http.post("/api/jobs", json={})).status_code == 401
        for page in ("/", "/runners", "/jobs/1"):
            answer = await http.get(page)
            assert answer.status_code == 401 and "text/html" in answer.headers["content-type"]
            assert "login" in answer.text
        assert await ws_refused(gw.ws_url, {}) == 401
        assert await ws_refused(gw.ws_url, bearer("xo_nope")) == 401
        for path in ("/healthz", "/readyz", "/metrics", "/static/style.css"):
            assert (await http.get(path)).status_code == 200, path
        # And with the token, the same calls answer.
        assert (
            await http.get("/api/jobs", headers=bearer(settings.token or ""))
        ).status_code == 200


async def test_login_url_sets_an_httponly_cookie_and_redirects_to_a_clean_url(
    settings: Settings,
) -> None:
    token = settings.token or ""
    async with serve_gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        login = await http.get("/", params={"status": "SUCCESS", "token": token})
        assert login.status_code == 303
        assert login.headers["location"] == "/?status=SUCCESS"
        set_cookie = login.headers["set-cookie"]
        assert set_cookie.startswith(f"{COOKIE}={token};")
        flags = {part.strip().lower() for part in set_cookie.split(";")[1:]}
        assert {"httponly", "samesite=lax", "path=/"} <= flags
        assert "secure" not in flags  # plain http here; https gets Secure
        assert token not in login.headers["location"]

        page = await http.get("/", headers=cookie(token))
        assert page.status_code == 200
        csrf = re.search(r'name="csrf-token" content="([0-9a-f]{64})"', page.text)
        assert csrf is not None

        deep = await http.get("/runners", params={"token": token})
        assert deep.status_code == 303 and deep.headers["location"] == "/runners"
        bad = await http.get("/", params={"token": "xo_wrong"})
        assert bad.status_code == 401 and "set-cookie" not in bad.headers


async def test_cookie_posts_need_the_csrf_token_bearer_posts_do_not(settings: Settings) -> None:
    token = settings.token or ""
    async with serve_gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        page = await http.get("/", headers=cookie(token))
        match = re.search(r'name="csrf-token" content="([0-9a-f]+)"', page.text)
        assert match is not None
        csrf = match.group(1)

        missing = await http.post("/api/webhooks", json=WEBHOOK, headers=cookie(token))
        assert missing.status_code == 403 and "CSRF" in missing.json()["error"]["message"]
        wrong = await http.post(
            "/api/webhooks", json=WEBHOOK, headers={**cookie(token), "X-CSRF-Token": "0" * 64}
        )
        assert wrong.status_code == 403
        made = await http.post(
            "/api/webhooks", json=WEBHOOK, headers={**cookie(token), "X-CSRF-Token": csrf}
        )
        assert made.status_code == 201
        # Deleting is state-changing too.
        path = f"/api/webhooks/{made.json()['id']}"
        assert (await http.delete(path, headers=cookie(token))).status_code == 403
        # Reads need no CSRF token; Bearer requests never do.
        assert (await http.get("/api/webhooks", headers=cookie(token))).status_code == 200
        assert (await http.delete(path, headers=bearer(token))).status_code == 204
        assert (
            await http.post("/api/webhooks", json=WEBHOOK, headers=bearer(token))
        ).status_code == 201


async def test_cookie_websocket_must_come_from_this_gateways_own_pages(settings: Settings) -> None:
    token = settings.token or ""
    async with serve_gateway(settings) as gw:
        own = gw.url  # http://127.0.0.1:<port>, as a page of this gateway sends it
        async with connect(gw.ws_url, additional_headers={**cookie(token), "Origin": own}) as ws:
            assert '"hello"' in str(await ws.recv())
        evil = {**cookie(token), "Origin": "http://evil.example"}
        assert await ws_refused(gw.ws_url, evil) == 403
        other_port = {**cookie(token), "Origin": "http://127.0.0.1:1"}
        assert await ws_refused(gw.ws_url, other_port) == 403
        # Bearer clients (no cookie) are not browsers: no Origin needed.
        async with connect(gw.ws_url, additional_headers=bearer(token)) as ws:
            assert '"hello"' in str(await ws.recv())


async def test_runner_tokens_cannot_use_the_api_pages_or_ws(settings: Settings) -> None:
    runner = await make_token(settings.database_url, "runner-1", "runner")
    async with serve_gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        for method, path in (("GET", "/api/jobs"), ("GET", "/api/runners"), ("POST", "/api/jobs")):
            answer = await http.request(method, path, headers=bearer(runner), json={})
            assert answer.status_code == 403, path
            assert answer.json()["error"]["code"] == "forbidden"
        assert (await http.get("/", headers=bearer(runner))).status_code == 403
        assert (await http.get("/", params={"token": runner})).status_code == 403
        assert await ws_refused(gw.ws_url, bearer(runner)) == 403


async def test_a_revoked_token_is_refused_within_seconds(settings: Settings) -> None:
    secret = await make_token(settings.database_url, "temp", "org", ["acme"])
    async with serve_gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        assert (await http.get("/api/jobs", headers=bearer(secret))).status_code == 200
        conn = await asyncpg.connect(settings.database_url)
        try:
            record = next(t for t in await token_store.list_all(conn) if t.name == "temp")
            assert record.last_used_at is not None
            assert await token_store.revoke(conn, record.id)
            assert not await token_store.revoke(conn, record.id)  # once
        finally:
            await conn.close()

        async def refused() -> bool:
            return (await http.get("/api/jobs", headers=bearer(secret))).status_code == 401

        await eventually(refused, timeout=10, interval=0.2)
        assert (await http.get("/", params={"token": secret})).status_code == 401


async def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return await _run_cli(settings, {}, "token", *args)


async def _run_cli(
    settings: Settings, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    full = {**settings_env(settings), "PATH": os.environ.get("PATH", "")}
    full.pop("XOOGIFY_TOKEN", None)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli.main", *args],
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_cli_tokens_and_no_token_in_the_gateway_log(stack: Stack) -> None:
    settings = stack.settings
    made = await _cli(settings, "create", "--name", "ci-acme", "--org", "acme", "--org", "beta")
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert secret.startswith("xo_") and len(secret) > 40
    bad = await _cli(settings, "create", "--name", "x", "--org", "Not.An.Org")
    assert bad.returncode == 2 and "organization" in bad.stderr

    await stack.start_gateway()
    async with httpx.AsyncClient(base_url=stack.url) as http:
        assert (await http.get("/", params={"token": secret})).status_code == 303
        assert (await http.get("/", params={"token": "xo_wrong-one"})).status_code == 401
        job = {
            "organization": "acme",
            "environment": "stg",
            "module_type": "amd64/script",
            "module_name": "hello",
            "action": "PLAN",
        }
        submitted = await http.post("/api/jobs", json=job, headers=bearer(secret))
        assert submitted.status_code == 202
        assert submitted.json()["requested_by"] == "ci-acme"
        refused = await http.post(
            "/api/jobs", json={**job, "organization": "globex"}, headers=bearer(secret)
        )
        assert refused.status_code == 403
        assert refused.json()["error"]["fields"] == {"organization": "not allowed for this token"}

        # The client commands send the token: XOOGIFY_TOKEN here; none at all is a 401.
        jobs = await _run_cli(settings, {"XOOGIFY_TOKEN": secret}, "jobs", "--json")
        assert jobs.returncode == 0, jobs.stderr  # (no scheduler here: nothing stored yet)
        nothing = stack.log_dir.parent / "no-token-here"
        anonymous = await _run_cli(settings, {"XOOGIFY_DATA_DIR": str(nothing)}, "jobs")
        assert anonymous.returncode == 2 and "401" in anonymous.stderr

        listed = await _cli(settings, "list")
        assert listed.returncode == 0 and "ci-acme" in listed.stdout
        assert "acme,beta" in listed.stdout and secret not in listed.stdout
        token_id = next(
            line.split("\t")[0] for line in listed.stdout.splitlines() if "\tci-acme\t" in line
        )
        revoked = await _cli(settings, "revoke", token_id)
        assert revoked.returncode == 0, revoked.stderr
        assert (await _cli(settings, "revoke", token_id)).returncode == 1

        async def gone() -> bool:
            return (await http.get("/api/jobs", headers=bearer(secret))).status_code == 401

        await eventually(gone, timeout=10, interval=0.2)

    await stack.stop("gateway")
    log = stack.logs("gateway")
    assert "gateway started" in log  # the log is the real one
    for token in (secret, settings.token or "", "xo_wrong-one"):
        assert token not in log
