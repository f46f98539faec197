"""HTML pages (placeholder: the live part of the gateway replaces it)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route


async def jobs_page(request: Request) -> HTMLResponse:
    return HTMLResponse("<h1>Deployment Jobs</h1>")


routes = [Route("/", jobs_page)]
