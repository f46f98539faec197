"""Organization scoping on a real gateway: a token for `acme` sees, cancels, streams and
follows only `acme` jobs (another organization's job answers 404), and its webhooks and the
runners' current jobs are limited the same way."""

from __future__ import annotations

import httpx

from services.common import bus, codec
from services.common.config import Settings
from services.common.timefmt import now_iso
from tests.integration.ws_support import Publisher, job_event, publisher, serve_gateway
from tests.support import WsRecorder, auth_headers, bearer, eventually, make_token

ACME_JOB, GLOBEX_JOB = 101, 102


async def _two_jobs(pub: Publisher, http: httpx.AsyncClient, admin: dict[str, str]) -> None:
    """One acme and one globex job, stored, each with a log."""
    await pub.event(job_event(ACME_JOB, 1, org="acme"))
    await pub.event(job_event(GLOBEX_JOB, 1, org="globex"))
    await pub.chunk(ACME_JOB, 0, "acme log\n")
    await pub.chunk(GLOBEX_JOB, 0, "globex secret log\n")

    async def stored() -> bool:
        both = await http.get("/api/jobs", headers=admin)
        return len(both.json()["items"]) == 2

    await eventually(stored, timeout=20)


def _org_items(ws: WsRecorder) -> set[str]:
    return {i["organization"] for i in ws.job_items()}


