"""Per-role NATS users against a real nats-server running the generated config: what each
role may and may not do, and the whole stack running with every service on its own user."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy, StreamInfo
from nats.js.errors import Error as JetStreamError

from services.common import bus, nats_auth
from services.common.config import EXAMPLE_MODULES_DIR, Settings
from services.common.crypto import generate_sealing_pair, generate_state_key
from services.common.embedded import EmbeddedNats, free_port
from services.common.subjects import Subjects
from services.gateway import db, store_reset
from tests.stack import Stack
from tests.support import admin_token, auth_headers, eventually, stored_as_if_ingested

ORGS = ["acme", "globex"]


@dataclass
class AuthNats:
    server: EmbeddedNats
    passwords: dict[str, str]
    subjects: Subjects

    def url(self, user: str) -> str:
        return nats_auth.user_url(self.server.url, user, self.passwords[user])

    def settings(self, user: str, **extra: object) -> Settings:
        return Settings(nats_url=self.url(user), subjects=self.subjects, **extra)  # type: ignore[arg-type]


@pytest.fixture
def auth_nats(tmp_path: Path) -> Iterator[AuthNats]:
    subjects = Subjects()
    passwords = nats_auth.load_or_create_passwords(
        tmp_path / "nats-users.json", nats_auth.users_for(ORGS)
    )
    config = tmp_path / "nats.conf"
    nats_auth.write_server_config(config, nats_auth.server_config(subjects, passwords))
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats.log", config_file=config)
    server.start()
    auth = AuthNats(server, passwords, subjects)
    asyncio.run(
        nats_auth.ensure_subscriber_stream(
            auth.url(nats_auth.SUBSCRIBERS_ADMIN), Settings(subjects=subjects)
        )
    )
    try:
        yield auth
    finally:
        server.stop()


class Errors:
    """The asynchronous errors (permission violations) the server sends a client."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Exception] = asyncio.Queue()

    async def cb(self, exc: Exception) -> None:
        await self.queue.put(exc)

    async def expect(self, text: str, timeout: float = 5.0) -> str:
        """The next error naming `text`, lower-cased."""
        while True:
            exc = await asyncio.wait_for(self.queue.get(), timeout)
            if text.lower() in str(exc).lower():
                return str(exc).lower()  # nats-py lower-cases the server's message


async def _client(auth: AuthNats, user: str, errors: Errors | None = None) -> Client:
    """A plain client on the user's own inbox prefix, as bus.connect gives the services."""
    sink = errors or Errors()
    return await nats.connect(
        auth.url(user),
        allow_reconnect=False,
        error_cb=sink.cb,
        inbox_prefix=nats_auth.inbox_prefix(user),
    )


@pytest.fixture
async def scheduler_nc(auth_nats: AuthNats) -> AsyncIterator[Client]:
    """The scheduler's connection, once the streams are made (by the gateway, the only
    role that may make them all)."""
    gateway = await _client(auth_nats, "gateway")
    try:
        await bus.ensure_streams(gateway.jetstream(), auth_nats.settings("gateway"))
    finally:
        await gateway.close()
    nc = await _client(auth_nats, "scheduler")
    yield nc
    await nc.close()


async def _publish_events(nc: Client, subjects: Subjects) -> list[int]:
    """Two acme and one globex event; returns the acme events' stream sequences."""
    js = nc.jetstream()
    seqs = []
    for org, build in (("acme", 1), ("globex", 2), ("acme", 3)):
        body = json.dumps({"organization": org, "build_id": build}).encode()
        ack = await js.publish(subjects.event(org, "stg", build), body)
        if org == "acme":
            seqs.append(ack.seq)
    return seqs


