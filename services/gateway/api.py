"""The HTTP API of CONTRACT.md: submit, list, read, logs, cancel, runners.

Bad input gets a 4xx JSON error naming the field (services.gateway.errors); a submission
is published to JetStream and its stream sequence is its build ID.
"""

from __future__ import annotations

from typing import Any

import nats.errors
import orjson
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from services.common import codec, schemas
from services.common.filters import JobFilter, invalid_values
from services.common.job_object import new_job
from services.common.status import ACTIONS, Status
from services.common.timefmt import now_iso
from services.gateway import db, runners, sealing
from services.gateway.auth import principal_of
from services.gateway.context import context_of
from services.gateway.errors import ApiError, json_body
from services.gateway.job_lookup import get_job_soon
from services.gateway.responses import FastJSONResponse

MAX_BODY = 64 * 1024
MAX_LIMIT = 500
MAX_LOG_LIMIT = 8 * 1024 * 1024
MAX_BUILD_ID = 2**63 - 1


def _int_param(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"{name} must be an integer", fields={name: "not an integer"}) from None
    if not lo <= value <= hi:
        raise ApiError(422, f"{name} out of range", fields={name: f"must be {lo}..{hi}"})
    return value


def _build_id(request: Request) -> int:
    build_id = int(request.path_params["build_id"])
    # Build IDs start at 1. A 0 must stop here: the scheduler refuses it as a malformed
    # cancel request and never answers, which made `POST /api/jobs/0/cancel` a 503.
    if not 1 <= build_id <= MAX_BUILD_ID:
        raise ApiError(404, f"no job {build_id}")
    return build_id


def body_hash(body: dict[str, Any], keys: sealing.GatewayKeys) -> str:
    # Keyed: the body may hold sensitive values, and a plain hash of a weak one could be
    # guessed offline from the submit stream.
    return keys.state.keyed_hash(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))


async def submit_job(request: Request) -> Response:
    ctx = context_of(request)
    principal = principal_of(request)
    body = await json_body(request, MAX_BODY)
    try:
        schemas.check("submission", body)
    except schemas.SchemaError as exc:
        raise ApiError(422, "invalid submission", fields=exc.fields()) from None
    principal.require_org(body["organization"])
    variables: dict[str, str] = body.get("variables") or {}
    sensitive: list[str] = body.get("sensitive") or []
    unknown = [name for name in sensitive if name not in variables]
    if unknown:
        raise ApiError(
            422,
            "invalid submission",
            fields={"sensitive": f"not among the variables: {', '.join(unknown)}"},
        )
    key = request.headers.get("idempotency-key")
    if key is not None and not 1 <= len(key) <= 200:
        raise ApiError(422, "bad Idempotency-Key", fields={"Idempotency-Key": "1..200 chars"})
    # Sensitive values are sealed for the runners here and now; only "***" goes further.
    shown, hidden = sealing.split(variables, sensitive)
    message = {
        "organization": body["organization"],
        "environment": body["environment"],
        "module_type": body["module_type"],
        "module_name": body["module_name"],
        "action": body["action"],
        "variables": shown,
        "sensitive": sensitive,
        "timeout_s": body.get("timeout_s"),
        "requested_by": principal.name,
        "submitted_at": now_iso(),
        "body_hash": body_hash(body, ctx.keys),
    }
    subjects = ctx.settings.subjects
    headers = {"Nats-Msg-Id": f"{body['organization']}:{key}"} if key else None
    try:
        ack = await sealing.publish_submission(
            ctx.js, ctx.pub, ctx.settings, ctx.keys, message, hidden, headers
        )
        build_id = int(ack.seq)
        if ack.duplicate:
            stored_msg = await ctx.js.get_msg(subjects.submit_stream, build_id)
    except (nats.errors.Error, TimeoutError) as exc:
        # The submit stream has no leader for a moment (a NATS node failing over) or NATS
        # is away: nothing was accepted, the client retries (with its Idempotency-Key).
        raise ApiError(503, f"NATS did not take the submission; try again ({exc!r})") from None
    if ack.duplicate:
        stored = codec.loads(stored_msg.data or b"{}")
        if stored.get("body_hash") != message["body_hash"]:
            raise ApiError(
                409, "Idempotency-Key was used with another body", "idempotency-conflict"
            )
        # The key is per organization (in the message ID) and the organization is the
        # caller's own, so the stored job is one it may see.
        current = await db.get_job(ctx.pool, build_id)
        if current is not None:
            current.pop("events", None)
            return FastJSONResponse(current, status_code=202)
        message = stored
    return FastJSONResponse(new_job(build_id, message, None), status_code=202)


