"""The scheduler's decisions, as plain code: each input (submission, claim, report, cancel,
timer tick, runner registry) changes the state and returns the effects to perform, in
order. No I/O here, so every rule is unit-tested without servers; `service.py` feeds it.

Effect order is chosen so a crash at any point is repaired by `load`: a job's record is
saved before its event is published (load republishes the current event; the stream drops
a repeat by its Nats-Msg-Id), and a dispatch is repeated on load (same Nats-Msg-Id; a
duplicate message is refused at claim time).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from services.common.config import DEFAULT_GATEWAY_URL, Settings
from services.common.job_object import advanced, new_job
from services.common.status import Reason, Status, TransitionError, check_transition
from services.scheduler.effects import (
    DeleteJob,
    Dispatch,
    DropDispatch,
    Effect,
    PublishEvent,
    SaveJob,
    SendCancel,
)
from services.scheduler.jobs import JobRecord, epoch, iso
from services.scheduler.runners import RunnerInfo

# A runner must report within cancel_grace_s + this after being asked to stop.
STOP_REPORT_SLACK_S = 10.0

Reply = dict[str, Any]
Workspace = tuple[str, str, str]


@dataclass(frozen=True)
class Limits:
    queue_timeout_s: float = 15 * 60
    default_timeout_s: int = 3600
    cancel_grace_s: float = 10.0
    # A runner that was just granted a job may not be in our registry view yet.
    lost_grace_s: float = 5.0
    # Cancels are core NATS (fire and forget): repeat them until the runner reports.
    cancel_resend_s: float = 2.0
    # Registration clocks of other hosts may be a little ahead of ours.
    clock_skew_s: float = 2.0
    # Not limits, but settings the dispatch of a terraform job needs: its per-job state
    # credentials are signed with the secret the gateway checks them with.
    state_secret: str = field(default="", repr=False)
    gateway_url: str = DEFAULT_GATEWAY_URL

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            queue_timeout_s=settings.queue_timeout_s,
            default_timeout_s=settings.default_timeout_s,
            cancel_grace_s=settings.cancel_grace_s,
            state_secret=settings.state_secret,
            gateway_url=settings.gateway_url,
        )


def refused(reason: str) -> Reply:
    return {"granted": False, "reason": reason}


class Machine:
    """The scheduler state (active jobs, workspace queues, runner view) and its rules."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.jobs: dict[int, JobRecord] = {}
        # Final jobs whose record is kept until their submission can no longer be
        # redelivered (see `compact`), so a redelivery never makes a second job.
        self.finished: set[int] = set()
        self.runners: dict[str, RunnerInfo] = {}
        # Every submission up to here was handled: a build_id at or below it that is not
        # active is final (for cancel's "final" vs "unknown").
        self.admitted_max = 0

    # --- start-up -------------------------------------------------------------------------
    def load(self, records: Iterable[JobRecord], ack_floor: int, now: float) -> list[Effect]:
        """Take over the stored state; return what repairs an interrupted predecessor."""
        effects: list[Effect] = []
        self.admitted_max = max(self.admitted_max, ack_floor)
        for rec in sorted(records, key=lambda r: r.build_id):
            self.admitted_max = max(self.admitted_max, rec.build_id)
            if rec.final:
                self.finished.add(rec.build_id)
            else:
                self.jobs[rec.build_id] = rec
            effects.append(self._publish(rec, repair=True))
        for workspace in sorted({r.workspace for r in self.jobs.values() if r.mutating}):
            effects += self._requeue(workspace, now)
        for rec in sorted(self.jobs.values(), key=lambda r: r.build_id):
            if rec.dispatchable and not rec.dispatched:
                effects += self._dispatch(rec, now)
        return effects

    # --- inputs ---------------------------------------------------------------------------
    def admit(self, build_id: int, message: dict[str, Any], now: float) -> list[Effect]:
        """A valid submission (schema submit_message) whose stream sequence is build_id."""
        self.note_submission(build_id)
        if build_id in self.jobs or build_id in self.finished:
            return []  # a redelivery: the job exists already
        sensitive = [name for name in message["sensitive"] if name in message["variables"]]
        rec = JobRecord(
            job=new_job(build_id, message, None),
            variables=dict(message["variables"]),
            sensitive=sensitive,
            timeout_s=int(message.get("timeout_s") or self.limits.default_timeout_s),
            sealed=message.get("secrets"),
        )
        if rec.mutating:
            ahead = sum(1 for r in self._queue(rec.workspace) if r.build_id < build_id)
            rec.job["queue_position"] = ahead or None
        self.jobs[build_id] = rec
        effects: list[Effect] = [SaveJob(build_id, rec.to_value()), self._publish(rec)]
        if rec.dispatchable:
            effects += self._dispatch(rec, now)
        return effects

    def note_submission(self, build_id: int) -> None:
        """A submission was handled (admitted or rejected)."""
        self.admitted_max = max(self.admitted_max, build_id)

    def claim(self, request: dict[str, Any], now: float) -> tuple[Reply, list[Effect]]:
        """A runner asks for a job it took from the dispatch queue (schema claim)."""
        build_id = int(request["build_id"])
        rec = self.jobs.get(build_id)
        if rec is None:
            return refused(self._gone(build_id)), []
        if self._asks_again(rec, request):
            # The same runner process asks again for the job it was granted: our grant did
            # not reach it (late, lost in a NATS outage, or the leader that stored it died
            # before answering), and a runner never claims a job it has started. Granted
            # again; nothing changes.
            return {"granted": True, "reason": None}, []
        if rec.status != Status.IN_PROGRESS or rec.runner_id is not None:
            return refused("taken"), []
        if int(request["attempt"]) != rec.attempt:
            return refused("stale-attempt"), []
        if rec.waiting:
            return refused("queued"), []
        rec.runner_started_at = request.get("runner_started_at")
        effects = self._change(
            rec,
            now,
            status=Status.WORKING,
            runner_id=request["runner_id"],
            started_at=iso(now),
            queue_position=None,
        )
        rec.no_runner_since = None
        return {"granted": True, "reason": None}, effects

    def report(self, report: dict[str, Any], now: float) -> list[Effect]:
        """A runner's report (schema report); applied only to a job WORKING on that runner."""
        rec = self.jobs.get(int(report["build_id"]))
        if (
            rec is None
            or report["type"] != "finished"
            or rec.status != Status.WORKING
            or rec.runner_id != report["runner_id"]
        ):
            return []
        exit_code = report.get("exit_code")
        reason = report.get("reason")
        if reason is None and exit_code == 0:
            return self._change(rec, now, status=Status.SUCCESS, exit_code=0)
        if reason is None and exit_code is not None:
            # A process stopped on our request may just die of the signal.
            reason = rec.stop_reason or Reason.EXIT_CODE.value
        elif reason is None:
            reason = Reason.INTERNAL.value
        try:
            check_transition(rec.status, Status.FAILURE, reason)
        except TransitionError:
            reason = Reason.INTERNAL.value
        return self._change(rec, now, status=Status.FAILURE, reason=reason, exit_code=exit_code)

    def cancel(self, request: dict[str, Any], now: float) -> tuple[Reply, list[Effect]]:
        """A user's cancel (schema cancel_request); the reply the gateway relays."""
        build_id = int(request["build_id"])
        rec = self.jobs.get(build_id)
        if rec is None:
            return {"ok": False, "job": None, "error": self._gone(build_id)}, []
        if rec.status == Status.IN_PROGRESS:
            effects = self._change(rec, now, status=Status.FAILURE, reason=Reason.CANCELLED.value)
            return {"ok": True, "job": dict(rec.job), "error": None}, effects
        effects = []
        if rec.stop_reason is None:
            effects = self._ask_stop(rec, Reason.CANCELLED.value, now)
        return {"ok": True, "job": dict(rec.job), "error": None}, effects

    def observe_runners(self, runners: dict[str, RunnerInfo], now: float) -> list[Effect]:
        """A fresh view of the registry: fail jobs whose runner died, start or stop the
        no-runner clock of jobs waiting for one."""
        self.runners = dict(runners)
        effects: list[Effect] = []
        served: dict[tuple[str, str], bool] = {}
        for rec in self._in_order():
            if rec.status == Status.WORKING and self._runner_lost(rec, now):
                effects += self._change(
                    rec, now, status=Status.FAILURE, reason=Reason.RUNNER_LOST.value
                )
            elif rec.dispatchable:
                self._clock_no_runner(rec, now, served)
        return effects

    def tick(self, now: float) -> list[Effect]:
        """Timers: job timeouts, overdue stop reports, cancels to repeat, no-runner."""
        effects: list[Effect] = []
        limits = self.limits
        for rec in self._in_order():
            if rec.status == Status.WORKING:
                started = rec.started or now
                if rec.stop_reason is None:
                    if now >= started + rec.timeout_s:
                        effects += self._ask_stop(rec, Reason.TIMEOUT.value, now)
                    continue
                asked = rec.stop_asked_at or now
                if now >= asked + limits.cancel_grace_s + STOP_REPORT_SLACK_S:
                    effects += self._change(rec, now, status=Status.FAILURE, reason=rec.stop_reason)
                elif now >= (rec.stop_last_sent or asked) + limits.cancel_resend_s:
                    rec.stop_last_sent = now
                    effects.append(SendCancel(rec.build_id, rec.stop_reason))
            elif rec.dispatchable and rec.no_runner_since is not None:
                if now >= rec.no_runner_since + limits.queue_timeout_s:
                    effects += self._change(
                        rec, now, status=Status.FAILURE, reason=Reason.NO_RUNNER.value
                    )
        return effects

    def note_dispatched(self, build_id: int, seq: int) -> None:
        """The dispatch message landed at stream sequence `seq` (to drop it if unclaimed)."""
        rec = self.jobs.get(build_id)
        if rec is not None:
            rec.dispatch_seq = seq

    def compact(self, ack_floor: int) -> list[Effect]:
        """Forget final jobs whose submission is acknowledged (it cannot come back)."""
        done = sorted(b for b in self.finished if b <= ack_floor)
        self.finished.difference_update(done)
        return [DeleteJob(b) for b in done]

    # --- rules ----------------------------------------------------------------------------
    def _in_order(self) -> list[JobRecord]:
        """The active jobs by build_id (their keys: no property call per comparison), as
        a list, so a job that ends meanwhile may leave `jobs`."""
        jobs = self.jobs
        return [jobs[build_id] for build_id in sorted(jobs)]

    def _gone(self, build_id: int) -> str:
        known = build_id in self.finished or build_id <= self.admitted_max
        return "final" if known else "unknown"

    def _queue(self, workspace: Workspace) -> list[JobRecord]:
        """Active mutating jobs of a workspace in submission order; the first one runs."""
        members = [r for r in self.jobs.values() if r.mutating and r.workspace == workspace]
        return sorted(members, key=lambda r: r.build_id)

    def _requeue(self, workspace: Workspace, now: float) -> list[Effect]:
        """Bring queue positions up to date (an event per change); dispatch the head."""
        effects: list[Effect] = []
        for ahead, rec in enumerate(self._queue(workspace)):
            if rec.status != Status.IN_PROGRESS:
                continue
            position = ahead or None
            if rec.job["queue_position"] != position:
                effects += self._change(rec, now, queue_position=position)
            if rec.dispatchable and not rec.dispatched:
                effects += self._dispatch(rec, now)
        return effects

    def _dispatch(self, rec: JobRecord, now: float) -> list[Effect]:
        rec.dispatched = True
        self._clock_no_runner(rec, now)
        payload = rec.dispatch(self.limits.state_secret, self.limits.gateway_url)
        return [Dispatch(rec.arch, rec.kind, rec.build_id, rec.dispatch_msg_id, payload)]

    def _clock_no_runner(
        self, rec: JobRecord, now: float, served: dict[tuple[str, str], bool] | None = None
    ) -> None:
        """Start or stop the job's no-runner clock; `served` remembers, over one sweep of
        the jobs, whether some runner serves an arch + kind."""
        wanted = (rec.arch, rec.kind)
        serving = None if served is None else served.get(wanted)
        if serving is None:
            serving = any(info.serves(*wanted) for info in self.runners.values())
            if served is not None:
                served[wanted] = serving
        if serving:
            rec.no_runner_since = None
        elif rec.no_runner_since is None:
            rec.no_runner_since = now

    @staticmethod
    def _asks_again(rec: JobRecord, request: dict[str, Any]) -> bool:
        started_at = request.get("runner_started_at")
        return (
            rec.status == Status.WORKING
            and rec.runner_id == request["runner_id"]
            and rec.attempt == int(request["attempt"])
            and started_at is not None
            and rec.runner_started_at == started_at
        )

    def _runner_lost(self, rec: JobRecord, now: float) -> bool:
        info = self.runners.get(rec.runner_id or "")
        started = rec.started or now
        if info is None:
            return now >= started + self.limits.lost_grace_s
        if info.started_at is None:
            return False
        if rec.runner_started_at is not None:
            # Both stamps come from the runner's clock: any other registration under this
            # runner_id is a new process, however soon it came back.
            return info.started_at != epoch(rec.runner_started_at)
        # The same runner_id registered again after the job started: a restarted runner
        # no longer runs it.
        return info.started_at > started + self.limits.clock_skew_s

    def _ask_stop(self, rec: JobRecord, reason: str, now: float) -> list[Effect]:
        rec.stop_reason = reason
        rec.stop_asked_at = now
        rec.stop_last_sent = now
        return [SaveJob(rec.build_id, rec.to_value()), SendCancel(rec.build_id, reason)]

    def _change(self, rec: JobRecord, now: float, **fields: Any) -> list[Effect]:
        """One event: apply `fields`, seq + 1, save, publish; a final job leaves the queue."""
        rec.job.update(advanced(rec.job, iso(now), **fields))
        effects: list[Effect] = []
        if rec.final:
            del self.jobs[rec.build_id]
            self.finished.add(rec.build_id)
        effects += [SaveJob(rec.build_id, rec.to_value()), self._publish(rec)]
        if rec.final:
            if rec.runner_id is None and rec.dispatch_seq is not None:
                effects.append(DropDispatch(rec.dispatch_seq))
            if rec.mutating:
                effects += self._requeue(rec.workspace, now)
        return effects

    @staticmethod
    def _publish(rec: JobRecord, repair: bool = False) -> PublishEvent:
        job = rec.job
        return PublishEvent(
            job["organization"], job["environment"], rec.build_id, rec.event(), repair
        )
