"""The work loop: one job at a time. Pull a dispatch message, validate it, claim the job
from the scheduler, run it, report. Never starts a job without a granted claim.

Stopping (drain): the loop stops pulling at once; a running job may finish until the
drain deadline, then it is cancelled like any other.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import Error as NatsError
from nats.js import JetStreamContext

from services.common import codec, pull, schemas
from services.common.config import Settings
from services.common.jspub import JsPublisher
from services.common.metrics import reject, stream_seq_of
from services.common.schemas import SchemaError
from services.common.status import Reason
from services.common.timefmt import now_iso
from services.runner import counters, dispatch
from services.runner.control import StopRequest
from services.runner.execution import execute
from services.runner.job import Job, Outcome
from services.runner.publish import publish_until_acked
from services.runner.registry import Registry
from services.runner.workdir import WorkDir

log = logging.getLogger(__name__)

FETCH_TIMEOUT_S = 0.5
CLAIM_TIMEOUT_S = 5.0
# A claim nobody answered is asked again after this long.
CLAIM_RETRY_S = 1.0
# How many granted jobs a runner remembers (one at a time: far more than can be in doubt).
GRANTED_KEPT = 1000


class Worker:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        pub: JsPublisher,
        settings: Settings,
        registry: Registry,
        drain_timeout_s: float,
        work_root: Path | None = None,
    ) -> None:
        self._nc = nc
        self._js = js
        self._pub = pub
        self._settings = settings
        self._registry = registry
        self._drain_timeout_s = drain_timeout_s
        self._work_root = work_root
        # Work dirs being removed after their job (waited for before `run` returns).
        self._removals: set[asyncio.Task[None]] = set()
        self.runner_id = registry.runner_id
        self._stopping = asyncio.Event()
        self._current: StopRequest | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._deadline_passed = False
        # (build_id, attempt) of the jobs this process was granted, newest last: a copy of
        # one of their dispatch messages (an ack lost in a NATS failover) is dropped, never
        # claimed, because the scheduler grants the same runner process its job again.
        self._granted: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._drain_why = ""
        self.jobs_run = 0
        # (stream, consumer) of each kind's dispatch consumer.
        self._consumers: list[tuple[str, str]] = []
        # The stop request of the job being claimed or run, by build_id: what a cancel
        # message for it reaches. One subscription to every job's cancel subject, for the
        # runner's life, rather than one per job (a subscription, its task and an
        # unsubscribe per job); cancels are rare, those of other jobs are ignored.
        self._stops: dict[int, StopRequest] = {}
        self._cancel_sub: Subscription | None = None

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def request_stop(self) -> None:
        """Drain: take no more work; the running job gets until the drain deadline. Asked
        again, the deadline is now."""
        if self._stopping.is_set():
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            self._drain_deadline("runner shutting down (stop asked twice)")
            return
        self._stopping.set()
        self._drain_timer = asyncio.get_running_loop().call_later(
            self._drain_timeout_s, self._drain_deadline
        )

    def written_off(self, why: str) -> None:
        """The registry key expired while this runner was silent: stop the running job
        (the scheduler already failed it, or will on this report, as runner-lost)."""
        if self._current is not None:
            self._current.stop(Reason.RUNNER_LOST, why)

    def _drain_deadline(self, why: str | None = None) -> None:
        self._deadline_passed = True
        self._drain_why = why or (
            f"runner shutting down (drain deadline of {self._drain_timeout_s:g}s)"
        )
        if self._current is not None:
            self._current.stop(Reason.CANCELLED, self._drain_why)

    async def subscribe(self) -> None:
        """Listen for cancels; bind to (creating if missing) the dispatch consumer of each
        kind."""
        if self._cancel_sub is None:  # retried at start-up until the consumers exist
            self._cancel_sub = await self._nc.subscribe(
                self._settings.subjects.cancel_all, cb=self._on_cancel
            )
        await self._ensure_consumers()

    async def _ensure_consumers(self) -> None:
        self._consumers = await dispatch.ensure_consumers(
            self._js, self._settings, self._registry.arch, list(self._registry.kinds)
        )

    async def run(self) -> None:
        if not self._consumers:
            await self.subscribe()
        puller = dispatch.Puller(self._nc, self._consumers, FETCH_TIMEOUT_S)
        try:
            while not self.stopping:
                try:
                    msgs = await puller.next()
                except (NatsError, TimeoutError, pull.ConsumerGone) as exc:
                    log.warning("fetch failed", extra={"error": repr(exc)})
                    await asyncio.sleep(FETCH_TIMEOUT_S)  # backoff while NATS is away
                    if isinstance(exc, pull.ConsumerGone):
                        # Deleted (or lost with the NATS store): made again, same name.
                        await _quietly(self._ensure_consumers(), "make dispatch consumers")
                    continue
                for msg in msgs:
                    try:
                        await self._handle(msg)
                    except (NatsError, TimeoutError) as exc:
                        # NATS went away mid-way; an unacked message comes back later.
                        log.warning("dispatch handling failed", extra={"error": repr(exc)})
                    except Exception:
                        # A bug around one message must not take the runner down; the
                        # job itself reports `internal` from inside `execute`.
                        log.exception("dispatch handling crashed")
        finally:
            if self._drain_timer is not None:
                self._drain_timer.cancel()
            await puller.close()
            if self._cancel_sub is not None:
                await _quietly(self._cancel_sub.unsubscribe(), "unsubscribe")
            if self._removals:
                await asyncio.gather(*self._removals, return_exceptions=True)

    async def _handle(self, msg: pull.Delivery) -> None:
        if self.stopping:
            await msg.nak()  # hand it back at once, another runner takes it
            return
        try:
            job = Job.from_dispatch(schemas.decode("dispatch", msg.data))
        except SchemaError as exc:
            reject(
                "runner", self._settings.subjects, msg.subject, exc, stream_seq=stream_seq_of(msg)
            )
            await msg.term()
            return
        if job.arch != self._registry.arch or job.kind not in self._registry.kinds:
            why = f"dispatch of a {job.module_type} job to a {self._registry.arch} runner"
            reject(
                "runner", self._settings.subjects, msg.subject, why, stream_seq=stream_seq_of(msg)
            )
            await msg.term()
            return

        if (job.build_id, job.attempt) in self._granted:
            log.info(
                "dispatch copy of a job already granted; dropped", extra={"build_id": job.build_id}
            )
            await _quietly(msg.ack(), "ack")
            return

        stop = StopRequest()
        # Reachable by a cancel before claiming, so one sent right after the grant is heard
        # (the subscription is in place since `subscribe`).
        self._stops[job.build_id] = stop
        # Made when the job starts (after the grant), removed once it has ended.
        workdir = WorkDir(
            self._settings.modules_dir, job.module_name, job.build_id, self._work_root
        )
        try:
            granted = await self._claim(job)
            while granted is None and not self.stopping:
                # No answer (the scheduler restarting, NATS reconnecting, or the answer
                # lost on the way): ask again, holding the message. The grant may have
                # been recorded already; the scheduler answers this runner's repeated
                # claim the same way, whereas the message handed to another runner
                # would be refused as taken and the job would run nowhere.
                counters.CLAIMS.labels(answer="none").inc()
                await _quietly(msg.in_progress(), "in_progress")
                await asyncio.sleep(CLAIM_RETRY_S)
                granted = await self._claim(job)
            if granted is None:  # draining: hand it back for another runner
                counters.CLAIMS.labels(answer="none").inc()
                await _quietly(msg.nak(), "nak")
                return
            counters.CLAIMS.labels(answer="granted" if granted else "refused").inc()
            # Acked either way: granted it is ours; refused it is someone else's or over.
            # A granted job runs even if the ack is lost: the claim, not the message, says
            # whose it is (a redelivered copy is refused).
            await _quietly(msg.ack(), "ack")
            if not granted:
                return
            self._granted[(job.build_id, job.attempt)] = None
            while len(self._granted) > GRANTED_KEPT:
                self._granted.popitem(last=False)
            await self._run_claimed(job, stop, workdir)
        finally:
            del self._stops[job.build_id]

    async def _on_cancel(self, msg: Msg) -> None:
        # Most cancels are for jobs of other runners: those are dropped before decoding.
        token = msg.subject.rsplit(".", 1)[-1]
        if not token.isdigit() or int(token) not in self._stops:
            return
        try:
            request = schemas.decode("cancel_request", msg.data)
        except SchemaError as exc:
            reject("runner", self._settings.subjects, msg.subject, exc)
            return
        stop = self._stops.get(request["build_id"])
        if stop is None or msg.subject != self._settings.subjects.cancel(request["build_id"]):
            return
        if request.get("reason") == "timeout":
            stop.stop(Reason.TIMEOUT, "timeout reached (scheduler)")
        else:
            who = request.get("requested_by")
            stop.stop(Reason.CANCELLED, f"cancelled by {who}" if who else "cancelled")

    async def _claim(self, job: Job) -> bool | None:
        """True granted, False refused, None when nobody answered."""
        claim = {
            "build_id": job.build_id,
            "runner_id": self.runner_id,
            "attempt": job.attempt,
            # So the scheduler can tell this process from a restart under the same id.
            "runner_started_at": self._registry.started_at,
        }
        try:
            reply = await self._nc.request(
                self._settings.subjects.claim, codec.dumps(claim), timeout=CLAIM_TIMEOUT_S
            )
        except (NatsError, TimeoutError) as exc:
            log.warning("claim not answered", extra={"build_id": job.build_id, "error": repr(exc)})
            return None
        try:
            answer = schemas.decode("claim_reply", reply.data)
        except SchemaError as exc:
            subject = self._settings.subjects.claim
            reject("runner", self._settings.subjects, subject, exc, build_id=job.build_id)
            return None
        if not answer["granted"]:
            log.info("claim refused", extra={"build_id": job.build_id, "why": answer.get("reason")})
        return bool(answer["granted"])

    async def _run_claimed(self, job: Job, stop: StopRequest, workdir: WorkDir) -> None:
        self._current = stop
        if self._deadline_passed:  # the drain deadline passed while the claim was in flight
            stop.stop(Reason.CANCELLED, self._drain_why)
        self._registry.announce("busy", job.build_id)
        log.info("job started", extra={"build_id": job.build_id, "module_name": job.module_name})
        try:
            outcome = await execute(self._pub, self._settings, job, stop, workdir)
        finally:
            self._current = None
            # In a worker thread while the report's round trip is awaited: neither the
            # report nor the next job waits for the file system.
            removal = asyncio.create_task(workdir.remove())
            self._removals.add(removal)
            removal.add_done_callback(self._removals.discard)
        await self._report(job, outcome)
        self.jobs_run += 1
        counters.JOBS.labels(result=counters.job_result(outcome.exit_code, outcome.reason)).inc()
        log.info("job finished", extra={"build_id": job.build_id, **outcome.report_fields()})
        self._registry.announce("idle", None)

    async def _report(self, job: Job, outcome: Outcome) -> None:
        report = {
            "build_id": job.build_id,
            "runner_id": self.runner_id,
            "type": "finished",
            **outcome.report_fields(),
            "at": now_iso(),
        }
        schemas.check("report", report)
        headers = {"Nats-Msg-Id": f"report-{job.build_id}-{job.attempt}-{self.runner_id}"}
        await publish_until_acked(
            self._pub, self._settings.subjects.report(self.runner_id), codec.dumps(report), headers
        )


async def _quietly(action: Awaitable[Any], what: str) -> None:
    """Await a NATS housekeeping call whose failure (NATS away) changes nothing we decide."""
    try:
        await action
    except (NatsError, TimeoutError) as exc:
        log.warning(f"{what} failed", extra={"error": repr(exc)})
