"""The scheduler's decisions under random interleavings (hypothesis stateful testing):
submissions and their redeliveries, claims (stale, duplicate, from any runner), reports
(duplicate, late, from the wrong runner), cancels, runners coming, going, draining and
restarting, timers, scheduler restarts from the stored records (also in the middle of
performing a decision's effects), and compaction.

Whatever the order, the effects the machine asks for must keep the contract: every event
is the next `seq` of its job and a transition the status machine allows, each job ends
final exactly once, at most one APPLY-AUTO/DESTROY runs per workspace and the queue
positions say how many are ahead, a record is saved before its event is published, and no
job is dispatched twice (a repeat after a restart carries the same Nats-Msg-Id).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import hypothesis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from services.common import schemas
from services.common.status import FINAL, Status, check_transition
from services.scheduler.effects import (
    DeleteJob,
    Dispatch,
    DropDispatch,
    Effect,
    PublishEvent,
    SaveJob,
    SendCancel,
)
from services.scheduler.jobs import JobRecord, iso
from services.scheduler.machine import Limits, Machine
from services.scheduler.runners import RunnerInfo
from tests.unit.test_scheduler_machine import T0, submission

LIMITS = Limits(
    queue_timeout_s=300.0,
    default_timeout_s=900,
    cancel_grace_s=5.0,
    lost_grace_s=5.0,
    cancel_resend_s=2.0,
)
RUNNER_IDS = ("r1", "r2", "r3")
MAX_BUILDS = 10  # submissions per run; ids up to MAX_BUILDS + 2 are asked about

build_ids = st.integers(min_value=1, max_value=MAX_BUILDS + 2)
outcomes = st.sampled_from(
    [
        (0, None),
        (1, None),
        (137, None),
        (None, "invalid-module"),
        (None, "cancelled"),
        (None, "no-runner"),  # not allowed from WORKING: becomes internal
        (None, None),
        (0, "internal"),
    ]
)
steps = st.sampled_from([0.0, 0.5, 1.0, 2.5, 6.0, 20.0, 120.0, 400.0, 1000.0])


def runner_id_of(build_id: int) -> str:
    return RUNNER_IDS[build_id % len(RUNNER_IDS)]


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = T0
        self.m = Machine(LIMITS)
        self.runners: dict[str, RunnerInfo] = {}
        # What the edges hold, rebuilt from the effects alone.
        self.kv: dict[int, dict[str, Any]] = {}
        self.last_event: dict[int, dict[str, Any]] = {}
        self.finals: Counter[int] = Counter()
        self.msg_ids: dict[int, set[str]] = {}
        self.dispatched_this_life: set[int] = set()
        self.admitted: dict[int, dict[str, Any]] = {}
        self.next_id = 1
        self.compacted_floor = 0

    # --- the edges: perform effects and check each against what came before --------------
    def perform(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, SaveJob):
                self.kv[effect.build_id] = effect.value
            elif isinstance(effect, PublishEvent):
                self._published(effect)
            elif isinstance(effect, Dispatch):
                self._dispatched(effect)
            elif isinstance(effect, SendCancel):
                last = self.last_event[effect.build_id]
                assert last["status"] == Status.WORKING, "a cancel sent to a job not running"
            elif isinstance(effect, DeleteJob):
                assert self.last_event[effect.build_id]["status"] in FINAL
                self.kv.pop(effect.build_id)
            else:
                assert isinstance(effect, DropDispatch)
            hypothesis.event(f"effect: {type(effect).__name__}")

    def _published(self, effect: PublishEvent) -> None:
        event = schemas.check("job_event", effect.payload)
        build_id, seq = event["build_id"], event["seq"]
        # Saved before published: a crash in between is repaired by reload.
        assert self.kv[build_id]["job"]["seq"] == seq, "event published before its record"
        prev = self.last_event.get(build_id)
        if effect.repair and prev is not None and prev["seq"] == seq:
            # A restarted scheduler republishes the current event; the stream already has
            # it (same Nats-Msg-Id), so it must be the very same event.
            assert {k: v for k, v in prev.items() if k != "variables"} == {
                k: v for k, v in event.items() if k != "variables"
            }
            return
        # Otherwise a new event: also a repair of one a crash kept from being published.
        if prev is None:
            assert seq == 1 and event["status"] == Status.IN_PROGRESS
        else:
            assert seq == prev["seq"] + 1, f"job {build_id}: seq {prev['seq']} then {seq}"
            check_transition(prev["status"], event["status"], event["reason"])
        hypothesis.event(f"event: {event['status']} {event['reason'] or ''}".strip())
        if event["status"] in FINAL:
            self.finals[build_id] += 1
            assert self.finals[build_id] == 1, f"job {build_id} ended twice"
            assert event["finished_at"] is not None and event["queue_position"] is None
        if event["status"] == Status.FAILURE:
            assert event["reason"] is not None
        self.last_event[build_id] = event

    def _dispatched(self, effect: Dispatch) -> None:
        schemas.check("dispatch", effect.payload)
        last = self.last_event[effect.build_id]
        assert last["status"] == Status.IN_PROGRESS and last["runner_id"] is None
        assert last["queue_position"] is None, "a job waiting in its queue was dispatched"
        assert effect.build_id not in self.dispatched_this_life, "dispatched twice"
        self.dispatched_this_life.add(effect.build_id)
        ids = self.msg_ids.setdefault(effect.build_id, set())
        ids.add(effect.msg_id)
        assert len(ids) == 1, f"job {effect.build_id} dispatched under two message ids"

    def _running_on(self, build_id: int) -> str | None:
        rec = self.m.jobs.get(build_id)
        return rec.runner_id if rec is not None else None

    # --- inputs ---------------------------------------------------------------------------
    @initialize(
        archs=st.lists(st.sampled_from(["amd64", "arm64"]), min_size=1, max_size=len(RUNNER_IDS))
    )
    def runners_start(self, archs: list[str]) -> None:
        for runner_id, arch in zip(RUNNER_IDS, archs, strict=False):
            self.runner_registers(runner_id, arch, "idle")

    @initialize(
        jobs=st.lists(
            st.tuples(
                st.sampled_from(["PLAN", "APPLY-AUTO", "DESTROY"]),
                st.sampled_from(["vpc", "db"]),
                st.sampled_from(["amd64", "arm64"]),
            ),
            min_size=1,
            max_size=5,
        )
    )
    def first_submissions(self, jobs: list[tuple[str, str, str]]) -> None:
        for action, module, arch in jobs:
            self.submit(action, module, arch, None)

    @precondition(lambda self: self.next_id <= MAX_BUILDS)
    @rule(
        action=st.sampled_from(["PLAN", "APPLY-AUTO", "DESTROY"]),
        module=st.sampled_from(["vpc", "db"]),
        arch=st.sampled_from(["amd64", "arm64"]),
        timeout_s=st.sampled_from([None, 30, 600]),
    )
    def submit(self, action: str, module: str, arch: str, timeout_s: int | None) -> None:
        build_id = self.next_id
        self.next_id += 1
        message = submission(
            action=action,
            module_name=module,
            module_type=f"{arch}/script",
            timeout_s=timeout_s,
            submitted_at=iso(self.now),
        )
        self.admitted[build_id] = message
        effects = self.m.admit(build_id, message, self.now)
        self.perform(effects)
        assert self.last_event[build_id]["seq"] == 1

    @rule(data=st.data())
    def redeliver_submission(self, data: st.DataObject) -> None:
        """A submission not yet acknowledged comes again: never a second job."""
        candidates = [b for b in self.admitted if b > self.compacted_floor]
        if not candidates:
            return
        build_id = data.draw(st.sampled_from(candidates))
        assert self.m.admit(build_id, self.admitted[build_id], self.now) == []

    @rule(
        build_id=build_ids,
        runner_id=st.sampled_from(RUNNER_IDS),
        stale=st.booleans(),
    )
    def claim(self, build_id: int, runner_id: str, stale: bool) -> None:
        rec = self.m.jobs.get(build_id)
        before = None if rec is None else (rec.status, rec.runner_id, rec.waiting)
        info = self.runners.get(runner_id)
        request: dict[str, Any] = {
            "build_id": build_id,
            "runner_id": runner_id,
            "attempt": 2 if stale else 1,
        }
        if info is not None and info.started_at is not None:
            request["runner_started_at"] = iso(info.started_at)
        reply, effects = self.m.claim(schemas.check("claim", request), self.now)
        schemas.check("claim_reply", reply)
        self.perform(effects)
        hypothesis.event(f"claim: {reply['reason'] or 'granted'}")
        if reply["granted"] and before == (Status.WORKING, runner_id, False):
            # The same runner process asking again (its grant was lost on the way): the
            # same answer, and nothing changes.
            assert effects == []
        elif reply["granted"]:
            assert before == (Status.IN_PROGRESS, None, False) and not stale
            assert self.last_event[build_id]["status"] == Status.WORKING
            assert self.last_event[build_id]["runner_id"] == runner_id
        else:
            assert effects == []

    @rule(data=st.data(), runner_id=st.sampled_from(RUNNER_IDS))
    def claim_a_dispatched_job(self, data: st.DataObject, runner_id: str) -> None:
        """What a runner usually does: claim a job it took from the dispatch queue (which
        may already be taken, cancelled, or ended)."""
        if not self.msg_ids:
            return
        build_id = data.draw(st.sampled_from(sorted(self.msg_ids)))
        self.claim(build_id, runner_id, stale=False)

    @rule(
        build_id=build_ids,
        right_runner=st.booleans(),
        other=st.sampled_from(RUNNER_IDS),
        outcome=outcomes,
    )
    def report_finished(
        self,
        build_id: int,
        right_runner: bool,
        other: str,
        outcome: tuple[int | None, str | None],
    ) -> None:
        """A runner's report; may be a duplicate, late, early, or from another runner."""
        runner_id = (self._running_on(build_id) if right_runner else None) or other
        rec = self.m.jobs.get(build_id)
        applies = rec is not None and rec.status == Status.WORKING and rec.runner_id == runner_id
        exit_code, reason = outcome
        report = {
            "build_id": build_id,
            "runner_id": runner_id,
            "type": "finished",
            "at": iso(self.now),
            "exit_code": exit_code,
            "reason": reason,
        }
        effects = self.m.report(schemas.check("report", report), self.now)
        self.perform(effects)
        if not applies:
            assert effects == [], "a report for a job not running on that runner changed it"
            return
        event = self.last_event[build_id]
        if exit_code == 0 and reason is None:
            assert event["status"] == Status.SUCCESS
        else:
            assert event["status"] == Status.FAILURE

    @rule(data=st.data(), outcome=st.one_of(st.just((0, None)), outcomes))
    def running_job_finishes(
        self, data: st.DataObject, outcome: tuple[int | None, str | None]
    ) -> None:
        """The runner of a running job reports how it ended (the common case)."""
        running = sorted(b for b, r in self.m.jobs.items() if r.status == Status.WORKING)
        if not running:
            return
        build_id = data.draw(st.sampled_from(running))
        self.report_finished(build_id, True, "r1", outcome)

    @rule(build_id=build_ids)
    def report_started(self, build_id: int) -> None:
        report = {
            "build_id": build_id,
            "runner_id": self._running_on(build_id) or "r1",
            "type": "started",
            "at": iso(self.now),
        }
        assert self.m.report(schemas.check("report", report), self.now) == []

    @rule(build_id=build_ids)
    def cancel(self, build_id: int) -> None:
        rec = self.m.jobs.get(build_id)
        was = None if rec is None else rec.status
        reply, effects = self.m.cancel({"build_id": build_id}, self.now)
        self.perform(effects)
        assert reply["ok"] == (was is not None)
        if was == Status.IN_PROGRESS:
            event = self.last_event[build_id]
            assert (event["status"], event["reason"]) == ("FAILURE", "cancelled")
        elif was is None:
            assert effects == []
            known = build_id < self.next_id
            assert reply["error"] == ("final" if known else "unknown")

    @rule(
        runner_id=st.sampled_from(RUNNER_IDS),
        arch=st.sampled_from(["amd64", "arm64"]),
        state=st.sampled_from(["idle", "busy", "draining"]),
    )
    def runner_registers(self, runner_id: str, arch: str, state: str) -> None:
        """A runner appears, changes state, or restarts (a new registration stamp)."""
        old = self.runners.get(runner_id)
        started = old.started_at if old is not None and state != "idle" else self.now
        self.runners[runner_id] = RunnerInfo(
            runner_id, arch, frozenset({"script"}), state, started_at=started
        )
        self.perform(self.m.observe_runners(self.runners, self.now))

    @rule(runner_id=st.sampled_from(RUNNER_IDS))
    def runner_vanishes(self, runner_id: str) -> None:
        self.runners.pop(runner_id, None)
        self.perform(self.m.observe_runners(self.runners, self.now))

    @rule(step=steps)
    def time_passes(self, step: float) -> None:
        self.now += step
        self.perform(self.m.tick(self.now))

    @rule()
    def scheduler_restarts(self) -> None:
        """A new scheduler takes over from the stored records, with every submission so far
        acknowledged (it was handled)."""
        fresh = Machine(LIMITS)
        fresh.runners = dict(self.runners)
        records = [JobRecord.from_value(v) for v in self.kv.values()]
        self.m = fresh
        self.dispatched_this_life = set()
        self.perform(fresh.load(records, self.next_id - 1, self.now))

    @rule(
        what=st.sampled_from(["tick", "cancel", "finish", "runner lost"]),
        build_id=build_ids,
        step=steps,
        cut=st.integers(min_value=0, max_value=12),
    )
    def crash_midway(self, what: str, build_id: int, step: float, cut: int) -> None:
        """The scheduler dies after performing only the first `cut` effects of a decision;
        the next one must repair whatever was left half done."""
        self.now += step
        if what == "tick":
            effects = self.m.tick(self.now)
        elif what == "cancel":
            effects = self.m.cancel({"build_id": build_id}, self.now)[1]
        elif what == "finish":
            runner_id = self._running_on(build_id) or "r1"
            report = {"build_id": build_id, "runner_id": runner_id, "type": "finished"}
            effects = self.m.report(report | {"at": iso(self.now), "exit_code": 0}, self.now)
        else:
            self.runners.pop(runner_id_of(build_id), None)
            effects = self.m.observe_runners(self.runners, self.now)
        hypothesis.event(f"crash after {min(cut, len(effects))} of {len(effects)} effects")
        self.perform(effects[:cut])
        self.scheduler_restarts()

    @rule()
    def compact(self) -> None:
        self.compacted_floor = self.next_id - 1
        self.perform(self.m.compact(self.compacted_floor))

    @rule()
    def every_job_ends(self) -> None:
        """All runners go away and time passes: every job must end (runner-lost, no-runner,
        or a stop that was never reported), each exactly once."""
        self.runners.clear()
        self.perform(self.m.observe_runners(self.runners, self.now))
        for _ in range(MAX_BUILDS + 3):
            if not self.m.jobs:
                break
            self.now += LIMITS.queue_timeout_s + LIMITS.default_timeout_s + 60
            self.perform(self.m.observe_runners(self.runners, self.now))
            self.perform(self.m.tick(self.now))
        assert self.m.jobs == {}, f"jobs never ended: {sorted(self.m.jobs)}"
        assert all(self.finals[b] == 1 for b in self.admitted)

    # --- invariants -----------------------------------------------------------------------
    @invariant()
    def workspaces_run_one_mutating_job_in_order(self) -> None:
        queues: dict[tuple[str, str, str], list[JobRecord]] = {}
        for rec in sorted(self.m.jobs.values(), key=lambda r: r.build_id):
            if rec.mutating:
                queues.setdefault(rec.workspace, []).append(rec)
            else:
                assert rec.job["queue_position"] is None, "a PLAN got a queue position"
        for queue in queues.values():
            for ahead, rec in enumerate(queue):
                hypothesis.event(f"queue length {len(queue)}")
                if rec.status == Status.WORKING:
                    assert ahead == 0, "an APPLY/DESTROY runs with another ahead of it"
                else:
                    assert rec.job["queue_position"] == (ahead or None)

    @invariant()
    def published_and_stored_say_what_the_machine_holds(self) -> None:
        for build_id, rec in self.m.jobs.items():
            event = self.last_event[build_id]
            assert {k: event[k] for k in rec.job} == rec.job
            assert self.kv[build_id]["job"] == rec.job
        for build_id in self.m.finished:
            assert self.last_event[build_id]["status"] in FINAL


TestSchedulerProperties = SchedulerMachine.TestCase
TestSchedulerProperties.settings = settings(max_examples=200, stateful_step_count=60, deadline=None)
