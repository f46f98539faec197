"""The scheduler's state in KV `xoogify-sched`: one key `job.<build_id>` per job that is
active (or final but not yet compacted). Every write is a compare-and-set against the
revision this process last saw, so two schedulers cannot silently overwrite each other."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError

from services.common import codec, kvread
from services.common.jspub import JsPublisher, kv_subject
from services.common.metrics import reject
from services.common.subjects import Subjects
from services.scheduler.jobs import JobRecord

log = logging.getLogger(__name__)


def job_key(build_id: int) -> str:
    return f"job.{build_id}"


class JobStore:
    def __init__(
        self, kv: Any, js: JetStreamContext, pub: JsPublisher, subjects: Subjects | None = None
    ) -> None:
        self.kv = kv
        self.js = js
        self.pub = pub
        self.subjects = subjects or Subjects()
        self.revisions: dict[int, int] = {}

    async def load(self) -> list[JobRecord]:
        """Every stored job, with the revisions to compare against from now on. Read with
        `kvread.latest`, not a KV watcher, which may say it is done before it is."""
        self.revisions.clear()
        records: list[JobRecord] = []
        bucket = self.subjects.sched_bucket
        for entry in await kvread.latest(self.js, self.kv, bucket, "job.*"):
            try:
                rec = JobRecord.from_value(codec.loads(entry.value))
            except (ValueError, KeyError, TypeError) as exc:
                # Count, record, go on without it; and keep its revision, so the job that
                # gets this build ID overwrites the junk instead of failing its create (and
                # reloading) forever.
                reject("scheduler", self.subjects, bucket, repr(exc), key=entry.key)
                with contextlib.suppress(ValueError):
                    self.revisions[int(entry.key.split(".", 1)[1])] = entry.revision
            else:
                records.append(rec)
                self.revisions[rec.build_id] = entry.revision
        return records

    async def save(self, build_id: int, value: dict[str, Any]) -> None:
        data = codec.dumps(value)
        last = self.revisions.get(build_id)
        subject = kv_subject(self.subjects.sched_bucket, job_key(build_id))
        try:
            revision = await self.pub.update(subject, data, last=last or 0)
        except KeyWrongLastSequenceError:
            if last is not None:
                raise
            # A create over a deleted key: kv.create writes over its delete marker (and
            # raises this again if the key lives).
            revision = await self.kv.create(job_key(build_id), data)
        self.revisions[build_id] = int(revision)

    async def delete(self, build_id: int) -> None:
        await self.pub.delete(kv_subject(self.subjects.sched_bucket, job_key(build_id)))
        self.revisions.pop(build_id, None)

    async def purge_tombstones(self, older_than_s: int = 30 * 60) -> None:
        """Deleted keys leave a marker each; drop old ones so the bucket does not grow."""
        await self.kv.purge_deletes(olderthan=older_than_s)
