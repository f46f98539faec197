"""`xoogify token create|list|revoke`: API tokens, straight in Postgres
(`XOOGIFY_DATABASE_URL`), so they can be made before any gateway runs. The store and its
rules are services.gateway.token_store's; this only parses and prints."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from services.common.config import Settings
from services.common.timefmt import format_time
from services.gateway import migrate, token_store


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = sub.add_parser("token", help="API tokens: create, list, revoke")
    actions = token.add_subparsers(dest="token_command", required=True)
    create = actions.add_parser("create", help="print a new token (only its hash is stored)")
    create.add_argument("--name", required=True, help="who uses it; becomes requested_by")
    kind = create.add_mutually_exclusive_group(required=True)
    kind.add_argument("--admin", action="store_true", help="every organization")
    kind.add_argument("--org", action="append", metavar="O", help="this organization (repeat)")
    kind.add_argument("--runner", action="store_true", help="a runner's token")
    actions.add_parser("list", help="list tokens (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a token by its ID")
    revoke.add_argument("token_id", type=int)


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await migrate.apply(conn)
        command = args.token_command
        if command == "create":
            kind = "admin" if args.admin else "runner" if args.runner else "org"
            record, secret = await token_store.create(conn, args.name, kind, args.org or [])
            print(f"xoogify: token {record.id} ({record.name}, {kind})", file=sys.stderr)
            print(secret)
            return 0
        if command == "list":
            for r in await token_store.list_all(conn):
                state = f"revoked {format_time(r.revoked_at)}" if r.revoked_at else "active"
                used = format_time(r.last_used_at) if r.last_used_at else "never"
                orgs = ",".join(r.organizations) or "-"
                print(f"{r.id}\t{r.name}\t{r.kind}\t{orgs}\t{state}\tlast used {used}")
            return 0
        if not await token_store.revoke(conn, args.token_id):
            print(f"xoogify: no active token {args.token_id}", file=sys.stderr)
            return 1
        print(f"xoogify: token {args.token_id} revoked", file=sys.stderr)
        return 0
    finally:
        await conn.close()


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        return asyncio.run(_run(args, settings))
    except ValueError as exc:
        print(f"xoogify: {exc}", file=sys.stderr)
        return 2
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"xoogify: cannot reach Postgres at XOOGIFY_DATABASE_URL: {exc}", file=sys.stderr)
        return 2
