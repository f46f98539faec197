"""Webhook routes: create, list, delete a webhook and list its deliveries.

A webhook gets a signed JSON POST of every status event of its organization whose status
it names (services.gateway.webhook_delivery). Its secret signs every delivery, so it is
kept (encrypted at rest, services.gateway.webhook_secrets) and never returned.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common import schemas
from services.common.filters import invalid_values
from services.common.timefmt import format_time
from services.gateway import webhook_secrets
from services.gateway.auth import principal_of
from services.gateway.context import context_of
from services.gateway.errors import ApiError, json_body
from services.gateway.responses import FastJSONResponse

MAX_BODY = 16 * 1024
MAX_LIMIT = 500
_WEBHOOK_FIELDS = "id, organization, url, statuses, created_at"
_DELIVERY_FIELDS = (
    "id, webhook_id, event_id, build_id, seq, status, attempts, last_status_code,"
    " last_error, next_attempt_at, delivered_at, created_at"
)


def _pool(request: Request) -> asyncpg.Pool:
    return context_of(request).pool


def webhook_from_row(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "organization": row["organization"],
        "url": row["url"],
        "statuses": list(row["statuses"]),
        "created_at": format_time(row["created_at"]),
    }


def delivery_from_row(row: Any) -> dict[str, Any]:
    item = {name: row[name] for name in _DELIVERY_FIELDS.replace(" ", "").split(",")}
    for name in ("next_attempt_at", "delivered_at", "created_at"):
        if item[name] is not None:
            item[name] = format_time(item[name])
    return item


def validate_create(body: Any) -> dict[str, Any]:
    """The body of POST /api/webhooks, or ApiError 422 naming each bad field."""
    try:
        schemas.check("webhook_create", body)
    except schemas.SchemaError as exc:
        fields = exc.fields()
        if "secret" in fields:
            # Never echo the secret back.
            fields["secret"] = "must be 8..256 characters, without NUL"
        raise ApiError(422, "invalid webhook", fields=fields) from None
    try:
        url = urlsplit(body["url"])
    except ValueError:  # e.g. an unbalanced "[" in the host: "Invalid IPv6 URL" (was a 500)
        url = None
    if url is None or url.scheme.lower() not in ("http", "https") or not url.hostname:
        raise ApiError(422, "invalid webhook", fields={"url": "must be an http(s) URL"})
    return dict(body)


def _webhook_id(request: Request) -> int:
    value = int(request.path_params["webhook_id"])
    if value > 2**63 - 1:
        raise ApiError(404, f"no webhook {value}")
    return value


async def create_webhook(request: Request) -> Response:
    body = validate_create(await json_body(request, MAX_BODY))
    principal_of(request).require_org(body["organization"])
    key_id, sealed = webhook_secrets.seal(
        context_of(request).keys.state, body["organization"], body["url"], body["secret"]
    )
    row = await _pool(request).fetchrow(
        "INSERT INTO webhooks (organization, url, statuses, secret_key_id, secret_sealed)"
        f" VALUES ($1, $2, $3, $4, $5) RETURNING {_WEBHOOK_FIELDS}",
        body["organization"],
        body["url"],
        body["statuses"],
        key_id,
        sealed,
    )
    return FastJSONResponse(webhook_from_row(row), status_code=201)


async def list_webhooks(request: Request) -> Response:
    organization = request.query_params.get("organization") or None
    bad = invalid_values({"organization": organization})
    if bad:
        raise ApiError(422, "invalid organization", fields=bad)
    rows = await _pool(request).fetch(
        f"SELECT {_WEBHOOK_FIELDS} FROM webhooks"
        " WHERE ($1::text IS NULL OR organization = $1)"
        " AND ($2::text[] IS NULL OR organization = ANY($2)) ORDER BY id",
        organization,
        principal_of(request).scope,
    )
    return FastJSONResponse({"items": [webhook_from_row(r) for r in rows]})


async def delete_webhook(request: Request) -> Response:
    webhook_id = _webhook_id(request)
    deleted = await _pool(request).fetchval(
        "DELETE FROM webhooks WHERE id = $1"
        " AND ($2::text[] IS NULL OR organization = ANY($2)) RETURNING id",
        webhook_id,
        principal_of(request).scope,
    )
    if deleted is None:
        raise ApiError(404, f"no webhook {webhook_id}")
    return Response(status_code=204)


async def list_deliveries(request: Request) -> Response:
    webhook_id = _webhook_id(request)
    raw_limit = request.query_params.get("limit") or "100"
    # isdigit alone takes "²", which int() refuses (that was a 500).
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_LIMIT:
        raise ApiError(422, "limit out of range", fields={"limit": f"must be 1..{MAX_LIMIT}"})
    pool = _pool(request)
    visible = await pool.fetchval(
        "SELECT 1 FROM webhooks WHERE id = $1 AND ($2::text[] IS NULL OR organization = ANY($2))",
        webhook_id,
        principal_of(request).scope,
    )
    if visible is None:
        raise ApiError(404, f"no webhook {webhook_id}")
    rows = await pool.fetch(
        f"SELECT {_DELIVERY_FIELDS} FROM webhook_deliveries WHERE webhook_id = $1"
        " ORDER BY id DESC LIMIT $2",
        webhook_id,
        int(raw_limit),
    )
    return FastJSONResponse({"items": [delivery_from_row(r) for r in rows]})


routes = [
    Route("/api/webhooks", create_webhook, methods=["POST"]),
    Route("/api/webhooks", list_webhooks, methods=["GET"]),
    Route("/api/webhooks/{webhook_id:int}", delete_webhook, methods=["DELETE"]),
    Route("/api/webhooks/{webhook_id:int}/deliveries", list_deliveries, methods=["GET"]),
]
