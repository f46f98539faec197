"""The Terraform HTTP state backend: `/api/state/{organization}/{environment}/{module_name}`.

GET / POST / DELETE the state and LOCK / UNLOCK it, as Terraform's `http` backend speaks
it, stored in Postgres with every version kept. Callers authenticate with the per-job Basic
credentials a runner gets with its job (services.common.state_auth); those are good for
that job's workspace only, only while the job is not final, and only for reading when the
job is a PLAN. A lock held by a job that has ended counts as released.
"""

from __future__ import annotations

import base64
import binascii
import logging
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common import codec, state_auth
from services.common.crypto import SecretsError
from services.common.filters import invalid_values
from services.common.status import MUTATING_ACTIONS, is_final
from services.common.timefmt import format_time
from services.gateway import state_at_rest
from services.gateway.auth import principal_of
from services.gateway.context import GatewayContext, context_of
from services.gateway.errors import ApiError, error_response
from services.gateway.responses import FastJSONResponse

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 64 * 1024 * 1024
_WRITE_METHODS = {"POST", "DELETE", "LOCK", "UNLOCK"}


def _workspace(request: Request) -> tuple[str, str, str]:
    p = request.path_params
    return (p["organization"], p["environment"], p["module_name"])


def _basic(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if sep else None


async def _authorize(request: Request) -> tuple[int, Response | None]:
    """The build allowed to act here, or an error response."""
    ctx = context_of(request)
    org, env, module = _workspace(request)
    creds = _basic(request)
    challenge = {"WWW-Authenticate": 'Basic realm="xoogify-state"'}
    if creds is None:
        response = error_response(
            401, code="unauthenticated", message="per-job Basic credentials required"
        )
        response.headers.update(challenge)
        return 0, response
    path = state_auth.state_path(org, env, module)
    build_id = state_auth.verify(ctx.settings.state_secret, creds[0], creds[1], path)
    if build_id is None:
        response = error_response(
            401, code="unauthenticated", message="these credentials are not for this workspace"
        )
        response.headers.update(challenge)
        return 0, response
    row = await ctx.pool.fetchrow(
        "SELECT status, action, organization, environment, module_name FROM jobs"
        " WHERE build_id = $1",
        build_id,
    )
    if row is None:
        # The job's first event may not be stored yet; Terraform retries 5xx answers.
        return 0, error_response(
            503, code="unknown-job", message=f"build {build_id} is not known yet"
        )
    if (row["organization"], row["environment"], row["module_name"]) != (org, env, module):
        return 0, error_response(403, code="forbidden", message="this job is for another workspace")
    if is_final(row["status"]):
        return 0, error_response(403, code="forbidden", message=f"build {build_id} has ended")
    if request.method in _WRITE_METHODS and row["action"] not in MUTATING_ACTIONS:
        return 0, error_response(
            403, code="forbidden", message=f"a {row['action']} job may only read the state"
        )
    return build_id, None


async def _capped_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it is over `limit`: an oversized state is refused without
    being held in memory first."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _current_lock(ctx: GatewayContext, ws: tuple[str, str, str]) -> dict[str, Any] | None:
    """The live lock on a workspace: one held by a job that has ended does not count."""
    row = await ctx.pool.fetchrow(
        "SELECT l.lock_id, l.info, l.build_id, j.status FROM terraform_locks l"
        " LEFT JOIN jobs j ON j.build_id = l.build_id"
        " WHERE l.organization = $1 AND l.environment = $2 AND l.module_name = $3",
        *ws,
    )
    if row is None or (row["status"] is not None and is_final(row["status"])):
        return None
    return {
        "lock_id": row["lock_id"],
        "info": codec.loads(row["info"]),
        "build_id": row["build_id"],
    }


async def state(request: Request) -> Response:
    build_id, denied = await _authorize(request)
    if denied is not None:
        return denied
    ctx = context_of(request)
    ws = _workspace(request)
    if request.method == "GET":
        row = await ctx.pool.fetchrow(
            "SELECT data, key_id FROM terraform_states WHERE organization = $1"
            " AND environment = $2 AND module_name = $3 ORDER BY version DESC LIMIT 1",
            *ws,
        )
        if row is None or row["data"] is None:
            return Response(status_code=204)
        try:
            clear = state_at_rest.open_row(ctx.keys.state, ws, row["key_id"], bytes(row["data"]))
        except SecretsError as exc:
            log.error(
                "state does not decrypt", extra={"workspace": "/".join(ws), "error": str(exc)}
            )
            return error_response(500, code="internal", message="the stored state does not decrypt")
        return Response(clear, media_type="application/json")

    lock = await _current_lock(ctx, ws)
    lock_id = request.query_params.get("ID")
    if lock is not None and lock["build_id"] != build_id and lock["lock_id"] != lock_id:
        return FastJSONResponse(lock["info"], status_code=423)
    if request.method == "POST":
        body = await _capped_body(request, MAX_STATE_BYTES)
        if body is None:
            return error_response(
                413, code="too-large", message=f"state over {MAX_STATE_BYTES} bytes"
            )
        try:
            parsed = codec.loads(body)
        except ValueError:
            return error_response(400, code="invalid", message="state is not JSON")
        if not isinstance(parsed, dict):
            # A state is an object; anything else stored would be served back to Terraform.
            return error_response(400, code="invalid", message="state is not a JSON object")
        data: bytes | None = body
    else:  # DELETE keeps the history: a version without data.
        data = None
    key_id, sealed = (None, None) if data is None else state_at_rest.seal(ctx.keys.state, ws, data)
    await ctx.pool.execute(
        "INSERT INTO terraform_states (organization, environment, module_name, version,"
        " build_id, size, data, key_id)"
        " SELECT $1, $2, $3, COALESCE(max(version), 0) + 1, $4, $5, $6, $7 FROM terraform_states"
        " WHERE organization = $1 AND environment = $2 AND module_name = $3",
        *ws,
        build_id,
        len(data or b""),
        sealed,
        key_id,
    )
    return Response(status_code=200)


async def lock(request: Request) -> Response:
    build_id, denied = await _authorize(request)
    if denied is not None:
        return denied
    ctx = context_of(request)
    ws = _workspace(request)
    raw = await request.body()
    try:
        info = codec.loads(raw) if raw else {}
    except ValueError:
        return error_response(400, code="invalid", message="lock info is not JSON")
    if not isinstance(info, dict):
        return error_response(400, code="invalid", message="lock info is not a JSON object")
    lock_id = str(info.get("ID", ""))
    try:
        return await _take_lock(ctx, ws, build_id, lock_id, info)
    except asyncpg.DataError:
        # A "\u0000" in it: Postgres text and jsonb cannot hold one (that was a 500).
        return error_response(400, code="invalid", message="lock info cannot be stored")


async def _take_lock(
    ctx: GatewayContext, ws: tuple[str, str, str], build_id: int, lock_id: str, info: Any
) -> Response:
    async with ctx.pool.acquire() as conn, conn.transaction():
        # Serialise lockers of one workspace; a stale lock (its job ended) is replaced.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", "/".join(("tfstate", *ws)))
        current = await _current_lock(ctx, ws)
        if current is not None and current["build_id"] != build_id:
            return FastJSONResponse(current["info"], status_code=423)
        await conn.execute(
            "INSERT INTO terraform_locks (organization, environment, module_name, lock_id,"
            " info, build_id) VALUES ($1, $2, $3, $4, $5, $6)"
            " ON CONFLICT (organization, environment, module_name) DO UPDATE SET"
            " lock_id = EXCLUDED.lock_id, info = EXCLUDED.info, build_id = EXCLUDED.build_id,"
            " created_at = now()",
            *ws,
            lock_id,
            codec.dumps_str(info),
            build_id,
        )
    return Response(status_code=200)


async def unlock(request: Request) -> Response:
    build_id, denied = await _authorize(request)
    if denied is not None:
        return denied
    ctx = context_of(request)
    ws = _workspace(request)
    current = await _current_lock(ctx, ws)
    if current is not None and current["build_id"] != build_id:
        return FastJSONResponse(current["info"], status_code=423)
    await ctx.pool.execute(
        "DELETE FROM terraform_locks WHERE organization = $1 AND environment = $2"
        " AND module_name = $3",
        *ws,
    )
    return Response(status_code=200)


async def dispatch(request: Request) -> Response:
    if request.method == "LOCK":
        return await lock(request)
    if request.method == "UNLOCK":
        return await unlock(request)
    return await state(request)


async def versions(request: Request) -> Response:
    # A path no workspace can have is bad input, not an empty history.
    bad = invalid_values(request.path_params)
    if bad:
        return error_response(422, "invalid workspace", fields=bad)
    if not principal_of(request).may_see(request.path_params["organization"]):
        # Another organization's workspace is answered as missing, like its jobs.
        raise ApiError(404, "no such workspace")
    rows = await context_of(request).pool.fetch(
        "SELECT version, build_id, created_at, size FROM terraform_states"
        " WHERE organization = $1 AND environment = $2 AND module_name = $3"
        " ORDER BY version DESC",
        *_workspace(request),
    )
    items = [
        {
            "version": r["version"],
            "build_id": r["build_id"],
            "created_at": format_time(r["created_at"]),
            "size": r["size"],
        }
        for r in rows
    ]
    return FastJSONResponse({"items": items})


_PATH = "/api/state/{organization}/{environment}/{module_name}"
routes = [
    Route(_PATH + "/versions", versions, methods=["GET"]),
    Route(_PATH, dispatch, methods=["GET", "POST", "DELETE", "LOCK", "UNLOCK"]),
]
