"""The runner over real NATS, the test playing the scheduler: it publishes dispatch
messages, answers claims on `xoogify.claim`, and watches logs and reports.

The runner runs in-process (RunnerService), so a test can stop it without signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import REGISTRY

from services.common import bus, codec, crypto, schemas
from services.common.config import EXAMPLE_MODULES_DIR, Settings
from services.runner.service import RunnerService

TIMEOUT = 15.0


@dataclass
class FakeScheduler:
    """Plays the scheduler's side of the runner's messages, recording all it sees in the
    order NATS delivered it (one wildcard subscription, so log chunks and reports of one
    publisher keep their order)."""

    settings: Settings
    nc: Client
    js: JetStreamContext
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    claims: list[dict[str, Any]] = field(default_factory=list)
    # build_id → answer; a build not listed is granted.
    refuse: set[int] = field(default_factory=set)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _claim_sub: Any = None

    async def start(self, answer_claims: bool = True) -> None:
        await bus.ensure_streams(self.js, self.settings)
        # `<prefix>.*.>` misses `<prefix>.claim`, so no one answers a claim by accident.
        await self.nc.subscribe(f"{self.settings.subjects.prefix}.*.>", cb=self._record)
        if answer_claims:
            await self.answer_claims()
        await self.nc.flush()

    async def answer_claims(self) -> None:
        self._claim_sub = await self.nc.subscribe(self.settings.subjects.claim, cb=self._claim)
        await self.nc.flush()

    async def _record(self, msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            self.seen.append((msg.subject, codec.loads(msg.data)))
            self._changed.set()

    async def _claim(self, msg: Msg) -> None:
        claim = schemas.decode("claim", msg.data)
        self.claims.append(claim)
        granted = claim["build_id"] not in self.refuse
        reply = {"granted": granted, "reason": None if granted else "taken"}
        await msg.respond(codec.dumps(schemas.check("claim_reply", reply)))
        self._changed.set()

    async def dispatch(self, build_id: int, module: str, **fields: Any) -> dict[str, Any]:
        message: dict[str, Any] = {
            "build_id": build_id,
            "organization": fields.pop("organization", "acme"),
            "environment": "stg",
            "module_type": "amd64/script",
            "module_name": module,
            "action": "APPLY-AUTO",
            "variables": {},
            "sensitive": [],
            "timeout_s": 600,
            "attempt": 1,
        }
        message.update(fields)
        schemas.check("dispatch", message)
        subject = self.settings.subjects.dispatch("amd64", "script")
        await self.js.publish(subject, codec.dumps(message))
        return message

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
        """Wait until `predicate()` is truthy (checked whenever a message arrives)."""
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                result = predicate()
                if result:
                    return result
                await self._changed.wait()

    def chunks(self, build_id: int) -> list[dict[str, Any]]:
        subject = self.settings.subjects.log(build_id)
        return [payload for subj, payload in self.seen if subj == subject]

    def reports(self, build_id: int) -> list[dict[str, Any]]:
        prefix = self.settings.subjects.reports_all[:-1]
        return [p for s, p in self.seen if s.startswith(prefix) and p["build_id"] == build_id]

    async def report(self, build_id: int, timeout: float = TIMEOUT) -> dict[str, Any]:
        reports = await self.wait_for(lambda: self.reports(build_id), timeout)
        return dict(reports[0])

    def log_text(self, build_id: int) -> str:
        return "".join(c["data"] for c in self.chunks(build_id))


def check_log(chunks: list[dict[str, Any]]) -> str:
    """Offsets contiguous and increasing, exactly one eof and it is last; the text."""
    offset = 0
    for i, chunk in enumerate(chunks):
        schemas.check("log_chunk", chunk)
        assert chunk["offset"] == offset, (i, chunk["offset"], offset)
        assert chunk["eof"] == (i == len(chunks) - 1)
        offset += len(chunk["data"].encode())
    return "".join(c["data"] for c in chunks)


def eof_before_report(sched: FakeScheduler, build_id: int) -> bool:
    order = [
        "eof" if payload.get("eof") else "report" if "type" in payload else "chunk"
        for subj, payload in sched.seen
        if payload.get("build_id") == build_id
    ]
    return order.index("eof") < order.index("report")


def job_pids(marker: str) -> list[int]:
    """Live processes whose environment carries `marker` (the test's unique organization)."""
    pids = []
    needle = f"XOOGIFY_ORGANIZATION={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{entry}/environ").read_bytes()
            if needle in env.split(b"\0"):
                pids.append(int(entry))
    return pids


