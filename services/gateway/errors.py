"""JSON errors, the one shape every `/api/` answer uses when something is wrong:
`{"error": {"code", "message", "fields"?}}` — never an HTML page, never a 500 for bad input."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import nats.errors
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from services.common import codec
from services.gateway.responses import FastJSONResponse

log = logging.getLogger(__name__)

_CODES = {
    400: "bad-request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "too-large",
    422: "invalid",
    423: "locked",
    429: "too-many-requests",
    503: "unavailable",
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        fields: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or _CODES.get(status, "error")
        self.message = message
        self.fields = fields


async def json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON body: 413 past `max_bytes`, 400 when it is not JSON."""
    body = await request.body()
    if len(body) > max_bytes:
        raise ApiError(413, f"request body over {max_bytes} bytes")
    try:
        return codec.loads(body)
    except ValueError:
        raise ApiError(400, "body is not valid JSON", "invalid-json") from None


def error_response(
    status: int, message: str, code: str | None = None, fields: dict[str, str] | None = None
) -> FastJSONResponse:
    error: dict[str, object] = {"code": code or _CODES.get(status, "error"), "message": message}
    if fields:
        error["fields"] = fields
    return FastJSONResponse({"error": error}, status_code=status)


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.code, exc.fields)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/") or request.url.path in ("/healthz", "/readyz"):
        return error_response(exc.status_code, str(exc.detail))
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(str(exc.detail), status_code=exc.status_code)


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error", extra={"path": request.url.path})
    return error_response(500, "internal error", "internal")


async def unavailable_handler(request: Request, exc: Exception) -> Response:
    # NATS or Postgres away for a moment (a restart, a failover): the request was fine and
    # may be retried, so say 503 like /readyz does, not 500. A submission retried with its
    # Idempotency-Key is the same job even if this one reached the stream.
    log.warning("dependency unavailable", extra={"path": request.url.path, "error": repr(exc)})
    return error_response(503, "a backing service is unavailable; retry shortly")


# The errors of a server we depend on being unreachable (not of a bad query or a bug).
UNAVAILABLE: tuple[type[Exception], ...] = (
    nats.errors.Error,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # cannot connect now, admin shutdown
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a pooled connection that died mid-operation
    ConnectionError,
)

handlers = {
    ApiError: api_error_handler,
    HTTPException: http_error_handler,
    **dict.fromkeys(UNAVAILABLE, unavailable_handler),
    Exception: internal_error_handler,
}
