"""Job status events as the scheduler publishes them (schemas/job_event.json), and a fast
publisher for them: pipelined JetStream publishes (`JsPublisher.send`) with `Nats-Msg-Id`
`<build_id>-<seq>`."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Any

from services.common import codec
from services.common.jspub import Ack, JsPublisher
from services.common.subjects import Subjects, event_msg_id
from services.common.timefmt import now_iso

LIFE = ("IN-PROGRESS", "WORKING", "SUCCESS")


def job_event(
    build_id: int, seq: int, status: str, org: str = "acme", env: str = "stg", at: str = ""
) -> dict[str, Any]:
    at = at or now_iso()
    final = status in ("SUCCESS", "FAILURE")
    return {
        "build_id": build_id,
        "organization": org,
        "environment": env,
        "module_type": "amd64/script",
        "module_name": "bench",
        "action": "PLAN",
        "status": status,
        "reason": "exit-code" if status == "FAILURE" else None,
        "exit_code": (1 if status == "FAILURE" else 0) if final else None,
        "runner_id": None if status == "IN-PROGRESS" else "runner-1",
        "queue_position": None,
        "seq": seq,
        "requested_by": "bench",
        "submitted_at": at,
        "started_at": None if status == "IN-PROGRESS" else at,
        "finished_at": at if final else None,
        "updated_at": at,
        "event_id": event_msg_id(build_id, seq),
    }


def interleaved_lives(jobs: int, block: int = 1000, orgs: int = 10) -> Iterator[dict[str, Any]]:
    """Every job's three events; jobs are in flight `block` at a time, so one batch holds
    many different builds (as in production), not one build's whole life."""
    at = now_iso()
    for start in range(1, jobs + 1, block):
        builds = range(start, min(start + block, jobs + 1))
        for seq, status in enumerate(LIFE, start=1):
            for b in builds:
                yield job_event(b, seq, status, org=f"org{b % orgs}", at=at)


async def publish(
    pub: JsPublisher, subjects: Subjects, event: dict[str, Any]
) -> asyncio.Future[Ack]:
    """Start publishing one event; returns the future of its Ack."""
    subject = subjects.event(event["organization"], event["environment"], event["build_id"])
    headers = {"Nats-Msg-Id": event["event_id"]}
    return await pub.send(subject, codec.dumps(event), headers)


async def publish_all(
    pub: JsPublisher, subjects: Subjects, events: Iterable[dict[str, Any]]
) -> int:
    """Publish everything (at most the publisher's window unacked); return the highest
    stream sequence acknowledged."""
    futures = [await publish(pub, subjects, e) for e in events]
    last = 0
    for future in futures:
        ack = await future
        last = max(last, int(ack.seq))
    return last
