"""The HTTP API against real NATS and Postgres: submit (validation, idempotency), list
(filters, paging), read, cancel, runners, health; errors always JSON."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
from nats.aio.msg import Msg

from services.common import bus, codec, crypto, schemas
from services.common.config import Settings
from services.common.filters import JobFilter
from services.common.timefmt import format_time
from tests.integration.ws_support import job_event, publisher, serve_gateway
from tests.support import auth_headers, eventually

SUBMISSION = {
    "organization": "acme",
    "environment": "stg",
    "module_type": "amd64/script",
    "module_name": "hello",
    "action": "PLAN",
    "variables": {"GREETING": "hi", "TOKEN": "s3cret"},
    "sensitive": ["TOKEN"],
}


def assert_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = r.json()["error"]
    assert error["code"] and error["message"]
    return error


async def test_submit_publishes_and_answers_202(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:
            r = await client.post("/api/jobs", json=SUBMISSION)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "IN-PROGRESS" and job["seq"] == 1
        assert job["requested_by"] == "test-admin"  # the token's name
        assert job["updated_at"] == job["submitted_at"]
        assert job["started_at"] is None and job["runner_id"] is None
        stored = await pub.js.get_msg(settings.subjects.submit_stream, job["build_id"])
        message = schemas.decode("submit_message", stored.data or b"")
        # The sensitive value only sealed, for this build and only a runner's key opens it.
        assert message["variables"] == {"GREETING": "hi", "TOKEN": "***"}
        assert "s3cret" not in (stored.data or b"").decode()
        binding = crypto.Binding.of(job["build_id"], message)
        opened = crypto.Opener(settings.secrets_private_key).open(message["secrets"], binding)
        assert opened == {"TOKEN": "s3cret"}
        assert message["sensitive"] == ["TOKEN"] and message["module_name"] == "hello"


async def test_bad_submissions_name_the_field(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:
            bad_action = assert_error(
                await client.post("/api/jobs", json=SUBMISSION | {"action": "APPLY"}), 422
            )
            assert bad_action["code"] == "invalid" and "action" in bad_action["fields"]
            missing = assert_error(
                await client.post("/api/jobs", json={"organization": "acme"}), 422
            )
            assert missing["fields"]
            sensitive = assert_error(
                await client.post("/api/jobs", json=SUBMISSION | {"sensitive": ["NOPE"]}), 422
            )
            assert "sensitive" in sensitive["fields"]
            assert_error(await client.post("/api/jobs", content=b"{oops"), 400)
            assert_error(await client.post("/api/jobs", content=b"x" * 100_000), 413)
        info = await pub.js.stream_info(settings.subjects.submit_stream)
        assert info.state.messages == 0  # nothing bad was published


async def test_idempotency_key_same_body_same_job_other_body_409(settings: Settings) -> None:
    async with (
        serve_gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client,
    ):
        headers = {"Idempotency-Key": "k-1"}
        first = await client.post("/api/jobs", json=SUBMISSION, headers=headers)
        again = await client.post("/api/jobs", json=SUBMISSION, headers=headers)
        other = await client.post(
            "/api/jobs", json=SUBMISSION | {"module_name": "other"}, headers=headers
        )
        other_org = await client.post(
            "/api/jobs", json=SUBMISSION | {"organization": "globex"}, headers=headers
        )
        no_key = await client.post("/api/jobs", json=SUBMISSION)
    assert first.status_code == again.status_code == 202
    assert again.json()["build_id"] == first.json()["build_id"]
    assert again.json()["submitted_at"] == first.json()["submitted_at"]
    assert assert_error(other, 409)["code"] == "idempotency-conflict"
    # The key is per organization; no key, no deduplication.
    assert other_org.status_code == 202 and no_key.status_code == 202
    ids = {first.json()["build_id"], other_org.json()["build_id"], no_key.json()["build_id"]}
    assert len(ids) == 3


JOBS = [
    (org, env, action, status, module)
    for org, env, action, status, module in itertools.product(
        ["acme", "globex"], ["stg", "prod"], ["PLAN", "APPLY-AUTO"], ["SUCCESS", "FAILURE"], ["net"]
    )
]


async def test_list_filters_and_paging_agree_with_job_filter(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        for build_id, (org, env, action, status, module) in enumerate(JOBS, start=1):
            await pub.event(
                job_event(build_id, 3, status, org=org, env=env, action=action, module_name=module)
            )
        last = await pub.last_seq()
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:

            async def caught_up() -> dict[str, Any] | None:
                body = (await client.get("/api/jobs", params={"limit": 500})).json()
                return body if body["watermark"] >= last else None

            everything = (await eventually(caught_up, timeout=15))["items"]
            assert [j["build_id"] for j in everything] == list(range(len(JOBS), 0, -1))
            filters = [
                {"organization": "acme"},
                {"organization": "acme", "environment": "prod", "status": "FAILURE"},
                {"action": "APPLY-AUTO", "module_name": "net"},
                {"module_type": "amd64/script"},
                {"q": "GLOBEX"},
                {"q": "7"},
                {"q": "me st"},  # spans organization and environment, as matches() does
                {"q": "%"},
                {"organization": "nobody"},
            ]
            for params in filters:
                got = (await client.get("/api/jobs", params=params)).json()["items"]
                want = [j for j in everything if JobFilter.from_mapping(params).matches(j)]
                assert got == want, params

            pages, before = [], None
            while True:
                params: dict[str, Any] = {"organization": "acme", "limit": 3}
                if before is not None:
                    params["before"] = before
                body = (await client.get("/api/jobs", params=params)).json()
                pages.append([j["build_id"] for j in body["items"]])
                before = body["next"]
                if before is None:
                    break
            acme = [j["build_id"] for j in everything if j["organization"] == "acme"]
            assert [b for page in pages for b in page] == acme
            assert all(len(p) == 3 for p in pages[:-1]) and pages[-1]

            for params in ({"limit": 0}, {"limit": 501}, {"limit": "x"}, {"before": "y"}):
                fields = assert_error(await client.get("/api/jobs", params=params), 422)["fields"]
                assert set(fields) == set(params)
            assert (
                "status"
                in assert_error(await client.get("/api/jobs", params={"status": "DONE"}), 422)[
                    "fields"
                ]
            )


async def test_errors_are_json_for_api_paths(settings: Settings) -> None:
    async with (
        serve_gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client,
    ):
        assert_error(await client.get("/api/jobs/12345"), 404)
        assert_error(await client.get("/api/jobs/abc"), 404)
        assert_error(await client.get("/api/jobs/99999999999999999999999"), 404)
        assert_error(await client.get("/api/jobs/1/logs", params={"offset": "-1"}), 422)
        assert_error(await client.get("/api/nothing-here"), 404)
        assert_error(await client.delete("/api/jobs"), 405)
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["postgres"] == "up"
        metrics = (await client.get("/metrics")).text
        assert "xoogify_ingest" in metrics
        assert 'xoogify_http_requests_total{route="get_job",status="404"}' in metrics


async def test_cancel_asks_the_scheduler(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.event(job_event(1, 1))
        await pub.event(job_event(2, 3, "SUCCESS"))
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:

            async def stored() -> bool:
                return (await client.get("/api/jobs/2")).status_code == 200

            await eventually(stored, timeout=15)
            # Nobody answers yet: 503, not a hang.
            assert_error(await client.post("/api/jobs/1/cancel"), 503)

            requests: list[dict[str, Any]] = []

            async def scheduler(msg: Msg) -> None:
                req = schemas.decode("cancel_request", msg.data)
                requests.append(req)
                if req["build_id"] == 1:
                    job = job_event(1, 2, "FAILURE", reason="cancelled", exit_code=None)
                    job.pop("event_id")
                    reply = {"ok": True, "job": job, "error": None}
                elif req["build_id"] == 2:
                    reply = {"ok": False, "job": None, "error": "final"}
                else:
                    reply = {"ok": False, "job": None, "error": "unknown"}
                await msg.respond(codec.dumps(reply))

            sub = await pub.nc.subscribe(settings.subjects.control_cancel, cb=scheduler)
            await pub.nc.flush()
            r = await client.post("/api/jobs/1/cancel")
            assert r.status_code == 202, r.text
            assert r.json()["status"] == "FAILURE" and r.json()["reason"] == "cancelled"
            assert_error(await client.post("/api/jobs/2/cancel"), 409)
            assert_error(await client.post("/api/jobs/77/cancel"), 404)
            await sub.unsubscribe()
    assert [r["build_id"] for r in requests] == [1, 2, 77]


def registration(runner_id: str, state: str, last_seen: datetime) -> dict[str, Any]:
    return {
        "runner_id": runner_id,
        "arch": "amd64",
        "kinds": ["script"],
        "labels": {},
        "version": "0.1.0",
        "hostname": "box",
        "state": state,
        "current_build_id": 5 if state == "busy" else None,
        "last_seen": format_time(last_seen),
    }


async def test_runners_live_and_lost(settings: Settings) -> None:
    now = datetime.now(UTC)
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        kv = await bus.ensure_kv(pub.js, settings.subjects.runners_bucket)
        await kv.put("r-busy", codec.dumps(registration("r-busy", "busy", now)))
        conn = await asyncpg.connect(settings.database_url)
        try:
            for rid, ago in (("r-gone", 10), ("r-ancient", 120)):
                reg = registration(rid, "idle", now - timedelta(minutes=ago))
                await conn.execute(
                    "INSERT INTO runners (runner_id, registration, last_seen)"
                    " VALUES ($1, $2::jsonb, $3)",
                    rid,
                    codec.dumps(reg).decode(),
                    now - timedelta(minutes=ago),
                )
        finally:
            await conn.close()
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:
            items = (await client.get("/api/runners")).json()["items"]
    by_id = {r["runner_id"]: r for r in items}
    assert set(by_id) == {"r-busy", "r-gone"}  # an hour lost and it is forgotten
    assert by_id["r-busy"]["state"] == "busy" and by_id["r-busy"]["current_build_id"] == 5
    assert by_id["r-gone"]["state"] == "lost" and by_id["r-gone"]["current_build_id"] is None
