"""`xoogify nats-config` and `xoogify subscriber-stream`: the NATS side of a deployment.

`nats-config` writes one nats-server config per cluster node (compose.yaml runs it as a
one-shot service into a volume the NATS nodes read); `subscriber-stream` creates the
subscribers' copy of the events stream once NATS is up, before any service publishes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from services.common import nats_auth, nats_cluster
from services.common.config import Settings
from services.gateway import store_reset


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cfg = sub.add_parser(
        "nats-config",
        help="write a nats-server config per cluster node (passwords from the environment)",
    )
    cfg.add_argument("--out-dir", required=True, help="writes <node>.conf here")
    cfg.add_argument("--nodes", default="nats", help="node names = their hosts (a,b,c)")
    cfg.add_argument("--cluster-name", default="xoogify")
    cfg.add_argument("--store-dir", default="/data/jetstream")
    cfg.add_argument("--orgs", default="", help="organizations with a subscriber user (a,b)")
    sub.add_parser(
        "subscriber-stream",
        help="create the subscribers' copy of the events stream (XOOGIFY_NATS_URL: "
        "the subscribers-admin user; with XOOGIFY_DATABASE_URL it also numbers on from the "
        "stored watermark after a lost NATS store)",
    )


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def write_configs(args: argparse.Namespace, settings: Settings) -> int:
    env = os.environ
    try:
        users = nats_auth.users_for(_split(args.orgs))
        passwords = nats_cluster.passwords_from_env(users, env)
        nodes = [nats_cluster.Node(name) for name in _split(args.nodes)]
        configs = nats_cluster.cluster_configs(
            settings.subjects,
            passwords,
            nodes,
            cluster_name=args.cluster_name,
            route_password=env.get(nats_cluster.ROUTE_PASSWORD_VARIABLE, ""),
            store_dir=Path(args.store_dir),
        )
    except ValueError as exc:
        print(f"xoogify nats-config: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in configs.items():
        path = out_dir / f"{name}.conf"
        nats_auth.write_server_config(path, text)
        print(f"xoogify nats-config: wrote {path}")
    return 0


def subscriber_stream(settings: Settings) -> int:
    # One server is enough: the stream is created for the whole cluster.
    url = settings.nats_url.split(",")[0].strip()
    asyncio.run(nats_auth.ensure_subscriber_stream(url, settings))
    if os.environ.get("XOOGIFY_DATABASE_URL"):
        # After a lost NATS store: number on where the gateways will (store_reset.py).
        aligned = asyncio.run(store_reset.align_subscribers(url, settings, settings.database_url))
        if aligned:
            print("xoogify subscriber-stream: the NATS store was lost; numbering goes on")
    print(f"xoogify subscriber-stream: {settings.subjects.events_stream} ready")
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "nats-config":
        return write_configs(args, settings)
    return subscriber_stream(settings)
