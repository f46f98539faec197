"""The edge's cheap per-request reads: the headers Authenticate needs in one pass, and the
request counter by route and status (its labelled children kept, each request counted)."""

from __future__ import annotations

from typing import Any

from services.gateway.auth import bearer, session_cookie, wanted_headers
from services.gateway.health import HTTP_REQUESTS, RequestMetrics


def test_wanted_headers_keeps_the_first_of_each_and_only_those_needed() -> None:
    scope = {
        "headers": [
            (b"authorization", b"Bearer xo_first"),
            (b"x-csrf-token", b"abc"),
            (b"authorization", b"Bearer xo_second"),
            (b"cookie", b"xoogify_session=xo_cookie; other=1"),
            (b"user-agent", b"test"),
        ]
    }
    headers = wanted_headers(scope)
    assert headers == {
        "authorization": "Bearer xo_first",
        "x-csrf-token": "abc",
        "cookie": "xoogify_session=xo_cookie; other=1",
    }
    assert bearer(headers) == "xo_first"
    assert session_cookie(headers) == "xo_cookie"
    assert bearer(wanted_headers({"headers": []})) is None


def _count(route: str, status: str) -> float:
    return HTTP_REQUESTS.labels(route, status)._value.get()


async def test_request_metrics_count_every_request_by_route_and_status() -> None:
    async def endpoint_app(scope: Any, receive: Any, send: Any) -> None:
        scope["endpoint"] = submit_like
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def submit_like() -> None: ...

    async def send(message: Any) -> None: ...

    metrics = RequestMetrics(endpoint_app)
    before = _count("submit_like", "202")
    for _ in range(3):
        await metrics({"type": "http"}, send, send)
    assert _count("submit_like", "202") == before + 3