async def test_subscriber_reads_its_organization_live_and_from_a_sequence(
    auth_nats: AuthNats, scheduler_nc: Client
) -> None:
    s = auth_nats.subjects
    sub = await _client(auth_nats, "sub-acme")
    try:
        live = await sub.subscribe(s.events_filter("acme"))
        await sub.flush()
        acme_seqs = await _publish_events(scheduler_nc, s)
        got = [(await live.next_msg(timeout=5)).subject for _ in range(2)]
        assert got == [s.event("acme", "stg", 1), s.event("acme", "stg", 3)]

        # Its copy of the stream numbers events as the services' stream does (once the
        # copy, sourced in the background, has them: live delivery may come first).
        async def copied() -> StreamInfo | None:
            info = await sub.jetstream().stream_info(s.events_stream)
            return info if info.state.last_seq >= 3 else None

        info = await eventually(copied, timeout=10)
        assert (info.state.first_seq, info.state.last_seq) == (1, 3)

        # Resume from the second acme event's sequence with an ordered consumer.
        config = ConsumerConfig(
            name=nats_auth.consumer_names("acme")[0],
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=acme_seqs[1],
        )
        ordered = await sub.jetstream().subscribe(
            s.events_filter("acme"), stream=s.events_stream, ordered_consumer=True, config=config
        )
        msg = await ordered.next_msg(timeout=5)
        assert msg.subject == s.event("acme", "stg", 3)
        assert msg.metadata.sequence.stream == acme_seqs[1]
    finally:
        await sub.close()


async def test_subscriber_is_refused_other_organizations_and_publishing(
    auth_nats: AuthNats, scheduler_nc: Client
) -> None:
    s = auth_nats.subjects
    errors = Errors()
    sub = await _client(auth_nats, "sub-acme", errors)
    try:
        await sub.subscribe(s.events_filter("globex"))
        assert "subscription" in await errors.expect("permissions violation")

        await sub.publish(s.event("acme", "stg", 99), b"{}")
        assert s.event("acme", "stg", 99).lower() in await errors.expect("publish")

        await sub.publish(s.submit, b"{}")
        assert s.submit.lower() in await errors.expect("publish")

        # A consumer filtered to another organization (named form) is refused...
        name = nats_auth.consumer_names("acme")[0]
        config = ConsumerConfig(name=name, filter_subject=s.events_filter("globex"))
        with pytest.raises((asyncio.TimeoutError, nats.errors.TimeoutError)):
            await sub.jetstream().add_consumer(s.events_stream, config, timeout=1)
        # ...and so is the unnamed form, whose filter only the body would carry.
        with pytest.raises((asyncio.TimeoutError, nats.errors.TimeoutError)):
            await sub.jetstream().add_consumer(
                s.events_stream, ConsumerConfig(filter_subject=s.events_filter("acme")), timeout=1
            )
        # A body whose filter differs from the allowed subject is refused by the server.
        subject = f"$JS.API.CONSUMER.CREATE.{s.events_stream}.{name}.{s.events_filter('acme')}"
        body = {"stream_name": s.events_stream, "config": {"name": name}}
        body["config"]["filter_subject"] = s.events_filter("globex")  # type: ignore[index]
        reply = json.loads((await sub.request(subject, json.dumps(body).encode(), 2)).data)
        assert reply["error"]["err_code"] == 10131
    finally:
        await sub.close()


async def test_subscriber_deliver_subject_cannot_reach_the_services(
    auth_nats: AuthNats, scheduler_nc: Client
) -> None:
    """The server does not check a push consumer's deliver subject against permissions:
    the subscribers' own account is what keeps such deliveries away from the services."""
    s = auth_nats.subjects
    await _publish_events(scheduler_nc, s)
    sub = await _client(auth_nats, "sub-acme")
    watcher = await scheduler_nc.subscribe(s.submit)
    await scheduler_nc.flush()
    try:
        name = nats_auth.consumer_names("acme")[1]
        subject = f"$JS.API.CONSUMER.CREATE.{s.events_stream}.{name}.{s.events_filter('acme')}"
        config = {"name": name, "filter_subject": s.events_filter("acme")}
        config.update(deliver_subject=s.submit, ack_policy="none")
        body = {"stream_name": s.events_stream, "config": config}
        reply = json.loads((await sub.request(subject, json.dumps(body).encode(), 2)).data)
        assert reply.get("error") is None and reply["num_pending"] == 2
        # Deliveries went to `xoogify.submit` of the subscribers' account only.
        with pytest.raises(nats.errors.TimeoutError):
            await watcher.next_msg(timeout=1)
        info = await scheduler_nc.jetstream().stream_info(s.submit_stream)
        assert info.state.messages == 0
    finally:
        await sub.close()


