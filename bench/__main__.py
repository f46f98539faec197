"""`python -m bench <scenario> [--size N|tiny] [--json]`: measure one part of the pipeline
on this machine, print a table and one JSON line; exit 1 if the run was not correct
(something missing or wrong), never because of a time. `all` runs every scenario."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from bench.report import Result, emit
from bench.stack import Servers

SCENARIOS = ("ingest", "latency", "throughput", "fanout", "logs", "resync", "ceiling")


def parse_size(text: str) -> int | str:
    if text == "tiny":
        return text
    value = int(text.replace("_", ""))
    if value < 1:
        raise argparse.ArgumentTypeError("size must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("scenario", choices=[*SCENARIOS, "all"])
    parser.add_argument(
        "--size", type=parse_size, default=None, help="scenario size, or 'tiny' for a smoke run"
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    return parser


async def run_one(servers: Servers, name: str, size: int | str | None) -> Result:
    module = importlib.import_module(f"bench.{name}")
    chosen = module.TINY if size == "tiny" else (size or module.DEFAULT)
    try:
        result: Result = await module.run(servers, int(chosen))
    except Exception as exc:
        # A run that broke is an incorrect run: report it as one, with the cause.
        traceback.print_exc(file=sys.stderr)
        result = Result(name, int(chosen))
        result.problem(f"run failed: {exc!r}")
    return result


async def main(args: argparse.Namespace) -> int:
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    servers = Servers()
    failed = 0
    try:
        for name in names:
            result = await run_one(servers, name, args.size)
            emit(result, args.json)
            failed += not result.ok
    finally:
        await asyncio.to_thread(servers.close)
    return 1 if failed else 0


def entry(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The shared NATS helpers warn on a disconnect, which every drained connection is.
    logging.getLogger("services").setLevel(logging.ERROR)
    if args.scenario == "all" and args.size not in (None, "tiny"):
        # Sizes mean different things per scenario (events, jobs, clients, MB, rows).
        raise SystemExit("python -m bench all: --size must be 'tiny' or left out")
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main(args))
    # The same event loop the gateway runs on (uvicorn's standard extras), so the
    # load generator is not the slower side.
    return uvloop.run(main(args))


if __name__ == "__main__":
    sys.exit(entry())
