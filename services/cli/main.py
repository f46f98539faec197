"""`xoogify`: the command line. Parses arguments and hands over to a service or a client
command; each command lives in its own module."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

from services.cli import nats_config
from services.common.config import Settings, machine_arch
from services.common.crypto import SecretsError


def _labels(values: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"xoogify: --label wants k=v, got {item!r}")
        labels[key] = value
    return labels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xoogify", description="Xoogify Deployment Jobs")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="the whole stack on this machine")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--data-dir", default=".xoogify")
    up.add_argument("--runners", default=machine_arch(), help="architectures, comma-separated")
    up.add_argument("--demo", action="store_true", help="also submit a few example jobs")
    up.add_argument(
        "--orgs", default="", help="organizations to create NATS subscriber users for (a,b)"
    )

    gw = sub.add_parser("gateway", help="the HTTP/websocket gateway")
    gw.add_argument("--host", default="127.0.0.1")
    gw.add_argument("--port", type=int, default=8000)
    gw.add_argument(
        "--gateway-id",
        default=os.environ.get("XOOGIFY_GATEWAY_ID", "gw"),
        help="unique per replica: names its ingestion consumers",
    )

    sched = sub.add_parser("scheduler", help="the scheduler")
    sched.add_argument("--metrics-port", type=int, default=None)

    runner = sub.add_parser("runner", help="a runner")
    runner.add_argument("--arch", default=machine_arch())
    runner.add_argument("--kinds", default="terraform,script")
    runner.add_argument("--label", action="append", metavar="K=V")
    runner.add_argument("--runner-id", default=None)
    runner.add_argument("--metrics-port", type=int, default=None)

    sub.add_parser("migrate", help="apply the database migrations")
    nats_config.add_parsers(sub)

    submit = sub.add_parser("submit", help="submit a job")
    submit.add_argument("--org", required=True)
    submit.add_argument("--env", required=True)
    submit.add_argument("--module", required=True)
    submit.add_argument("--type", required=True, dest="module_type")
    submit.add_argument("--action", required=True)
    submit.add_argument("--var", action="append", metavar="K=V", default=[])
    submit.add_argument("--sensitive", action="append", metavar="K", default=[])
    submit.add_argument("--timeout", type=int, default=None, dest="timeout_s")
    submit.add_argument("--idempotency-key", default=None)
    submit.add_argument("--follow", action="store_true")

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("build_id", type=int)

    jobs = sub.add_parser("jobs", help="list jobs")
    jobs.add_argument("--org", default=None)
    jobs.add_argument("--env", default=None)
    jobs.add_argument("--status", default=None)
    jobs.add_argument("--action", default=None)
    jobs.add_argument("--module", default=None)
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--json", action="store_true", help="one JSON object per line")

    logs = sub.add_parser("logs", help="print a job's log")
    logs.add_argument("build_id", type=int)
    logs.add_argument("--follow", action="store_true")

    watch = sub.add_parser("watch", help="print status events as JSON lines, live")
    watch.add_argument("--org", default=None)
    watch.add_argument("--env", default=None)
    watch.add_argument("--status", default=None)
    watch.add_argument("--since", default=None, metavar="SEQ|10m")
    watch.add_argument("--allow-gap", action="store_true")

    from services.cli import tokens

    tokens.add_parser(sub)
    return parser


def _run_service(service: Coroutine[Any, Any, int | None]) -> int:
    """Run a service on uvloop when it is installed (a dependency, also of uvicorn's
    standard extras): its event loop and socket I/O are native code, where nats-py's
    flusher otherwise spends a Python transport write per flush. None needs the stdlib
    loop (signal handlers, `asyncio.start_server`, pipes and executors work on both). The
    runner does not use the loop's `subprocess_exec` (libuv forks; CPython's Popen
    vforks): `runner/process.py` starts commands itself and attaches them to the loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(service) or 0
    return uvloop.run(service) or 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _command(args, Settings.from_env())
    except SecretsError as exc:
        # A key this service must hold is missing or malformed: say which, start nothing.
        print(f"xoogify {args.command}: {exc}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace, settings: Settings) -> int:
    command = args.command
    if command == "gateway":
        from services.common import logging_setup
        from services.gateway.app import serve

        logging_setup.setup("gateway")
        return _run_service(serve(settings, args.host, args.port, args.gateway_id))
    if command == "scheduler":
        from services.common import logging_setup
        from services.scheduler.service import run as run_scheduler

        logging_setup.setup("scheduler")
        return _run_service(run_scheduler(settings, args.metrics_port))
    if command == "runner":
        from services.common import logging_setup
        from services.runner.service import run as run_runner

        logging_setup.setup("runner")
        kinds = [k for k in args.kinds.split(",") if k]
        _run_service(
            run_runner(
                settings, args.arch, kinds, _labels(args.label), args.metrics_port, args.runner_id
            )
        )
        return 0
    if command == "migrate":
        from services.gateway.migrate import migrate

        asyncio.run(migrate(settings.database_url))
        return 0
    if command in ("nats-config", "subscriber-stream"):
        return nats_config.run(args, settings)
    if command == "watch":
        from services.cli.watch import run as run_watch

        return run_watch(args, settings)
    if command == "token":
        from services.cli import tokens

        return tokens.run(args, settings)
    if command == "up":
        from services.cli.up import up

        return up(args, settings)
    from services.cli import client_commands

    return client_commands.run(args, settings)


if __name__ == "__main__":
    sys.exit(main())