async def test_runner_may_not_publish_events_nor_read_the_events_stream(
    auth_nats: AuthNats, scheduler_nc: Client
) -> None:
    s = auth_nats.subjects
    errors = Errors()
    runner = await _client(auth_nats, "runner", errors)
    try:
        await runner.publish(s.event("acme", "stg", 1), b"{}")
        assert s.event("acme", "stg", 1).lower() in await errors.expect("publish")
        js = runner.jetstream()
        with pytest.raises((asyncio.TimeoutError, nats.errors.TimeoutError)):
            await js.add_consumer(
                s.events_stream, ConsumerConfig(filter_subject=s.events_filter()), timeout=1
            )
        assert f"consumer.create.{s.events_stream}".lower() in await errors.expect("publish")
        with pytest.raises((asyncio.TimeoutError, nats.errors.TimeoutError, JetStreamError)):
            await js.get_msg(s.submit_stream, 1)
        # Nor make a stream numbered by Postgres (only the gateway does, after its check).
        events = next(
            c for c in bus.stream_configs(auth_nats.settings("runner")) if c.name == s.events_stream
        )
        with pytest.raises((asyncio.TimeoutError, nats.errors.TimeoutError)):
            await asyncio.wait_for(js.add_stream(events), 1)
        await errors.expect(f'publish to "$js.api.stream.create.{s.events_stream}"')
        # What a runner needs still works: its log stream.
        ack = await js.publish(s.log(1), b"{}")
        assert ack.stream == s.logs_stream
    finally:
        await runner.close()


async def test_stack_runs_a_job_with_every_service_on_its_own_user(
    auth_nats: AuthNats, database_url: str, tmp_path: Path
) -> None:
    gateway = f"http://127.0.0.1:{free_port()}"
    private_key, public_key = generate_sealing_pair()
    settings = auth_nats.settings(
        "gateway",
        database_url=database_url,
        gateway_url=gateway,
        modules_dir=EXAMPLE_MODULES_DIR,
        heartbeat_s=1.0,
        cancel_grace_s=2.0,
        state_secret=uuid.uuid4().hex,
        secrets_public_key=public_key,
        secrets_private_key=private_key,
        state_key=generate_state_key(),
        token=await admin_token(database_url),
    )
    stack = Stack(settings, tmp_path / "logs")
    try:
        await stack.start_gateway()
        await stack.start_scheduler(XOOGIFY_NATS_URL=auth_nats.url("scheduler"))
        await stack.start_runner("runner-1", XOOGIFY_NATS_URL=auth_nats.url("runner"))
        job = {
            "organization": "acme",
            "environment": "stg",
            "module_type": "amd64/script",
            "module_name": "hello",
            "action": "PLAN",
            # Sealed on the gateway's own permissions (it reads the submit stream's info).
            "variables": {"pw": "s3cret"},
            "sensitive": ["pw"],
        }
        # The organization's subscriber sees the job through to its end.
        sub = await _client(auth_nats, "sub-acme")
        events = await sub.subscribe(auth_nats.subjects.events_filter("acme"))
        await sub.flush()
        try:
            async with httpx.AsyncClient(base_url=gateway, headers=auth_headers(settings)) as http:
                r = await http.post("/api/jobs", json=job)
                assert r.status_code == 202, r.text
                build_id = r.json()["build_id"]
                status = None
                while status not in ("SUCCESS", "FAILURE"):
                    event = json.loads((await events.next_msg(timeout=30)).data)
                    status = event["status"] if event["build_id"] == build_id else None
                assert status == "SUCCESS", stack.logs("runner-1")

                async def stored_log() -> str | None:
                    r = await http.get(f"/api/jobs/{build_id}/logs")
                    return (
                        r.json()["data"] if r.status_code == 200 and r.json()["complete"] else None
                    )

                assert "hello" in (await eventually(stored_log)).lower()
        finally:
            await sub.close()
        violations = (tmp_path / "nats.log").read_text()
        assert "Violation" not in violations, violations[-3000:]
    finally:
        await stack.stop_all()


