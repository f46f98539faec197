"""A submission NATS does not take (the submit stream has no leader for a moment, as when a
cluster node fails over) is answered 503 with a JSON error, never a 500; once the stream
answers again, the same request is accepted."""

from __future__ import annotations

import httpx

from services.common import bus
from services.common.config import Settings
from tests.integration.ws_support import publisher, serve_gateway
from tests.support import auth_headers

SUBMISSION = {
    "organization": "acme",
    "environment": "stg",
    "module_type": "amd64/script",
    "module_name": "hello",
    "action": "PLAN",
}


async def test_submit_without_a_stream_answers_503_then_202(settings: Settings) -> None:
    async with publisher(settings) as pub, serve_gateway(settings) as gw:
        await pub.js.delete_stream(settings.subjects.submit_stream)  # nobody takes it now
        async with httpx.AsyncClient(base_url=gw.url, headers=auth_headers(settings)) as client:
            r = await client.post("/api/jobs", json=SUBMISSION, headers={"Idempotency-Key": "k"})
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["code"] == "unavailable"

            await bus.ensure_streams(pub.js, settings)
            r = await client.post("/api/jobs", json=SUBMISSION, headers={"Idempotency-Key": "k"})
            assert r.status_code == 202, r.text