def _filter(request: Request) -> JobFilter:
    bad = invalid_values(request.query_params)
    if bad:
        raise ApiError(422, "invalid filter", fields=bad)
    flt = JobFilter.from_mapping(request.query_params)
    if flt.status is not None and flt.status not in {s.value for s in Status}:
        raise ApiError(
            422, "unknown status", fields={"status": f"one of {[s.value for s in Status]}"}
        )
    if flt.action is not None and flt.action not in ACTIONS:
        raise ApiError(422, "unknown action", fields={"action": f"one of {list(ACTIONS)}"})
    return flt


async def list_jobs(request: Request) -> Response:
    flt = _filter(request)
    limit = _int_param(request, "limit", 50, 1, MAX_LIMIT)
    before = _int_param(request, "before", None, 1, MAX_BUILD_ID)
    assert limit is not None
    scope = principal_of(request).scope
    items, next_before, watermark = await db.list_jobs(
        context_of(request).pool, flt, limit, before, scope
    )
    return FastJSONResponse({"items": items, "next": next_before, "watermark": watermark})


async def get_job(request: Request) -> Response:
    build_id = _build_id(request)
    job = await db.get_job(context_of(request).pool, build_id, principal_of(request).scope)
    if job is None:
        raise ApiError(404, f"no job {build_id}")
    return FastJSONResponse(job)


async def job_logs(request: Request) -> Response:
    build_id = _build_id(request)
    offset = _int_param(request, "offset", 0, 0, MAX_BUILD_ID)
    limit = _int_param(request, "limit", 1024 * 1024, 1, MAX_LOG_LIMIT)
    assert offset is not None and limit is not None
    pool = context_of(request).pool
    if not await db.job_visible(pool, build_id, principal_of(request).scope):
        raise ApiError(404, f"no job {build_id}")
    return FastJSONResponse(await db.read_log(pool, build_id, offset, limit))


async def cancel_job(request: Request) -> Response:
    ctx = context_of(request)
    principal = principal_of(request)
    build_id = _build_id(request)
    if principal.is_admin:
        stored = await db.get_job(ctx.pool, build_id)
    else:
        # A job of another organization is answered as missing. One just submitted and not
        # stored yet has no known organization: wait for it to be stored.
        stored = await get_job_soon(ctx, build_id, principal.scope)
        if stored is None:
            raise ApiError(404, f"no job {build_id}")
    request_body = {"build_id": build_id, "reason": "cancelled", "requested_by": principal.name}
    try:
        reply = await ctx.nc.request(
            ctx.settings.subjects.control_cancel, codec.dumps(request_body), timeout=5.0
        )
    except (NatsTimeoutError, NoRespondersError, TimeoutError):
        raise ApiError(503, "the scheduler did not answer; try again") from None
    answer = codec.loads(reply.data)
    job = answer.get("job") or stored
    if answer.get("ok"):
        if job is not None:
            job.pop("events", None)
        return FastJSONResponse(job, status_code=202)
    if answer.get("error") == "final" and stored is not None:
        raise ApiError(409, f"job {build_id} has already ended ({stored['status']})")
    if stored is None:
        raise ApiError(404, f"no job {build_id}")
    raise ApiError(409, f"job {build_id} cannot be cancelled: {answer.get('error')}")


async def list_runners(request: Request) -> Response:
    scope = principal_of(request).scope
    return FastJSONResponse({"items": await runners.list_runners(context_of(request), scope)})


routes = [
    Route("/api/jobs", submit_job, methods=["POST"]),
    Route("/api/jobs", list_jobs, methods=["GET"]),
    Route("/api/jobs/{build_id:int}", get_job, methods=["GET"]),
    Route("/api/jobs/{build_id:int}/logs", job_logs, methods=["GET"]),
    Route("/api/jobs/{build_id:int}/cancel", cancel_job, methods=["POST"]),
    Route("/api/runners", list_runners, methods=["GET"]),
]
