"""The cluster tests run on a three-node JetStream cluster (loopback ports, route ports,
server names and store dirs of their own) instead of one `nats-server`; streams and KV
buckets get three replicas. Everything else comes from tests/conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from services.common.config import Settings
from services.common.embedded import EmbeddedNatsCluster

MODULES_DIR = Path(__file__).resolve().parents[1] / "modules"


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[EmbeddedNatsCluster]:
    cluster = EmbeddedNatsCluster(tmp_path / "nats-cluster").start()
    try:
        asyncio.run(cluster.wait_ready(timeout=60))
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def nats_server(nats_cluster: EmbeddedNatsCluster) -> EmbeddedNatsCluster:
    """tests/conftest.py's `settings` takes its NATS URL from here: all three nodes."""
    return nats_cluster


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # The default 5 s heartbeat (registry TTL 15 s): a stream whose leader node died elects
    # another in 4-10 s (Raft election timeouts), and runners must outlive that. A 3 s
    # lease keeps the scheduler takeover quick.
    return replace(
        settings,
        modules_dir=MODULES_DIR,
        stream_replicas=3,
        leader_ttl_s=3.0,
        heartbeat_s=5.0,
    )
