"""The suite-wide OpenAPI audit itself: it must catch what breaks the document."""

from __future__ import annotations

import httpx

from tests.openapi_audit import problems


def _pair(
    method: str, path: str, status: int, body: object
) -> tuple[httpx.Request, httpx.Response]:
    request = httpx.Request(method, f"http://gw{path}")
    return request, httpx.Response(status, json=body, request=request)


def test_a_documented_answer_passes() -> None:
    error = {"error": {"code": "not-found", "message": "no job 7"}}
    assert problems(*_pair("GET", "/api/jobs/7", 404, error)) == []


def test_an_undocumented_status_is_caught() -> None:
    found = problems(*_pair("GET", "/api/runners", 418, {"items": []}))
    assert found and "not documented" in found[0]


def test_a_body_off_its_schema_is_caught() -> None:
    assert problems(*_pair("GET", "/api/jobs", 200, {"items": "nope"}))
    assert problems(*_pair("GET", "/api/state/acme/stg/net/versions", 200, {"items": [1]}))


def test_pages_are_not_audited() -> None:
    request = httpx.Request("GET", "http://gw/jobs/1")
    assert problems(request, httpx.Response(200, text="<html>", request=request)) == []
