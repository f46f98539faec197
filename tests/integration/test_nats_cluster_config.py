"""The configs `xoogify nats-config` writes for compose.yaml's NATS nodes form a working
JetStream cluster: three real nats-server processes on loopback, routes with their
password, the per-role users of nats_auth, a stream replicated three times that keeps
taking messages when a node is killed."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
from nats.js.api import PubAck, StreamConfig

from services.common import bus, nats_auth, nats_cluster
from services.common.children import pdeathsig_preexec
from services.common.config import Settings
from services.common.embedded import find_nats_server, free_port
from tests.support import eventually

CLUSTER = "xoogify-test"


@dataclass
class Cluster:
    nodes: list[nats_cluster.Node]
    passwords: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, index: int, user: str) -> str:
        server = f"nats://127.0.0.1:{self.nodes[index].client_port}"
        return nats_auth.user_url(server, user, self.passwords[user])

    def kill(self, index: int) -> None:
        self.procs[index].kill()
        self.procs[index].wait(10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    passwords = {user: f"pw-{user}" for user in nats_auth.users_for(["acme"])}
    nodes = [
        nats_cluster.Node(
            f"n{i}",
            host="127.0.0.1",
            client_port=free_port(),
            cluster_port=free_port(),
            http_port=free_port(),
        )
        for i in range(1, 4)
    ]
    running = Cluster(nodes, passwords)
    procs = running.procs
    try:
        for node in nodes:
            text = nats_cluster.node_config(
                Settings().subjects,
                passwords,
                node,
                [peer for peer in nodes if peer is not node],
                cluster_name=CLUSTER,
                route_password="route-secret",
                store_dir=tmp_path / node.name / "jetstream",
                listen_host="127.0.0.1",
            )
            conf = tmp_path / f"{node.name}.conf"
            nats_auth.write_server_config(conf, text)
            log = open(tmp_path / f"{node.name}.log", "ab")
            procs.append(
                subprocess.Popen(
                    [find_nats_server(), "-c", str(conf)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    preexec_fn=pdeathsig_preexec,
                )
            )
            log.close()
        yield running
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(10)


async def healthy(node: nats_cluster.Node) -> bool:
    """The node's own health endpoint, as compose's healthcheck asks it."""
    # A plain client: the autouse OpenAPI audit reads every AsyncClient answer as the gateway's.
    address = f"http://127.0.0.1:{node.http_port}/healthz"
    try:
        answer = await asyncio.to_thread(httpx.get, address, timeout=2)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200


async def test_generated_configs_form_a_replicated_jetstream_cluster(
    cluster: Cluster,
) -> None:
    nodes = cluster.nodes
    for node in nodes:
        await eventually(lambda node=node: healthy(node), timeout=60, interval=0.2)  # type: ignore[misc]

    settings = Settings()
    logs = next(c for c in bus.stream_configs(settings) if c.name == settings.subjects.logs_stream)
    replicated = StreamConfig.from_response({**logs.as_dict(), "num_replicas": 3})

    # The gateway creates the stream through the first node ...
    gateway = await nats.connect(
        cluster.url(0, "gateway"), inbox_prefix=nats_auth.inbox_prefix("gateway")
    )
    # ... a runner on the third node writes to it ...
    runner = await nats.connect(
        cluster.url(2, "runner"),
        inbox_prefix=nats_auth.inbox_prefix("runner"),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
    )
    try:
        gjs = gateway.jetstream(timeout=10)

        async def created() -> bool:
            try:
                info = await gjs.add_stream(replicated)
            except nats.errors.Error:
                return False  # no JetStream meta leader elected yet
            return info.cluster is not None and len(info.cluster.replicas or []) == 2

        await eventually(created, timeout=60, interval=0.5)

        # A new R3 stream takes a moment to elect its leader; until then a publish gets no
        # response (the services wait for it at start-up the same way).
        rjs = runner.jetstream(timeout=10)

        async def published() -> PubAck | None:
            try:
                return await rjs.publish(settings.subjects.log(1), b'{"x": 1}')
            except (nats.errors.Error, TimeoutError):
                return None

        ack = await eventually(published, timeout=60, interval=0.5)
        assert ack.stream == logs.name

        # ... and with the stream leader's node killed, the two others keep taking messages.
        info = await gjs.stream_info(logs.name)
        assert info.cluster is not None and info.cluster.leader
        leader = next(i for i, n in enumerate(nodes) if n.name == info.cluster.leader)
        cluster.kill(leader)
        other = await nats.connect(
            cluster.url((leader + 1) % 3, "runner"),
            inbox_prefix=nats_auth.inbox_prefix("runner"),
        )
        try:
            ojs = other.jetstream(timeout=10)

            async def stored() -> bool:
                try:
                    await ojs.publish(settings.subjects.log(2), b'{"x": 2}')
                except (nats.errors.Error, TimeoutError):
                    return False
                return True

            await eventually(stored, timeout=60, interval=0.5)
        finally:
            await other.close()
    finally:
        await runner.close()
        await gateway.close()
