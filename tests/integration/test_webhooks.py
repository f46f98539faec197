"""Webhooks end to end: the real gateway process ingests status events published as the
scheduler would, fills its outbox and POSTs signed deliveries to a real local HTTP
receiver; failures are retried, a killed gateway's successor delivers, and the API answers
as CONTRACT.md says."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from services.common import codec
from services.common.config import Settings
from tests.integration.ws_support import job_event, publisher
from tests.stack import Stack
from tests.support import auth_headers, eventually

SECRET = "receiver-secret-1"
FAST = {"XOOGIFY_WEBHOOK_BACKOFF_S": "0.1", "XOOGIFY_WEBHOOK_POLL_S": "0.05"}


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    """A tiny HTTP/1.1 server: records every request, answers `fail_first` of them 500."""

    fail_first: int = 0
    requests: list[Received] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def delivered(self, path: str | None = None) -> list[Received]:
        return [r for r in self.requests if r.answered == 200 and (path is None or r.path == path)]

    async def has_delivered(self, n: int) -> bool:
        """For `eventually`: at least `n` requests were answered 200."""
        return len(self.delivered()) >= n

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            path = head[0].split()[1]
            headers = {}
            for line in head[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            answer = 500 if len(self.requests) < self.fail_first else 200
            self.requests.append(Received(path, headers, body, answer))
            reason = "OK" if answer == 200 else "Internal Server Error"
            head_out = f"HTTP/1.1 {answer} {reason}\r\nContent-Length: 0\r\n"
            writer.write((head_out + "Connection: close\r\n\r\n").encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def receiver(fail_first: int = 0) -> AsyncIterator[Receiver]:
    recv = Receiver(fail_first)
    server = await asyncio.start_server(recv.handle, "127.0.0.1", 0)
    recv.port = server.sockets[0].getsockname()[1]
    try:
        yield recv
    finally:
        server.close()
        await server.wait_closed()


def verify(secret: str, received: Received) -> bool:
    timestamp = received.headers["x-xoogify-timestamp"]
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + received.body, hashlib.sha256)
    return hmac.compare_digest(received.headers["x-xoogify-signature"], "sha256=" + mac.hexdigest())


async def create(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/api/webhooks", json={"secret": SECRET, **body})
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def settled(http: httpx.AsyncClient, hook_id: int, count: int) -> list[dict[str, Any]]:
    """The webhook's deliveries once there are `count` and none is pending any more (the
    receiver sees a request a moment before the gateway records its answer)."""

    async def probe() -> list[dict[str, Any]] | None:
        items: list[dict[str, Any]] = (
            await http.get(f"/api/webhooks/{hook_id}/deliveries")
        ).json()["items"]
        done = len(items) == count and all(d["status"] != "pending" for d in items)
        return items if done else None

    return await eventually(probe, timeout=20)


async def test_webhook_api_and_signed_deliveries(settings: Settings, stack: Stack) -> None:
    await stack.start_gateway(**FAST)
    async with (
        receiver() as recv,
        publisher(settings) as pub,
        httpx.AsyncClient(base_url=stack.url, headers=auth_headers(stack.settings)) as http,
    ):
        acme = await create(
            http, organization="acme", url=recv.url("/acme"), statuses=["SUCCESS", "FAILURE"]
        )
        globex = await create(
            http, organization="globex", url=recv.url("/globex"), statuses=["WORKING"]
        )
        assert set(acme) == {"id", "organization", "url", "statuses", "created_at"}
        assert acme["statuses"] == ["SUCCESS", "FAILURE"] and SECRET not in str(acme)

        listed = (await http.get("/api/webhooks", params={"organization": "acme"})).json()
        assert [w["id"] for w in listed["items"]] == [acme["id"]]
        everyone = (await http.get("/api/webhooks")).json()["items"]
        assert {w["id"] for w in everyone} == {acme["id"], globex["id"]}

        await pub.life(1)  # acme: IN-PROGRESS, WORKING, SUCCESS
        await pub.event(job_event(2, 1))
        await pub.event(job_event(2, 2, "FAILURE"))
        await pub.life(3, org="globex")

        await eventually(lambda: recv.has_delivered(3), timeout=20)
        by_path = {p: recv.delivered(p) for p in ("/acme", "/globex")}
        assert sorted(r.headers["x-xoogify-event-id"] for r in by_path["/acme"]) == ["1-3", "2-2"]
        assert [r.headers["x-xoogify-event-id"] for r in by_path["/globex"]] == ["3-2"]
        for r in recv.requests:
            assert verify(SECRET, r)
            assert not verify("another-secret", r)
            assert r.headers["content-type"] == "application/json"
            event = codec.loads(r.body)
            assert event["event_id"] == r.headers["x-xoogify-event-id"]
            assert event["organization"] == r.path.strip("/")

        # The secret is encrypted at rest: no column holds it in clear.
        conn = await asyncpg.connect(settings.database_url)
        try:
            stored = await conn.fetch("SELECT secret, secret_sealed FROM webhooks")
        finally:
            await conn.close()
        assert len(stored) == 2 and all(row["secret"] is None for row in stored)
        assert all(SECRET.encode() not in bytes(row["secret_sealed"]) for row in stored)

        deliveries = await settled(http, acme["id"], 2)
        assert sorted(d["event_id"] for d in deliveries) == ["1-3", "2-2"]
        assert all(d["status"] == "delivered" and d["attempts"] == 1 for d in deliveries)
        assert all(d["last_status_code"] == 200 and d["delivered_at"] for d in deliveries)

        assert (await http.delete(f"/api/webhooks/{acme['id']}")).status_code == 204
        gone = await http.delete(f"/api/webhooks/{acme['id']}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not-found"
        missing = await http.get(f"/api/webhooks/{acme['id']}/deliveries")
        assert missing.status_code == 404
        left = (await http.get("/api/webhooks")).json()["items"]
        assert [w["id"] for w in left] == [globex["id"]]


async def test_bad_webhooks_get_422_naming_the_field(stack: Stack) -> None:
    await stack.start_gateway()
    async with httpx.AsyncClient(base_url=stack.url, headers=auth_headers(stack.settings)) as http:
        cases = [
            ({"organization": "acme", "url": "ftp://x/y", "statuses": ["SUCCESS"]}, "url"),
            ({"organization": "acme", "url": "http://x/", "statuses": ["NOPE"]}, "statuses.0"),
            (
                {"organization": "Ac.me", "url": "http://x/", "statuses": ["SUCCESS"]},
                "organization",
            ),
            (
                {
                    "organization": "acme",
                    "url": "http://x/",
                    "statuses": ["SUCCESS"],
                    "secret": "1",
                },
                "secret",
            ),
        ]
        for body, name in cases:
            response = await http.post("/api/webhooks", json={"secret": SECRET, **body})
            assert response.status_code == 422, body
            assert name in response.json()["error"]["fields"]
        bad_json = await http.post("/api/webhooks", content=b"{nope")
        assert bad_json.status_code == 400
        assert (await http.get("/api/webhooks?organization=A.B")).status_code == 422
        assert (await http.delete("/api/webhooks/999")).status_code == 404


async def test_a_receiver_that_fails_first_gets_every_delivery_once_it_recovers(
    settings: Settings, stack: Stack
) -> None:
    await stack.start_gateway(**FAST)
    async with (
        receiver(fail_first=5) as recv,
        publisher(settings) as pub,
        httpx.AsyncClient(base_url=stack.url, headers=auth_headers(stack.settings)) as http,
    ):
        hook = await create(
            http, organization="acme", url=recv.url("/h"), statuses=["IN-PROGRESS", "SUCCESS"]
        )
        for build_id in (1, 2, 3):
            await pub.life(build_id)
        wanted = sorted(f"{b}-{s}" for b in (1, 2, 3) for s in (1, 3))
        await eventually(lambda: recv.has_delivered(len(wanted)), timeout=30)
        got = [r.headers["x-xoogify-event-id"] for r in recv.delivered()]
        assert sorted(got) == wanted  # each exactly once
        assert len(recv.requests) == len(wanted) + 5
        items = await settled(http, hook["id"], len(wanted))
        assert all(d["status"] == "delivered" for d in items)
        assert sum(d["attempts"] for d in items) == len(wanted) + 5
        assert max(d["attempts"] for d in items) > 1


async def test_a_gateway_killed_between_attempts_still_delivers(
    settings: Settings, stack: Stack
) -> None:
    slow = {"XOOGIFY_WEBHOOK_BACKOFF_S": "1", "XOOGIFY_WEBHOOK_POLL_S": "0.05"}
    await stack.start_gateway(**slow)
    async with (
        receiver(fail_first=1) as recv,
        publisher(settings) as pub,
        httpx.AsyncClient(base_url=stack.url, headers=auth_headers(stack.settings)) as http,
    ):
        hook = await create(http, organization="acme", url=recv.url("/h"), statuses=["SUCCESS"])
        await pub.life(1)

        async def failed_once() -> dict[str, Any] | None:
            items = (await http.get(f"/api/webhooks/{hook['id']}/deliveries")).json()["items"]
            return items[0] if items and items[0]["attempts"] == 1 else None

        first = await eventually(failed_once, timeout=20)
        assert first["status"] == "pending" and first["last_status_code"] == 500
        stack.kill("gateway")
        assert recv.delivered() == []
        await pub.life(2)  # published while no gateway runs
        await stack.start_gateway(**slow)
        await eventually(lambda: recv.has_delivered(2), timeout=30)
        assert sorted(r.headers["x-xoogify-event-id"] for r in recv.delivered()) == ["1-3", "2-3"]
        items = await settled(http, hook["id"], 2)
        assert {d["event_id"]: d["attempts"] for d in items} == {"1-3": 2, "2-3": 1}


async def test_a_delivery_is_given_up_after_the_retry_period(
    settings: Settings, stack: Stack
) -> None:
    await stack.start_gateway(**FAST, XOOGIFY_WEBHOOK_RETRY_FOR_S="0.5")
    async with (
        receiver(fail_first=10**6) as recv,
        publisher(settings) as pub,
        httpx.AsyncClient(base_url=stack.url, headers=auth_headers(stack.settings)) as http,
    ):
        hook = await create(http, organization="acme", url=recv.url("/h"), statuses=["SUCCESS"])
        await pub.life(1)

        async def failed() -> dict[str, Any] | None:
            items = (await http.get(f"/api/webhooks/{hook['id']}/deliveries")).json()["items"]
            return items[0] if items and items[0]["status"] == "failed" else None

        item = await eventually(failed, timeout=20)
        attempts = len(recv.requests)
        assert item["attempts"] == attempts >= 2
        assert item["next_attempt_at"] is None and item["last_error"] == "HTTP 500"
