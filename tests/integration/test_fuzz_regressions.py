"""Bugs the HTTP API fuzz run (test_api_fuzz.py) found, each pinned by the request that
showed it: 5xx answers to bad input, bad input taken for good, and a NUL character that
Postgres text cannot hold wedging ingestion."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx

from services.common import codec, state_auth
from services.common.config import Settings
from tests.integration.ws_support import job_event, publisher, serve_gateway
from tests.support import auth_headers, eventually

SUBMISSION = {
    "organization": "acme",
    "environment": "stg",
    "module_type": "amd64/script",
    "module_name": "hello",
    "action": "PLAN",
}


def error_fields(r: httpx.Response, status: int) -> dict[str, str]:
    assert r.status_code == status, r.text
    fields: dict[str, str] = r.json()["error"].get("fields") or {}
    return fields


async def test_bad_input_gets_4xx_naming_the_field(settings: Settings) -> None:
    async with (
        serve_gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as http,
    ):
        # Build 0 went to the scheduler, which refuses it unanswered: a 503 (with no
        # scheduler at all, as here, at once; with one, after the 5 s timeout).
        assert error_fields(await http.post("/api/jobs/0/cancel"), 404) == {}
        assert (await http.get("/api/jobs/0")).status_code == 404
        # A NUL in `q` reached Postgres: 500.
        assert "q" in error_fields(await http.get("/api/jobs", params={"q": "a\x00"}), 422)
        # Names no job can have matched nothing (200) instead of being refused; a trailing
        # newline passed a `$`-anchored re.match.
        for bad in ("Acme", "a.b", "acme\n"):
            r = await http.get("/api/jobs", params={"organization": bad})
            assert "organization" in error_fields(r, 422)
            r = await http.get("/api/webhooks", params={"organization": bad})
            assert "organization" in error_fields(r, 422)
        r = await http.get("/api/jobs", params={"module_type": "amd64"})
        assert "module_type" in error_fields(r, 422)
        # Empty means "any" (the contract's `?organization=&environment=`).
        r = await http.get("/api/jobs", params={"organization": "", "status": "", "q": ""})
        assert r.status_code == 200
        assert (await http.get("/api/webhooks", params={"organization": ""})).status_code == 200
        r = await http.get("/api/state/acme/stg/%C2%84/versions")
        assert "module_name" in error_fields(r, 422)
        assert (await http.get("/api/state/acme/stg/net/versions")).json() == {"items": []}
        # The page's own query must not fail on a NUL either.
        assert (await http.get("/", params={"q": "\x00"})).status_code == 200
        # "²".isdigit() is true but int("²") fails: these were 500s.
        hook = {"organization": "acme", "url": "http://h/", "statuses": ["SUCCESS"]}
        created = await http.post("/api/webhooks", json=hook | {"secret": "0123456789"})
        r = await http.get(f"/api/webhooks/{created.json()['id']}/deliveries?limit=²")
        assert "limit" in error_fields(r, 422)
        assert (await http.get("/", params={"before": "²"})).status_code == 200


async def test_nul_in_a_submission_or_webhook_is_refused(settings: Settings) -> None:
    async with (
        serve_gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as http,
    ):
        # Was a 202, and its first event (which carries the variables) then failed every
        # ingestion batch for good: no later job was ever stored.
        r = await http.post("/api/jobs", json=SUBMISSION | {"variables": {"A": "x\x00y"}})
        assert "variables.A" in error_fields(r, 422)
        hook = {
            "organization": "acme",
            "url": "http://127.0.0.1:9/h",
            "statuses": ["SUCCESS"],
            "secret": "0123456789",
        }
        # Both were 500s (Postgres refused the text).
        r = await http.post("/api/webhooks", json=hook | {"url": "http://127.0.0.1:9/\x00"})
        assert "url" in error_fields(r, 422)
        r = await http.post("/api/webhooks", json=hook | {"secret": "01234\x0056789"})
        assert "secret" in error_fields(r, 422)
        assert "01234" not in r.text  # the secret is never echoed back
        # urlsplit raises on an unbalanced "[" in the host: a 500.
        r = await http.post("/api/webhooks", json=hook | {"url": "http://a[b/x"})
        assert "url" in error_fields(r, 422)
        assert (await http.post("/api/webhooks", json=hook)).status_code == 201


async def fetch(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def test_a_message_postgres_cannot_store_is_rejected_not_retried_forever(
    settings: Settings,
) -> None:
    """Valid by its schema but with a NUL in a text field (a runner printing binary output
    before the runner replaced NULs): the whole batch failed on every retry."""
    async with publisher(settings) as pub, serve_gateway(settings):
        await pub.event(job_event(1, 1, requested_by="al\x00ice"))
        await pub.event(job_event(2, 1))
        await pub.chunk(2, 0, "bin\x00ary\n")
        await pub.chunk(2, 9, "text\n")
        last = await pub.last_seq()

        async def stored() -> bool:
            jobs = await fetch(settings, "SELECT build_id FROM jobs")
            chunks = await fetch(settings, 'SELECT "offset" FROM job_log_chunks')
            marks = await fetch(settings, "SELECT kind, watermark FROM ingest_progress")
            return (
                [r["build_id"] for r in jobs] == [2]
                and [r["offset"] for r in chunks] == [9]
                and {r["kind"]: r["watermark"] for r in marks}.get("events") == last
            )

        await eventually(stored, timeout=20)
    rejected = await fetch(settings, "SELECT subject, error, payload FROM rejected_messages")
    assert sorted(r["subject"] for r in rejected) == sorted(
        [settings.subjects.event("acme", "stg", 1), settings.subjects.log(2)]
    )
    assert all(r["error"].startswith("not storable") for r in rejected)
    assert codec.loads(next(r["payload"] for r in rejected if "log" in r["subject"]))["offset"] == 0


async def test_state_backend_refuses_what_it_cannot_serve_back(settings: Settings) -> None:
    """A state that is not a JSON object was stored and served back to Terraform (the
    document says an object); lock info with a NUL was a 500."""
    apply = {"module_name": "network", "action": "APPLY-AUTO", "module_type": "amd64/terraform"}
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.event(job_event(1, 1, **apply))
        creds = state_auth.issue(settings.state_secret, gw.url, 1, "acme", "stg", "network")
        async with httpx.AsyncClient(
            base_url=gw.url, auth=(creds.username, creds.password)
        ) as http:
            path = "/api/state/acme/stg/network"

            async def known() -> bool:
                return (await http.get(path)).status_code != 503  # until the job is stored

            await eventually(known, timeout=15)
            assert (await http.post(path, json=[None, None])).status_code == 400
            assert (await http.get(path)).status_code == 204  # nothing was stored
            assert (await http.request("LOCK", path, json=[1])).status_code == 400
            r = await http.request("LOCK", path, json={"ID": "a\x00b"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid"
            assert (await http.request("LOCK", path, json={"ID": "ok"})).status_code == 200
            assert (await http.post(path + "?ID=ok", json={"version": 4})).status_code == 200
            assert (await http.get(path)).json() == {"version": 4}
