"""The HTML pages: the Deployment Jobs table (`/`), a job (`/jobs/{build_id}`), the runners
(`/runners`), and the raw log download (`/jobs/{build_id}/log.txt`).

Jinja2 renders the first paint on the server (readable without JavaScript) with autoescape
on; small ES-module scripts in `web/static/` keep each page live over `/ws`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import jinja2
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from services.common import codec
from services.common.config import WEB_DIR
from services.common.filters import FILTER_KEYS, JobFilter
from services.common.status import ACTIONS, Status, is_final
from services.gateway import ansi, db, runners
from services.gateway.auth import principal_of
from services.gateway.context import context_of
from services.gateway.job_lookup import get_job_soon

PAGE_SIZE = 50
# The first paint shows this much of a stored log; the page fetches the rest over /ws.
FIRST_LOG_BYTES = 256 * 1024
RAW_PIECE = 1024 * 1024

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(str(WEB_DIR / "templates")),
    autoescape=True,
)
templates = Jinja2Templates(env=_env)


def _filter_values(request: Request) -> dict[str, str]:
    keys = (*FILTER_KEYS, "q")
    # A NUL can be in no job and Postgres text cannot hold one (the query would fail).
    return {k: request.query_params.get(k, "").replace("\x00", "").strip() for k in keys}


def _int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name, "")
    # isdigit alone takes "²", which int() refuses.
    return int(value) if value.isascii() and value.isdigit() else None


def first_log_part(data: str) -> str:
    """Cut a first paint of the log at its last line end, so no line or escape sequence is
    split between the server's rendering and the script's."""
    if len(data.encode()) < FIRST_LOG_BYTES:
        return data
    cut = data.rfind("\n")
    return data[: cut + 1] if cut != -1 else data


async def jobs_page(request: Request) -> Response:
    ctx = context_of(request)
    values = _filter_values(request)
    flt = JobFilter.from_mapping(values)
    before = _int_param(request, "before")
    scope = principal_of(request).scope
    items, next_before, watermark = await db.list_jobs(ctx.pool, flt, PAGE_SIZE, before, scope)
    return templates.TemplateResponse(
        request,
        "jobs.html",
        {
            "items": items,
            "next": next_before,
            "before": before,
            "watermark": watermark,
            "filters": values,
            "filter_json": codec.dumps_str({k: v for k, v in values.items() if v}),
            "statuses": [s.value for s in Status],
            "actions": ACTIONS,
        },
    )


async def job_page(request: Request) -> Response:
    ctx = context_of(request)
    build_id = int(request.path_params["build_id"])
    job = await get_job_soon(ctx, build_id, principal_of(request).scope)
    if job is None:
        return templates.TemplateResponse(
            request, "404.html", {"what": f"job {build_id}"}, status_code=404
        )
    watermark = await db.watermark(ctx.pool)
    part = await db.read_log(ctx.pool, build_id, 0, FIRST_LOG_BYTES)
    shown = first_log_part(part["data"])
    segments, style = ansi.parse(shown)
    offset = len(shown.encode())
    return templates.TemplateResponse(
        request,
        "job.html",
        {
            "job": job,
            "events": job.get("events") or [],
            "variables": job.get("variables") or {},
            "final": is_final(job["status"]),
            "watermark": watermark,
            "log_segments": segments,
            "log_offset": offset,
            "log_style": style.classes(),
            "log_complete": bool(part["complete"]) and offset == part["next_offset"],
            "job_json": codec.dumps_str({k: v for k, v in job.items() if k != "events"}),
        },
    )


async def raw_log(request: Request) -> Response:
    ctx = context_of(request)
    build_id = int(request.path_params["build_id"])
    if await get_job_soon(ctx, build_id, principal_of(request).scope) is None:
        return templates.TemplateResponse(
            request, "404.html", {"what": f"job {build_id}"}, status_code=404
        )

    async def pieces() -> AsyncIterator[bytes]:
        offset = 0
        while True:
            part = await db.read_log(ctx.pool, build_id, offset, RAW_PIECE)
            if not part["data"]:
                return
            yield part["data"].encode()
            offset = part["next_offset"]

    return StreamingResponse(
        pieces(),
        media_type="text/plain; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="build-{build_id}.log"'},
    )


def group_runners(items: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Runners by architecture, architectures and runners in name order."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for runner in items:
        groups[str(runner.get("arch") or "unknown")].append(runner)
    return [
        (arch, sorted(found, key=lambda r: str(r.get("runner_id"))))
        for arch, found in sorted(groups.items())
    ]


async def runners_page(request: Request) -> Response:
    items = await runners.list_runners(context_of(request), principal_of(request).scope)
    return templates.TemplateResponse(request, "runners.html", {"groups": group_runners(items)})


routes = [
    Route("/", jobs_page, name="jobs"),
    Route("/jobs/{build_id:int}", job_page, name="job"),
    Route("/jobs/{build_id:int}/log.txt", raw_log, name="raw_log"),
    Route("/runners", runners_page, name="runners"),
]
