"""Which effect lists may be performed at the same time.

A batch of inputs (the submissions of one fetch, say) gives one effect list per input.
Each list is performed in its own order (`outbox.Outbox.perform`). Two lists are
independent when they touch neither the same job nor the same workspace queue of mutating
jobs: then nothing
`machine.load` relies on (a record saved before its event; a queue's dispatch after the
record that freed it) links them, and they can go out concurrently. Lists that share a job
or a workspace go into one lane and are performed one after the other, in input order.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from services.common.status import MUTATING_ACTIONS
from services.scheduler.effects import (
    DeleteJob,
    Dispatch,
    DropDispatch,
    Effect,
    PublishEvent,
    SaveJob,
    SendCancel,
)


def _job_of(effect: Effect) -> dict[str, Any] | None:
    """The job fields an effect carries (organization, environment, module, action)."""
    match effect:
        case SaveJob(_, value):
            job = value.get("job")
            return job if isinstance(job, dict) else None
        case PublishEvent(_, _, _, payload, _) | Dispatch(_, _, _, _, payload):
            return payload
    return None


def keys(effects: Sequence[Effect]) -> set[Hashable]:
    """The jobs and mutating-workspace queues a list of effects touches."""
    found: set[Hashable] = set()
    for effect in effects:
        match effect:
            case SaveJob(build_id) | DeleteJob(build_id) | SendCancel(build_id):
                found.add(("job", build_id))
            case PublishEvent(_, _, build_id) | Dispatch(_, _, build_id):
                found.add(("job", build_id))
            case DropDispatch(seq):
                # Comes with its job's final record; keyed anyway, so it is never alone.
                found.add(("dispatch", seq))
        job = _job_of(effect)
        if job is not None and job.get("action") in MUTATING_ACTIONS:
            found.add(("workspace", job["organization"], job["environment"], job["module_name"]))
    return found


def lanes(batches: Sequence[Sequence[Effect]]) -> list[list[int]]:
    """Group the lists (by index) into lanes: lists sharing a key are in one lane, in
    their original order; different lanes share nothing."""
    groups: list[tuple[set[Hashable], list[int]]] = []
    for index, effects in enumerate(batches):
        mine = keys(effects)
        joined = [g for g in groups if g[0] & mine]
        for group in joined:
            groups.remove(group)
            mine |= group[0]
        members = sorted([index, *(i for g in joined for i in g[1])])
        groups.append((mine, members))
    return sorted((members for _, members in groups), key=lambda m: m[0])