async def test_gateway_may_number_on_after_a_lost_store(
    auth_nats: AuthNats, database_url: str
) -> None:
    """What `store_reset.repair` needs of NATS, on the gateway's own user: the streams'
    info, purging them forward, and the scheduler bucket's info (missing here)."""
    await admin_token(database_url)  # migrates
    await stored_as_if_ingested(database_url, 5, "WORKING", 2, {"events": 7, "logs": 3})
    errors = Errors()
    gateway = await _client(auth_nats, "gateway", errors)
    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    try:
        settings = auth_nats.settings("gateway", database_url=database_url)
        js = gateway.jetstream()
        await bus.ensure_streams(js, settings)
        s = auth_nats.subjects
        done = await store_reset.repair(pool, js, settings)
        assert done.reset == [s.submit_stream, s.events_stream, s.logs_stream]
        assert done.ended == [5]
        for stream, first in ((s.submit_stream, 6), (s.events_stream, 8), (s.logs_stream, 4)):
            assert (await js.stream_info(stream)).state.first_seq == first
        assert errors.queue.empty(), errors.queue.get_nowait()
        # The subscribers' copy numbers on from the same point (as `xoogify up` and
        # `xoogify nats-config subscriber-stream` do it, from the stored watermark),
        # so a subscriber's sequences are still the services' (and the watermark's).
        admin = auth_nats.url(nats_auth.SUBSCRIBERS_ADMIN)
        assert await store_reset.align_subscribers(admin, settings, database_url)
        assert not await store_reset.align_subscribers(admin, settings, database_url)
        scheduler = await _client(auth_nats, "scheduler")
        sub = await _client(auth_nats, "sub-acme")
        try:
            ack = await scheduler.jetstream().publish(s.event("acme", "stg", 6), b"{}")
            assert ack.seq == 8

            async def copied() -> tuple[int, int] | None:
                state = (await sub.jetstream().stream_info(s.events_stream)).state
                return (state.first_seq, state.last_seq) if state.messages else None

            assert await eventually(copied, timeout=10) == (8, 8)
        finally:
            await sub.close()
            await scheduler.close()
    finally:
        await pool.close()
        await gateway.close()


async def test_subscriber_stream_command_numbers_on_from_the_stored_watermark(
    auth_nats: AuthNats, database_url: str
) -> None:
    """`xoogify subscriber-stream` with the database (as compose.yaml runs it) after a
    lost store: the copy's next sequence is the one after the stored watermark."""
    await admin_token(database_url)  # migrates
    await stored_as_if_ingested(database_url, 5, "SUCCESS", 3, {"events": 7})
    env = {
        **os.environ,
        "XOOGIFY_NATS_URL": auth_nats.url(nats_auth.SUBSCRIBERS_ADMIN),
        "XOOGIFY_DATABASE_URL": database_url,
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "services.cli.main", "subscriber-stream"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "numbering goes on" in done.stdout
    sub = await _client(auth_nats, "sub-acme")
    try:
        state = (await sub.jetstream().stream_info(auth_nats.subjects.events_stream)).state
        assert (state.first_seq, state.messages) == (8, 0)
    finally:
        await sub.close()