async def test_an_org_token_sees_only_its_organizations_jobs(settings: Settings) -> None:
    acme = bearer(await make_token(settings.database_url, "alice", "org", ["acme"]))
    admin = auth_headers(settings)
    async with (
        publisher(settings) as pub,
        serve_gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        await _two_jobs(pub, http, admin)
        listed = (await http.get("/api/jobs", headers=acme)).json()["items"]
        assert [j["build_id"] for j in listed] == [ACME_JOB]
        # Asking for the other organization by filter gives nothing, not its jobs.
        other = await http.get("/api/jobs", params={"organization": "globex"}, headers=acme)
        assert other.status_code == 200 and other.json()["items"] == []

        assert (await http.get(f"/api/jobs/{ACME_JOB}", headers=acme)).status_code == 200
        hidden = await http.get(f"/api/jobs/{GLOBEX_JOB}", headers=acme)
        # The same answer as a job that does not exist: its existence is not revealed.
        missing = await http.get("/api/jobs/999999", headers=acme)
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"]["code"] == missing.json()["error"]["code"]
        assert (await http.get(f"/api/jobs/{GLOBEX_JOB}/logs", headers=acme)).status_code == 404
        log = await http.get(f"/api/jobs/{ACME_JOB}/logs", headers=acme)
        assert log.json()["data"] == "acme log\n"
        cancel = await http.post(f"/api/jobs/{GLOBEX_JOB}/cancel", headers=acme)
        assert cancel.status_code == 404

        # Pages: the table lists acme only; another organization's job page is a 404.
        table = await http.get("/", headers=acme)
        assert f'data-build-id="{ACME_JOB}"' in table.text
        assert f'data-build-id="{GLOBEX_JOB}"' not in table.text
        assert (await http.get(f"/jobs/{GLOBEX_JOB}", headers=acme)).status_code == 404
        assert (await http.get(f"/jobs/{GLOBEX_JOB}/log.txt", headers=acme)).status_code == 404
        assert (await http.get(f"/jobs/{ACME_JOB}", headers=acme)).status_code == 200
        # The admin sees both.
        assert (await http.get(f"/jobs/{GLOBEX_JOB}", headers=admin)).status_code == 200


async def test_ws_pushes_replays_and_logs_only_of_own_organizations(settings: Settings) -> None:
    acme = bearer(await make_token(settings.database_url, "alice", "org", ["acme"]))
    admin = auth_headers(settings)
    async with (
        publisher(settings) as pub,
        serve_gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        await _two_jobs(pub, http, admin)
        async with (
            WsRecorder(gw.ws_url, headers=acme) as ws,
            WsRecorder(gw.ws_url, headers=admin) as all_,
        ):
            # The globex update goes first: once acme's arrives, globex's would have.
            await pub.event(job_event(GLOBEX_JOB, 2, "WORKING", org="globex"))
            await pub.event(job_event(ACME_JOB, 2, "WORKING", org="acme"))
            await ws.wait_job_status(ACME_JOB, {"WORKING"})
            await all_.wait_job_status(ACME_JOB, {"WORKING"})
            assert _org_items(ws) == {"acme"}
            assert _org_items(all_) == {"acme", "globex"}

            # A filter naming the other organization matches nothing it may see.
            await ws.send({"type": "filter", "organization": "globex"})
            await pub.event(job_event(GLOBEX_JOB, 3, "SUCCESS", org="globex"))
            await all_.wait_job_status(GLOBEX_JOB, {"SUCCESS"})
            await ws.send({"type": "filter"})
            await pub.event(job_event(ACME_JOB, 3, "SUCCESS", org="acme"))
            await ws.wait_job_status(ACME_JOB, {"SUCCESS"})
            assert _org_items(ws) == {"acme"}

            # Following another organization's log is refused like a missing job.
            await ws.send({"type": "follow_logs", "build_id": GLOBEX_JOB, "offset": 0})
            error = await ws.wait_for(lambda m: m.get("type") == "error")
            assert error["message"] == f"no job {GLOBEX_JOB}"
            await ws.send({"type": "follow_logs", "build_id": ACME_JOB, "offset": 0})
            await ws.wait_for(lambda m: m.get("type") == "log" and m["data"] == "acme log\n")
            assert not any("globex" in str(m.get("data", "")) for m in ws.messages)

        # A `since` replay from the stream's start holds acme's events only.
        async with WsRecorder(gw.ws_url, headers=acme) as replay:
            await replay.send({"type": "filter", "since": 0})
            await replay.wait_job_status(ACME_JOB, {"SUCCESS"})
            assert _org_items(replay) == {"acme"}
            assert [i["seq"] for i in replay.job_items()] == [1, 2, 3]


async def _put_runner(pub: Publisher, runner_id: str, build_id: int) -> None:
    settings = pub.settings
    kv = await bus.ensure_kv(pub.js, settings.subjects.runners_bucket, ttl=60)
    registration = {
        "runner_id": runner_id,
        "arch": "amd64",
        "kinds": ["script"],
        "labels": {},
        "version": "test",
        "hostname": "test-host",
        "state": "busy",
        "current_build_id": build_id,
        "last_seen": now_iso(),
    }
    await kv.put(runner_id, codec.dumps(registration))


async def test_runners_show_only_the_current_jobs_the_caller_may_see(settings: Settings) -> None:
    acme = bearer(await make_token(settings.database_url, "alice", "org", ["acme"]))
    admin = auth_headers(settings)
    async with (
        publisher(settings) as pub,
        serve_gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        await _two_jobs(pub, http, admin)
        await _put_runner(pub, "runner-acme", ACME_JOB)
        await _put_runner(pub, "runner-globex", GLOBEX_JOB)

        async def current(headers: dict[str, str]) -> dict[str, int | None]:
            items = (await http.get("/api/runners", headers=headers)).json()["items"]
            return {r["runner_id"]: r["current_build_id"] for r in items}

        assert await current(admin) == {"runner-acme": ACME_JOB, "runner-globex": GLOBEX_JOB}
        assert await current(acme) == {"runner-acme": ACME_JOB, "runner-globex": None}
        page = await http.get("/runners", headers=acme)
        assert page.status_code == 200 and str(GLOBEX_JOB) not in page.text


async def _webhook(http: httpx.AsyncClient, headers: dict[str, str], org: str) -> httpx.Response:
    body = {"organization": org, "url": "http://127.0.0.1:9/h", "statuses": ["SUCCESS"]}
    return await http.post("/api/webhooks", json={**body, "secret": "0123456789"}, headers=headers)


async def test_webhooks_are_scoped_to_the_tokens_organizations(settings: Settings) -> None:
    acme = bearer(await make_token(settings.database_url, "alice", "org", ["acme"]))
    admin = auth_headers(settings)
    async with serve_gateway(settings) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        mine = await _webhook(http, acme, "acme")
        assert mine.status_code == 201
        assert (await _webhook(http, acme, "globex")).status_code == 403
        theirs = (await _webhook(http, admin, "globex")).json()["id"]

        listed = (await http.get("/api/webhooks", headers=acme)).json()["items"]
        assert [w["organization"] for w in listed] == ["acme"]
        everyone = (await http.get("/api/webhooks", headers=admin)).json()["items"]
        assert {w["organization"] for w in everyone} == {"acme", "globex"}
        assert (
            await http.get(f"/api/webhooks/{theirs}/deliveries", headers=acme)
        ).status_code == 404
        assert (await http.delete(f"/api/webhooks/{theirs}", headers=acme)).status_code == 404
        assert (
            await http.get(f"/api/webhooks/{theirs}/deliveries", headers=admin)
        ).status_code == 200
        assert (
            await http.delete(f"/api/webhooks/{mine.json()['id']}", headers=acme)
        ).status_code == 204


async def test_a_token_for_several_organizations_sees_each(settings: Settings) -> None:
    both = bearer(await make_token(settings.database_url, "ops", "org", ["acme", "globex"]))
    async with (
        publisher(settings) as pub,
        serve_gateway(settings) as gw,
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        await _two_jobs(pub, http, auth_headers(settings))
        listed = (await http.get("/api/jobs", headers=both)).json()["items"]
        assert {j["build_id"] for j in listed} == {ACME_JOB, GLOBEX_JOB}
        assert (await http.get(f"/api/jobs/{GLOBEX_JOB}", headers=both)).status_code == 200