async def poll(check: Callable[[], Any], timeout: float = TIMEOUT) -> None:
    """Wait until the async `check()` holds (for state that sends no message to wait on)."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - there is no event to wait on
            await asyncio.sleep(0.05)


def unique_org() -> str:
    return f"org-{uuid.uuid4().hex[:10]}"


@pytest.fixture(autouse=True)
def runner_logs_on(caplog: pytest.LogCaptureFixture) -> None:
    """Every log call of the runner is formatted (a bad `extra` key fails the test)."""
    caplog.set_level(logging.DEBUG, logger="services")


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    """The example modules plus a few written for these tests."""
    target = tmp_path / "modules"
    shutil.copytree(EXAMPLE_MODULES_DIR, target)

    def module(name: str, script: str) -> None:
        folder = target / name
        folder.mkdir()
        (folder / "module.toml").write_text(
            '[script]\nPLAN = "sh ./run.sh"\nAPPLY-AUTO = "sh ./run.sh"\nDESTROY = "sh ./run.sh"\n'
        )
        (folder / "run.sh").write_text(script)

    # Prints the secret in two writes 300 ms apart: the ticker flushes in between.
    module(
        "leak",
        'pw="$XOOGIFY_VAR_password"\n'
        'printf "password=%s" "$(printf %s "$pw" | cut -c1-4)"\n'
        "sleep 0.3\n"
        'printf "%s and again %s\\n" "$(printf %s "$pw" | cut -c5-)" "$pw"\n',
    )
    # Ignores SIGINT, so stopping it needs SIGKILL.
    module("stubborn", "trap '' INT\necho stubborn started\nwhile :; do sleep 0.1; done\n")
    # About 200 KB of output at once, then a last line.
    module(
        "chatty",
        "i=0\nwhile [ $i -lt 4000 ]; do\n"
        '  echo "line $i ééé 😀 padding padding"; i=$((i+1))\n'
        "done\necho chatty done\n",
    )
    # Prints what reached it from the environment.
    module("envdump", "env | sort\n")
    # Prints where it runs.
    module("where", "pwd -P\n")
    return target


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    client = await nats.connect(settings.nats_url)
    try:
        yield client
    finally:
        await client.drain()


@pytest.fixture
async def sched(settings: Settings, nc: Client) -> FakeScheduler:
    scheduler = FakeScheduler(settings, nc, nc.jetstream())
    await scheduler.start()
    return scheduler


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    runner_id: str = "runner-t",
    drain_timeout_s: float = 5.0,
    work_root: Path | None = None,
) -> AsyncIterator[RunnerService]:
    service = RunnerService(
        settings, "x86_64", ["script"], {"pool": "test"}, runner_id, drain_timeout_s, work_root
    )
    task = asyncio.create_task(service.serve())
    try:
        async with asyncio.timeout(TIMEOUT):
            ready = asyncio.create_task(service.ready.wait())
            await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raises why it could not start
        yield service
    finally:
        service.stop()
        async with asyncio.timeout(TIMEOUT):
            await task


@pytest.fixture
def rsettings(settings: Settings, modules_dir: Path) -> Settings:
    return replace(settings, modules_dir=modules_dir)


async def test_hello_streams_contiguous_chunks_then_eof_then_reports_exit_0(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    async with running(rsettings):
        await sched.dispatch(1, "hello")
        report = await sched.report(1)
    assert report["type"] == "finished"
    assert (report["exit_code"], report.get("reason")) == (0, None)
    assert report["runner_id"] == "runner-t"
    schemas.check("report", report)
    [claimed] = sched.claims
    # Plus the registration's start, which tells this process from a restart.
    assert claimed.pop("runner_started_at")
    assert claimed == {"build_id": 1, "runner_id": "runner-t", "attempt": 1}
    chunks = sched.chunks(1)
    assert len(chunks) > 2  # streamed while it ran (about two seconds), not at the end
    text = check_log(chunks)
    lines = text.splitlines()
    assert lines[0] == "hello: apply of acme/stg (build 1)"
    assert [x for x in lines if x.startswith("hello: step")] == [
        f"hello: step {i} of 10" for i in range(1, 11)
    ]
    assert lines[-1] == "hello: apply done"
    assert eof_before_report(sched, 1)


async def test_broken_reports_exit_code_3(rsettings: Settings, sched: FakeScheduler) -> None:
    async with running(rsettings):
        await sched.dispatch(2, "broken")
        report = await sched.report(2)
    assert report["exit_code"] == 3 and report.get("reason") is None
    text = check_log(sched.chunks(2))
    assert "Error: broken module failed on purpose" in text  # stderr is in the log too


async def test_unknown_module_reports_invalid_module(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    async with running(rsettings):
        await sched.dispatch(3, "no-such-module")
        report = await sched.report(3)
    assert report["reason"] == "invalid-module" and report["exit_code"] is None
    text = check_log(sched.chunks(3))
    assert "[xoogify] invalid module: module 'no-such-module' not found" in text
    assert eof_before_report(sched, 3)


async def test_refused_claim_does_not_start_the_job(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    sched.refuse.add(4)
    async with running(rsettings):
        await sched.dispatch(4, "hello")
        await sched.wait_for(lambda: any(c["build_id"] == 4 for c in sched.claims))
        # The runner does one job at a time, in order: once the next job is reported,
        # the refused one had its chance to (wrongly) run.
        await sched.dispatch(5, "broken")
        await sched.report(5)
    assert sched.chunks(4) == [] and sched.reports(4) == []
    # The refused message was acked: nothing is left in the work queue.
    info = await sched.js.stream_info(rsettings.subjects.dispatch_stream)
    assert info.state.messages == 0


async def test_work_dirs_are_made_in_the_work_root_and_removed_after_the_job(
    rsettings: Settings, sched: FakeScheduler, tmp_path: Path
) -> None:
    root = tmp_path / "work"
    root.mkdir()
    sched.refuse.add(21)
    async with running(rsettings, work_root=root):
        # Refused: never started, so no work dir either.
        await sched.dispatch(21, "where")
        await sched.wait_for(lambda: any(c["build_id"] == 21 for c in sched.claims))
        await sched.dispatch(22, "where")
        report = await sched.report(22)
        assert report["exit_code"] == 0
    # The runner waits for its removals before it stops.
    assert list(root.iterdir()) == []
    cwd = Path(check_log(sched.chunks(22)).strip())
    assert cwd.parent == root.resolve() and cwd.name.startswith("xoogify-22-")
    assert sched.chunks(21) == []


async def test_unanswered_claim_is_asked_again_and_run_once_answered(
    rsettings: Settings, nc: Client
) -> None:
    sched = FakeScheduler(rsettings, nc, nc.jetstream())
    await sched.start(answer_claims=False)

    def unanswered() -> float:
        return REGISTRY.get_sample_value("xoogify_runner_claims_total", {"answer": "none"}) or 0.0

    before = unanswered()
    async with running(rsettings):
        await sched.dispatch(6, "broken")
        consumer = rsettings.subjects.dispatch_consumer("amd64", "script")
        stream = rsettings.subjects.dispatch_stream

        async def asked_twice() -> bool:
            return unanswered() >= before + 2

        # Nobody answers the claim: the runner asks again, holding the message (a grant
        # that was recorded but not heard must come back to this runner), and meanwhile
        # nothing runs.
        await poll(asked_twice)
        info = await sched.js.consumer_info(stream, consumer)
        assert (info.delivered.consumer_seq, info.num_ack_pending) == (1, 1)
        assert sched.chunks(6) == [] and sched.reports(6) == []
        await sched.answer_claims()
        report = await sched.report(6)
    assert report["exit_code"] == 3
    assert len(sched.claims) == 1  # the claim that was answered


async def test_bad_dispatch_message_is_dropped_and_the_runner_goes_on(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    async with running(rsettings):
        subject = rsettings.subjects.dispatch("amd64", "script")
        await sched.js.publish(subject, b'{"build_id": "not a number"}')
        await sched.js.publish(subject, b"not json at all")
        await sched.dispatch(7, "broken")
        report = await sched.report(7)
    assert report["exit_code"] == 3
    [claimed] = sched.claims
    # Plus the registration's start, which tells this process from a restart.
    assert claimed.pop("runner_started_at")
    assert claimed == {"build_id": 7, "runner_id": "runner-t", "attempt": 1}
    info = await sched.js.stream_info(rsettings.subjects.dispatch_stream)
    assert info.state.messages == 0  # terminated, not left to block the queue


async def test_cancel_of_slow_stops_the_process_and_reports_cancelled(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    org = unique_org()
    async with running(rsettings):
        await sched.dispatch(8, "slow", organization=org, variables={"seconds": "30"})
        await sched.wait_for(lambda: "slow: second 1" in sched.log_text(8))
        assert job_pids(org), "the job's processes should be running"
        cancel = {"build_id": 8, "reason": "cancelled", "requested_by": "alice"}
        await sched.nc.publish(rsettings.subjects.cancel(8), codec.dumps(cancel))
        report = await sched.report(8)
        assert report["reason"] == "cancelled" and report["exit_code"] is None
        assert job_pids(org) == []  # sh and its sleep: the whole group is gone
    text = check_log(sched.chunks(8))
    assert "[xoogify] cancelled by alice: stopping the process" in text
    assert "slow: done" not in text
    assert eof_before_report(sched, 8)


async def test_cancel_escalates_to_sigkill_after_the_grace(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    org = unique_org()
    async with running(replace(rsettings, cancel_grace_s=0.5)):
        await sched.dispatch(9, "stubborn", organization=org)
        await sched.wait_for(lambda: "stubborn started" in sched.log_text(9))
        cancel = {"build_id": 9, "reason": "timeout"}
        await sched.nc.publish(rsettings.subjects.cancel(9), codec.dumps(cancel))
        report = await sched.report(9)
        assert job_pids(org) == []
    assert report["reason"] == "timeout"
    assert "[xoogify] the process did not stop in time; killed" in check_log(sched.chunks(9))


async def test_local_timeout_stops_the_job(rsettings: Settings, sched: FakeScheduler) -> None:
    org = unique_org()
    async with running(rsettings):
        await sched.dispatch(10, "slow", organization=org, timeout_s=1)
        report = await sched.report(10)
        assert job_pids(org) == []
    assert report["reason"] == "timeout"
    assert "[xoogify] timeout of 1s reached: stopping the process" in check_log(sched.chunks(10))


async def test_sensitive_value_never_appears_in_any_chunk(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    secret = "S3cr3t-V4lue"
    # As the scheduler passes it on: the value sealed by the gateway for build 11.
    identity = {"organization": "acme", "environment": "stg", "module_name": "leak"}
    binding = crypto.Binding.of(
        11, {**identity, "module_type": "amd64/script", "action": "APPLY-AUTO"}
    )
    sealed = crypto.Sealer(rsettings.secrets_public_key).seal({"password": secret}, binding)
    async with running(rsettings):
        await sched.dispatch(
            11,
            "leak",
            variables={"password": "***", "user": "bob"},
            sensitive=["password"],
            secrets=sealed,
        )
        report = await sched.report(11)
    assert report["exit_code"] == 0
    chunks = sched.chunks(11)
    assert all(secret not in c["data"] and "S3cr" not in c["data"] for c in chunks)
    assert check_log(chunks) == "password=*** and again ***\n"


async def test_chatty_output_is_cut_into_32_kib_chunks(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    async with running(rsettings):
        await sched.dispatch(12, "chatty")
        report = await sched.report(12)
    assert report["exit_code"] == 0
    chunks = sched.chunks(12)
    text = check_log(chunks)
    assert all(len(c["data"].encode()) <= 32 * 1024 for c in chunks)
    expected = "".join(f"line {i} ééé 😀 padding padding\n" for i in range(4000))
    assert text == expected + "chatty done\n"


async def test_log_cap_truncates_and_the_job_goes_on(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    async with running(replace(rsettings, log_cap_bytes=1000)):
        await sched.dispatch(13, "chatty")
        report = await sched.report(13)
    assert report["exit_code"] == 0  # the process ran to its end
    text = check_log(sched.chunks(13))
    head, notice = text.rsplit("\n[xoogify] ", 1)
    assert len(head.encode()) == 1000 - 1 or len(head.encode()) == 1000
    assert notice == "log truncated at 1000 bytes; the job goes on\n"
    assert "chatty done" not in text


async def test_child_environment_has_no_runner_settings(
    rsettings: Settings, sched: FakeScheduler
) -> None:
    async with running(rsettings):
        await sched.dispatch(14, "envdump", variables={"region": "eu"})
        await sched.report(14)
    names = {line.split("=", 1)[0] for line in sched.log_text(14).splitlines() if "=" in line}
    assert {"XOOGIFY_BUILD_ID", "XOOGIFY_VAR_region", "XOOGIFY_ACTION"} <= names
    assert not [
        n
        for n in names
        if n.startswith("XOOGIFY_")
        and n
        not in {
            "XOOGIFY_BUILD_ID",
            "XOOGIFY_ORGANIZATION",
            "XOOGIFY_ENVIRONMENT",
            "XOOGIFY_ACTION",
            "XOOGIFY_VAR_region",
        }
    ]
    assert rsettings.nats_url not in sched.log_text(14)
