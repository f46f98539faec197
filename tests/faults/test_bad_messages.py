"""Issue 6: malformed, oversized and wrong-schema messages on every subject the services
read. Each is rejected, counted in the owning service's `/metrics`, and recorded (a
structured log line; for the gateway also a `rejected_messages` row); the services keep
working and no stream is blocked: real jobs submitted after the junk all succeed, and a
running job is still cancelled after junk on both cancel subjects."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx
import nats
import nats.errors
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.common import bus
from services.common.config import Settings
from services.common.embedded import free_port
from services.common.schemas import MAX_MESSAGE_BYTES
from services.common.subjects import family
from tests.faults.burst import trace_job
from tests.faults.modules import Trace
from tests.faults.nothing_lost import check_nothing_lost, record_figures
from tests.stack import Stack
from tests.support import auth_headers, eventually

PAYLOADS = {
    "garbage": b"\xff\xfe\x00\x9c\x07 not even text \x00",
    "not-json": b'{"build_id": 1, "status": ',
    "wrong-schema": b'{"hello": "world", "build_id": "seven"}',
    "oversized": b'{"pad": "' + b"x" * (MAX_MESSAGE_BYTES + 1024) + b'"}',
}
BAD = len(PAYLOADS)
NOWHERE = 999_999  # a build nobody submitted


def rejected_counts(text: str) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    for metric in text_string_to_metric_families(text):
        if metric.name != "xoogify_rejected_messages":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["service"], sample.labels["subject"])
                counts[key] = sample.value
    return counts


def rejected_lines(log_text: str, subject: str) -> list[dict[str, Any]]:
    lines = []
    for line in log_text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("msg") == "message rejected" and record.get("subject") == subject:
            lines.append(record)
    return lines


@pytest.mark.bad_messages
async def test_bad_messages_on_every_subject(
    settings: Settings, stack: Stack, trace: Trace
) -> None:
    s = settings.subjects
    nc = await nats.connect(settings.nats_url)
    js = nc.jetstream()
    conn = await asyncpg.connect(settings.database_url)
    http = httpx.AsyncClient(
        base_url=settings.gateway_url, headers=auth_headers(settings), timeout=10
    )
    try:
        # The scheduler reads its own KV state when it starts: junk there first, under
        # the keys of the first builds (the first real job must overwrite it).
        await bus.ensure_streams(js, settings)
        sched_kv = await bus.ensure_kv(js, s.sched_bucket)
        for n, payload in enumerate(PAYLOADS.values(), start=1):
            await sched_kv.put(f"job.{n}", payload)

        sched_port, runner_port = free_port(), free_port()
        await stack.start_gateway()
        stack.spawn("scheduler", ["scheduler", "--metrics-port", str(sched_port)])
        stack.spawn(
            "runner-1",
            ["runner", "--arch", "amd64", "--kinds", "script", "--runner-id", "runner-1"]
            + ["--metrics-port", str(runner_port)],
        )
        metrics_urls = {
            "gateway": f"{settings.gateway_url}/metrics",
            "scheduler": f"http://127.0.0.1:{sched_port}/metrics",
            "runner": f"http://127.0.0.1:{runner_port}/metrics",
        }

        async def counts() -> dict[tuple[str, str], float]:
            found: dict[tuple[str, str], float] = {}
            for url in metrics_urls.values():
                try:
                    found.update(rejected_counts((await http.get(url)).text))
                except httpx.TransportError:
                    pass  # not listening yet
            return found

        async def submit(body: dict[str, Any]) -> int:
            r = await http.post("/api/jobs", json=body)
            assert r.status_code == 202, r.text
            return int(r.json()["build_id"])

        async def job(build_id: int) -> dict[str, Any]:
            return dict((await http.get(f"/api/jobs/{build_id}")).json())

        async def reaches(build_id: int, status: str) -> dict[str, Any]:
            async def probe() -> dict[str, Any] | None:
                r = await http.get(f"/api/jobs/{build_id}")
                return r.json() if r.status_code == 200 and r.json()["status"] == status else None

            return await eventually(probe, timeout=60)

        good = [await submit(trace_job(0))]
        assert good == [1]  # its key in the scheduler's bucket held junk
        await reaches(good[0], "SUCCESS")  # everything is up and every consumer exists

        # Junk on every subject (and KV bucket) the services read, all at once.
        injectors: dict[tuple[str, str], Callable[[bytes], Awaitable[Any]]] = {
            ("scheduler", s.submit): lambda p: js.publish(s.submit, p),
            ("scheduler", family(s, s.report("runner-1"))): lambda p: js.publish(
                s.report("runner-1"), p
            ),
            ("scheduler", s.claim): lambda p: nc.publish(s.claim, p),
            ("scheduler", s.control_cancel): lambda p: nc.publish(s.control_cancel, p),
            ("runner", s.dispatch("amd64", "script")): lambda p: js.publish(
                s.dispatch("amd64", "script"), p
            ),
            ("gateway", s.events_filter()): lambda p: js.publish(
                s.event("faults", "env0", NOWHERE), p
            ),
            ("gateway", s.logs_all): lambda p: js.publish(s.log(NOWHERE), p),
        }
        runners_kv = await js.key_value(s.runners_bucket)
        for what, payload in PAYLOADS.items():
            for inject in injectors.values():
                await inject(payload)
            await runners_kv.put(f"bogus-{what}", payload)
        # A log chunk its schema accepts, but over the size any service takes.
        chunk = {"build_id": NOWHERE, "offset": 0, "data": "x" * MAX_MESSAGE_BYTES, "eof": False}
        await js.publish(s.log(NOWHERE), json.dumps(chunk).encode())
        await nc.flush()
        expected = {key: float(BAD) for key in injectors}
        expected[("gateway", s.logs_all)] = BAD + 1.0
        # Both gateway readers of the events stream refuse each one: ingestion and the hub.
        expected[("gateway", s.events_filter())] = 2.0 * BAD
        expected[("scheduler", s.runners_bucket)] = float(BAD)
        expected[("scheduler", s.sched_bucket)] = float(BAD)

        async def all_counted() -> bool:
            now = await counts()
            return all(now.get(key, 0.0) == value for key, value in expected.items())

        try:
            await eventually(all_counted, timeout=60)
        except TimeoutError:
            raise AssertionError(f"counted {await counts()}, expected {expected}") from None

        # Nothing is blocked: real work after the junk flows through every stream.
        more = [await submit(trace_job(n)) for n in range(1, 6)]
        for build_id in more:
            await reaches(build_id, "SUCCESS")
        good += more
        runners = (await http.get("/api/runners")).json()["items"]
        assert [r["runner_id"] for r in runners] == ["runner-1"]

        # Junk on the cancel subjects of a running job, then a real cancel still works.
        sleeper = await submit({**trace_job(0), "module_name": "sleep"})
        await reaches(sleeper, "WORKING")
        for payload in PAYLOADS.values():
            await nc.publish(s.cancel(sleeper), payload)
        await nc.flush()
        expected[("runner", family(s, s.cancel(sleeper)))] = float(BAD)
        await eventually(all_counted, timeout=30)
        assert (await job(sleeper))["status"] == "WORKING"
        r = await http.post(f"/api/jobs/{sleeper}/cancel")
        assert r.status_code == 202, r.text
        cancelled = await reaches(sleeper, "FAILURE")
        assert cancelled["reason"] == "cancelled"

        # A message over the NATS server's max_payload never reaches a service at all.
        with pytest.raises(nats.errors.MaxPayloadError):
            await nc.publish(s.submit, b"x" * (nc.max_payload + 1))

        # Recorded: the gateway's rejected messages are rows with the error and the bytes.
        rows = await conn.fetch(
            "SELECT subject, stream_seq, error, payload FROM rejected_messages ORDER BY id"
        )
        by_subject: dict[str, list[Any]] = {}
        for row in rows:
            by_subject.setdefault(row["subject"], []).append(row)
        assert {k: len(v) for k, v in by_subject.items()} == {
            s.event("faults", "env0", NOWHERE): BAD,
            s.log(NOWHERE): BAD + 1,
        }
        assert all(row["error"] and row["stream_seq"] for row in rows)
        assert set(PAYLOADS.values()) < {
            bytes(row["payload"]) for row in by_subject[s.log(NOWHERE)]
        }
        assert "over 262144 bytes" in by_subject[s.log(NOWHERE)][-1]["error"]
        # …and the scheduler's and runner's are log lines naming subject, place and error.
        sched_log, runner_log = stack.logs("scheduler"), stack.logs("runner-1")
        for subject in (s.submit, s.report("runner-1")):
            lines = rejected_lines(sched_log, subject)
            assert len(lines) == BAD and all(x["stream_seq"] and x["error"] for x in lines)
        for subject in (s.claim, s.control_cancel):
            assert len(rejected_lines(sched_log, subject)) == BAD
        for subject in (s.runners_bucket, s.sched_bucket):
            assert len({x["key"] for x in rejected_lines(sched_log, subject)}) == BAD
        dispatch_lines = rejected_lines(runner_log, s.dispatch("amd64", "script"))
        assert len(dispatch_lines) == BAD and all(x["stream_seq"] for x in dispatch_lines)
        assert len(rejected_lines(runner_log, s.cancel(sleeper))) == BAD

        # The services are all still up, ready, and nothing real was lost.
        for name in ("gateway", "scheduler", "runner-1"):
            assert stack.procs[name].poll() is None, f"{name} exited"
        assert (await http.get("/readyz")).status_code == 200
        figures = await check_nothing_lost(settings, [*good, sleeper], trace)
    finally:
        await http.aclose()
        await conn.close()
        await nc.close()
    figures.update(
        {
            "fault": "junk on every subject and KV bucket the services read",
            # Each counted once, except events: two readers count each one.
            "faults_injected": int(sum(expected.values())) - BAD,
            "subjects_and_buckets": len(expected),
            "payload_kinds": sorted(PAYLOADS),
            "rejected_counted": {f"{k[0]} {k[1]}": v for k, v in sorted(expected.items())},
        }
    )
    record_figures("bad_messages", figures)
