"""`GET /api/openapi.json`: the OpenAPI 3.1 document of the HTTP API, as kept in
`schemas/openapi.json` (its component schemas are copies of the other files in
`schemas/`, checked by tests/unit/test_webhook_openapi_doc.py)."""

from __future__ import annotations

from functools import cache

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common.config import SCHEMAS_DIR


@cache
def document() -> bytes:
    return (SCHEMAS_DIR / "openapi.json").read_bytes()


async def openapi_json(request: Request) -> Response:
    return Response(document(), media_type="application/json")


routes = [Route("/api/openapi.json", openapi_json, methods=["GET"])]
