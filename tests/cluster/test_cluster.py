"""Issue 8 on one machine: three `nats-server` nodes as a JetStream cluster with replicated
streams, two gateways, two schedulers, three runners. A burst of jobs; the leading
scheduler and one NATS node are killed in the middle. Every job ends final, each event is
stored exactly once, no job runs twice, and the websocket clients of both gateways see
every update."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from nats.js.api import StreamInfo

from services.common import codec
from services.common.config import Settings
from services.common.embedded import EmbeddedNatsCluster, free_port
from tests.cluster.failover import job_body, submit_until_accepted, the_leader, wait_takeover
from tests.stack import Stack
from tests.support import WsRecorder, auth_headers, eventually

FINAL = {"SUCCESS", "FAILURE"}
BURST = 30  # jobs, half before the faults and half during the failover


def burst_bodies(evidence: Path) -> list[dict[str, Any]]:
    """Mostly PLANs (they overlap), plus APPLY-AUTOs queued per workspace."""
    bodies = []
    for i in range(BURST):
        if i % 3 == 0:
            body = job_body(f"w{i % 2}", "APPLY-AUTO", str(evidence), seconds="0.3")
        else:
            body = job_body(f"e{i % 5}", "PLAN", str(evidence), seconds="0.5")
        bodies.append(body)
    return bodies


async def stream_info(settings: Settings) -> StreamInfo:
    nc = await nats.connect(settings.nats_servers)
    try:
        return await nc.jetstream().stream_info(settings.subjects.events_stream)
    finally:
        await nc.close()


async def events_stream_leader(settings: Settings) -> str:
    info = await stream_info(settings)
    assert info.cluster is not None and info.config.num_replicas == 3
    return str(info.cluster.leader)


async def stream_events(settings: Settings) -> list[dict[str, Any]]:
    """Every status event the events stream holds, in stream order."""
    nc = await nats.connect(settings.nats_servers)
    js = nc.jetstream()
    try:
        state = (await js.stream_info(settings.subjects.events_stream)).state
        found = []
        for seq in range(state.first_seq, state.last_seq + 1):
            msg = await js.get_msg(settings.subjects.events_stream, seq)
            found.append(codec.loads(msg.data or b"{}"))
    finally:
        await nc.close()
    return found


def finals_seen(ws: WsRecorder) -> set[int]:
    return {i["build_id"] for i in ws.job_items() if i["status"] in FINAL}


def events_seen(ws: WsRecorder) -> set[tuple[int, int]]:
    return {(i["build_id"], i["seq"]) for i in ws.job_items()}


@pytest.mark.timeout(240)
async def test_burst_through_leader_and_nats_node_loss(
    stack: Stack, settings: Settings, nats_cluster: EmbeddedNatsCluster, tmp_path: Path
) -> None:
    evidence = tmp_path / "runs.txt"
    gateways = {"gateway-a": free_port(), "gateway-b": free_port()}
    schedulers = {"scheduler-1": free_port(), "scheduler-2": free_port()}
    for name, port in gateways.items():
        await stack.start_gateway(name, port=port, gateway_id=name)
    for name, port in schedulers.items():
        await stack.start_scheduler(name, metrics_port=port)
    for i in range(3):
        await stack.start_runner(f"runner-{i + 1}")
    leader = await the_leader(stack, schedulers)
    standby = next(name for name in schedulers if name != leader)
    urls = {name: f"http://127.0.0.1:{port}" for name, port in gateways.items()}
    headers = auth_headers(settings)
    clients = [httpx.AsyncClient(base_url=url, headers=headers) for url in urls.values()]
    recorders = [
        WsRecorder(url.replace("http://", "ws://") + "/ws", headers=headers)
        for url in urls.values()
    ]

    async def runners_up() -> bool:
        r = await clients[0].get("/api/runners")
        return r.status_code == 200 and len(r.json()["items"]) == 3

    try:
        for ws in recorders:
            await ws.__aenter__()
        # Ten processes start on two cores; a runner registers once its streams have leaders.
        await eventually(runners_up, timeout=60)
        bodies = burst_bodies(evidence)

        async def submit(i: int) -> int:
            # Alternate gateways; the key makes a retry through a failover the same job.
            client = clients[i % 2]
            return await submit_until_accepted(client, bodies[i], f"burst-{i}", timeout=90)

        half = BURST // 2
        first = await asyncio.gather(*(submit(i) for i in range(half)))

        # The faults, while the first half is queued or running.
        node = await events_stream_leader(settings)
        stack.kill(leader)
        killed_at = time.monotonic()
        next(n for n in nats_cluster.nodes if n.name == node).kill()
        second = await asyncio.gather(*(submit(i) for i in range(half, BURST)))
        await wait_takeover(standby, schedulers[standby], timeout=60)
        print(f"standby leads {time.monotonic() - killed_at:.2f} s after the kills")
        build_ids = sorted(first + second)
        assert len(set(build_ids)) == BURST

        conn = await asyncpg.connect(settings.database_url)
        try:

            async def all_final() -> bool:
                rows = await conn.fetch(
                    "SELECT status FROM jobs WHERE build_id = ANY($1::bigint[])", build_ids
                )
                return len(rows) == BURST and all(r["status"] in FINAL for r in rows)

            await eventually(all_final, timeout=150, interval=0.5)
            jobs = {
                r["build_id"]: dict(r)
                for r in await conn.fetch("SELECT build_id, status, reason, seq FROM jobs")
            }
            stored = await conn.fetch("SELECT build_id, seq, status FROM job_events")
            last = (await stream_info(settings)).state.last_seq

            async def both_ingested() -> bool:
                # Each gateway ingests every event through its own durable consumer.
                rows = await conn.fetch(
                    "SELECT consumer, watermark FROM ingest_progress WHERE kind = 'events'"
                )
                marks = {r["consumer"]: r["watermark"] for r in rows}
                wanted = {f"ingest-events-{name}" for name in gateways}
                return set(marks) == wanted and min(marks.values()) >= last

            await eventually(both_ingested, timeout=30, interval=0.2)
        finally:
            await conn.close()

        # Every update reaches the websocket clients of both gateways.
        for ws in recorders:
            await eventually(lambda ws=ws: _true(finals_seen(ws) >= set(build_ids)), timeout=30)
    finally:
        for ws in recorders:
            await ws.__aexit__(None, None, None)
        for client in clients:
            await client.aclose()

    statuses = Counter((j["status"], j["reason"]) for j in jobs.values())
    print(f"outcomes: {dict(statuses)}")
    for build_id, job in sorted(jobs.items()):
        if job["status"] != "SUCCESS":
            history = [(r["seq"], r["status"]) for r in stored if r["build_id"] == build_id]
            print(f"  build {build_id}: {job['status']}/{job['reason']} {sorted(history)}")
    assert set(jobs) == set(build_ids)

    # Each event exactly once: on the stream (dedup by Nats-Msg-Id held through the
    # failover), and in Postgres, with contiguous seqs ending at the job's own.
    on_stream = Counter((e["build_id"], e["seq"]) for e in await stream_events(settings))
    assert [k for k, n in on_stream.items() if n > 1] == []
    in_db = Counter((r["build_id"], r["seq"]) for r in stored)
    assert set(in_db) == set(on_stream)
    for build_id, job in jobs.items():
        seqs = sorted(seq for (b, seq) in in_db if b == build_id)
        assert seqs == list(range(1, job["seq"] + 1)), (build_id, seqs)

    # None run twice: one WORKING event at most per job, one execution at most per job,
    # and exactly one for each job that succeeded.
    working = Counter(r["build_id"] for r in stored if r["status"] == "WORKING")
    assert max(working.values()) == 1
    runs = Counter(int(line) for line in evidence.read_text().split())
    assert [b for b, n in runs.items() if n > 1] == []
    succeeded = {b for b, j in jobs.items() if j["status"] == "SUCCESS"}
    assert succeeded <= set(runs)
    assert set(runs) <= {b for b in working}

    # Both gateways' clients saw every stored event (no resync was needed).
    for ws in recorders:
        assert [m for m in ws.messages if m.get("type") == "resync"] == []
        assert events_seen(ws) >= set(in_db)


async def _true(value: bool) -> bool:
    return value
