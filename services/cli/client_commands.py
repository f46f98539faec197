"""The CLI's client commands (submit, jobs, logs, cancel): thin wrappers over
`services.client.XoogifyClient` that print for people or for scripts.

Exit codes: 0 success; 1 the job ended FAILURE; 2 a usage or API error; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from services.client import ApiError, XoogifyClient
from services.common import codec
from services.common.config import Settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def resolve_token(settings: Settings) -> str | None:
    """XOOGIFY_TOKEN, else the admin token `xoogify up` wrote into its data dir."""
    if settings.token:
        return settings.token
    path = Path(os.environ.get("XOOGIFY_DATA_DIR", ".xoogify")) / "admin-token"
    return path.read_text().strip() if path.exists() else None


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} wants k=v, got {item!r}")
        out[key] = value
    return out


def _err(message: str) -> None:
    print(f"xoogify: {message}", file=sys.stderr)


async def _submit(args: argparse.Namespace, xo: XoogifyClient) -> int:
    job = await xo.submit(
        organization=args.org,
        environment=args.env,
        module_name=args.module,
        module_type=args.module_type,
        action=args.action,
        variables=_pairs(args.var, "--var"),
        sensitive=args.sensitive,
        timeout_s=args.timeout_s,
        idempotency_key=args.idempotency_key,
    )
    build_id = int(job["build_id"])
    if not args.follow:
        print(build_id)
        return EXIT_OK
    print(build_id, file=sys.stderr)
    return await _follow(xo, build_id)


async def _follow(xo: XoogifyClient, build_id: int) -> int:
    out = sys.stdout
    async for text in xo.follow_logs(build_id):
        out.write(text)
        out.flush()
    status = xo.last_status
    if status is None:
        status = (await xo.get_job(build_id))["status"]
    return EXIT_OK if status == "SUCCESS" else EXIT_FAILURE


def _print_jobs(items: list[dict[str, Any]], as_json: bool) -> None:
    if as_json or not sys.stdout.isatty():
        for job in items:
            sys.stdout.write(codec.dumps_str(job) + "\n")
        return
    table = Table("Build ID", "Environment", "Organization", "Module Type", "Module", "Action")
    table.add_column("Status")
    colours = {"SUCCESS": "green", "FAILURE": "red", "WORKING": "yellow"}
    for job in items:
        status = job["status"]
        if job.get("reason"):
            status += f" ({job['reason']})"
        if job.get("queue_position"):
            status += f" · queue {job['queue_position']}"
        table.add_row(
            str(job["build_id"]),
            job["environment"],
            job["organization"],
            job["module_type"],
            job["module_name"],
            job["action"],
            f"[{colours.get(job['status'], 'cyan')}]{status}[/]",
        )
    Console().print(table)


async def _jobs(args: argparse.Namespace, xo: XoogifyClient) -> int:
    page = await xo.list_jobs(
        limit=args.limit,
        organization=args.org,
        environment=args.env,
        status=args.status,
        action=args.action,
        module_name=args.module,
    )
    _print_jobs(page["items"], args.json)
    return EXIT_OK


async def _logs(args: argparse.Namespace, xo: XoogifyClient) -> int:
    if args.follow:
        return await _follow(xo, args.build_id)
    offset = 0
    while True:
        part = await xo.read_logs(args.build_id, offset)
        sys.stdout.write(part["data"])
        if not part["data"] or part["next_offset"] == offset:
            break
        offset = part["next_offset"]
    sys.stdout.flush()
    return EXIT_OK


async def _cancel(args: argparse.Namespace, xo: XoogifyClient) -> int:
    job = await xo.cancel(args.build_id)
    print(f"{job['build_id']} {job['status']}" + (f" {job['reason']}" if job.get("reason") else ""))
    return EXIT_OK


_COMMANDS = {"submit": _submit, "jobs": _jobs, "logs": _logs, "cancel": _cancel}


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    async with XoogifyClient(settings.gateway_url, resolve_token(settings)) as xo:
        return await _COMMANDS[args.command](args, xo)


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_run(args, settings))
    except KeyboardInterrupt:
        # Ctrl-C stops following; it never cancels the job.
        return EXIT_INTERRUPTED
    except ApiError as exc:
        _err(str(exc))
        return EXIT_USAGE
    except (httpx.HTTPError, OSError) as exc:
        _err(f"cannot reach the gateway at {settings.gateway_url}: {exc}")
        return EXIT_USAGE
    except ValueError as exc:
        _err(str(exc))
        return EXIT_USAGE
