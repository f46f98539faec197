"""The scheduler process: NATS at the edges of `machine.Machine`.

Every input (submission, claim, report, cancel, timer, registry sweep) takes one lock,
asks the machine for its decision and performs the effects before the next input is
looked at, so the state in memory, in KV and on the event stream move together.

Several schedulers may run: only the holder of the leader lease (`leader.Lease`) takes
inputs; the others wait as standbys and take over, from the state in KV, when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError, NotFoundError

from services.common import bus, codec, schemas
from services.common.config import Settings
from services.common.jspub import JsPublisher
from services.common.metrics import reject, serve_metrics, stream_seq_of

# The gateway's cheap build ID of a delivery; it would sit better in services/common.
from services.common.pull import Delivery, PullReader, stream_seq
from services.scheduler.effects import Effect, PublishEvent
from services.scheduler.leader import Lease, NotLeader
from services.scheduler.machine import Limits, Machine
from services.scheduler.metrics import ADMITTED, CLAIMS, LEADER, TAKEOVERS
from services.scheduler.outbox import Outbox, Saved
from services.scheduler.runners import RegistryView, RunnerInfo, read_registry
from services.scheduler.store import JobStore

log = logging.getLogger(__name__)

SUBMIT_CONSUMER = "scheduler-submit"
REPORTS_CONSUMER = "scheduler-reports"
TICK_S = 0.5
SWEEP_S = 1.0
COMPACT_S = 30.0
PURGE_TOMBSTONES_S = 600.0
FETCH_TIMEOUT_S = 1.0
# Submissions (or reports) handled as one batch: decided together, effects in one round.
FETCH_BATCH = 64
STOP_DEADLINE_S = 8.0
GRANTED = CLAIMS.labels(result="granted")
REFUSED = CLAIMS.labels(result="refused")
# Submissions and reports a leader fetched but never acked (it died) come back to the next
# leader after this; handling one takes milliseconds.
INPUT_ACK_WAIT_S = 10.0


class Scheduler:
    def __init__(
        self,
        settings: Settings,
        nc: Client,
        js: JetStreamContext,
        sched_kv: Any,
        runners_kv: Any,
        clock: Callable[[], float] = time.time,
        lease: Lease | None = None,
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.runners_kv = runners_kv
        self.clock = clock
        self.limits = Limits.from_settings(settings)
        self.machine = Machine(self.limits)
        # One publisher for the connection: record writes, events and dispatches.
        self.pub = JsPublisher(nc)
        self.store = JobStore(sched_kv, js, self.pub, settings.subjects)
        self.lease = lease
        self.outbox = Outbox(settings, nc, js, self.pub, self.store, lease.check if lease else None)
        self.lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        # The input readers by consumer name (`_puller`).
        self._pulls: dict[str, PullReader] = {}
        self._subs: list[Any] = []
        self._needs_reload = False
        self.registry_view = RegistryView(3 * settings.heartbeat_s, settings.subjects)
        # Claims wait here for `_claim_loop`; None tells it to stop.
        self._claims: asyncio.Queue[Msg | None] = asyncio.Queue()

    # --- life -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Begin acting (as the leader): take over the stored state, then take inputs."""
        s = self.settings.subjects
        self.stopping = asyncio.Event()
        await self.pub.start()
        self.machine.runners = await self._read_registry()
        async with self.lock:
            await self._reload()
        submit = (s.submit_stream, SUBMIT_CONSUMER, s.submit)
        reports = (s.reports_stream, REPORTS_CONSUMER, s.reports_all)
        self._pulls = {}
        for spec in (submit, reports):
            await self._puller(*spec)
        self._claims = asyncio.Queue()
        self._subs = [
            await self.nc.subscribe(s.claim, cb=self._on_claim),
            await self.nc.subscribe(s.control_cancel, cb=self._on_cancel),
        ]
        self.tasks = [
            asyncio.create_task(self._pull_loop(submit, self._on_submissions), name="submissions"),
            asyncio.create_task(self._pull_loop(reports, self._on_reports), name="reports"),
            asyncio.create_task(self._claim_loop(), name="claims"),
            asyncio.create_task(self._timer_loop(), name="timers"),
            asyncio.create_task(self._registry_loop(), name="registry"),
        ]
        log.info("scheduler started", extra={"active_jobs": len(self.machine.jobs)})

    async def stand_down(self) -> None:
        """Stop taking inputs and let the one in flight finish (or be fenced off); the
        connection stays, for a standby that may lead again later."""
        self.stopping.set()
        # Claims and cancels first: from now on nobody answers them (NoResponders), and
        # the claims already queued are answered before `_claim_loop` ends.
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []
        self._claims.put_nowait(None)
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=STOP_DEADLINE_S / 2)
            for task in pending:
                task.cancel()
        self.tasks = []
        async with self.lock:
            # Whoever held it has finished performing its effects. Next time we lead, the
            # state is read from KV again: another leader may have changed it.
            self._needs_reload = True
        # A pull request may still be open on the server; nobody will read its late
        # deliveries. Unacked messages come back to whoever leads next anyway.
        for puller in self._pulls.values():
            await puller.stop()
        self._pulls = {}

    async def stop(self) -> None:
        """Stop taking work, let the in-flight input finish its writes, drain NATS."""
        await self.stand_down()
        await self.pub.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), STOP_DEADLINE_S / 2)
        log.info("scheduler stopped")

    def healthy(self) -> bool:
        return self.nc.is_connected and all(not t.done() for t in self.tasks)

    # --- applying decisions ---------------------------------------------------------------
    async def _perform(self, effects: list[Effect]) -> int:
        """Perform in order; on a failure, reload from KV (memory may be ahead of it) and
        return how many were done. Call with the lock held."""
        return (await self._perform_all([effects]))[0]

    async def _perform_all(
        self, batches: list[list[Effect]], saved: list[Saved | None] | None = None
    ) -> list[int]:
        """`_perform` for the effect lists of several inputs, independent ones concurrently
        (`Outbox.perform_all`); how many effects of each list were done."""
        results = await self.outbox.perform_all(batches, self.machine, saved)
        done: list[int] = []
        logged = False
        for result in results:
            if isinstance(result, int):
                done.append(result)
                continue
            done.append(result.done)
            self._needs_reload = True
            if logged:
                continue  # the lists after a failed one in its lane say the same
            logged = True
            if isinstance(result.__cause__, NotLeader):
                log.warning("write refused: no longer the leader", extra={"done": result.done})
            else:
                log.error("effect failed; state will be reloaded", exc_info=result.__cause__)
        return done

    async def _ready(self) -> bool:
        """Memory matches KV (reloading it if a write failed). Call with the lock held."""
        if self._needs_reload:
            await self._reload()
        return not self._needs_reload

    async def _decide(self, decide: Callable[[float], list[Effect]]) -> bool:
        return (await self._decide_all([decide]))[0]

    async def _decide_all(self, decides: list[Callable[[float], list[Effect]]]) -> list[bool]:
        """Several inputs under one lock: every decision first (in order, as if one by
        one), then one round of effects; which inputs had all their effects done."""
        async with self.lock:
            if not await self._ready():
                return [False] * len(decides)
            now = self.clock()
            batches = [decide(now) for decide in decides]
            done = await self._perform_all(batches)
        pairs = list(zip(done, batches, strict=True))
        # After a failure memory was ahead of KV, so a decision to do nothing may have been
        # taken on wrong grounds: that input too comes back, to be decided after the reload.
        failed = any(d < len(effects) for d, effects in pairs)
        return [d == len(effects) and not (failed and not effects) for d, effects in pairs]

    async def _reload(self) -> None:
        """Take over the stored state (at start, or after a failed write). Lock held."""
        try:
            records = await self.store.load()
            floor = await self._submit_ack_floor()
        except Exception:
            log.exception("state reload failed; will retry")
            self._needs_reload = True
            return
        runners = self.machine.runners
        self.machine = Machine(self.limits)
        self.machine.runners = runners
        self._needs_reload = False
        effects = self.machine.load(records, floor, self.clock())
        await self._perform(effects)

    async def _submit_ack_floor(self) -> int:
        s = self.settings.subjects
        try:
            info = await self.js.consumer_info(s.submit_stream, SUBMIT_CONSUMER)
        except NotFoundError:
            return 0
        return int(info.ack_floor.stream_seq) if info.ack_floor else 0

    # --- inputs ---------------------------------------------------------------------------
    def _reject(self, msg: Msg | Delivery, error: Exception) -> None:
        subjects = self.settings.subjects
        reject("scheduler", subjects, msg.subject, error, stream_seq=stream_seq_of(msg))

    async def _puller(self, stream: str, durable: str, subject: str) -> PullReader:
        """A started `PullReader` on an input's durable consumer, created if missing (an
        existing one keeps its settings); kept in `_pulls` for `stand_down` to stop."""
        try:
            await self.js.consumer_info(stream, durable)
        except NotFoundError:
            config = ConsumerConfig(
                name=durable,
                durable_name=durable,
                filter_subject=subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=INPUT_ACK_WAIT_S,
            )
            try:
                await self.js.add_consumer(stream, config)
            except BadRequestError:
                await self.js.consumer_info(stream, durable)  # made meanwhile: fine
        puller = PullReader(self.nc, stream, durable, batch=FETCH_BATCH, expires_s=FETCH_TIMEOUT_S)
        await puller.start()
        self._pulls[durable] = puller
        return puller

    async def _pull_loop(
        self, spec: tuple[str, str, str], handle: Callable[[list[Delivery]], Any]
    ) -> None:
        """Inputs in batches, from `pull.PullReader` (why not nats-py's `fetch`: there)."""
        puller: PullReader | None = self._pulls[spec[1]]
        while not self.stopping.is_set():
            try:
                if puller is None:
                    puller = await self._puller(*spec)
                msgs = await puller.fetch(FETCH_TIMEOUT_S)
            except Exception:
                # NATS is away for a moment, or the consumer is gone: the durable consumer
                # keeps our place (or is made again), the inbox is subscribed afresh.
                log.warning("fetch failed", exc_info=True)
                if puller is not None:
                    await puller.stop()
                puller = None
                await asyncio.sleep(FETCH_TIMEOUT_S)
                continue
            if not msgs:
                continue
            try:
                await handle(msgs)
            except Exception:
                log.exception("handling failed", extra={"subject": msgs[0].subject})
                for msg in msgs:
                    # (One already acked ignores the nak.)
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=1)

    async def _on_submissions(self, msgs: list[Delivery]) -> None:
        """A fetched batch of submissions: admitted together (`_decide_all`), each acked
        once its own effects are done, naked (to come back) otherwise."""
        valid: list[tuple[Delivery, int, dict[str, Any]]] = []
        for msg in msgs:
            build_id = stream_seq(msg)
            try:
                message = schemas.decode("submit_message", msg.data)
            except schemas.SchemaError as exc:
                self._reject(msg, exc)
                self.machine.note_submission(build_id)
                await msg.term()
                continue
            valid.append((msg, build_id, message))
        admitted: dict[int, bool] = {}

        def admitter(build_id: int, message: dict[str, Any]) -> Callable[[float], list[Effect]]:
            def admit(now: float) -> list[Effect]:
                effects = self.machine.admit(build_id, message, now)
                admitted[build_id] = bool(effects)
                return effects

            return admit

        if not valid:
            return
        results = await self._decide_all([admitter(b, m) for _, b, m in valid])
        for (msg, build_id, _), ok in zip(valid, results, strict=True):
            if ok:
                if admitted.get(build_id):
                    ADMITTED.inc()
                    # Per job, so debug: the job's IN-PROGRESS event says it too.
                    log.debug("job admitted", extra={"build_id": build_id})
                await msg.ack()
            else:
                await msg.nak(delay=1)

    async def _on_reports(self, msgs: list[Delivery]) -> None:
        valid: list[tuple[Delivery, dict[str, Any]]] = []
        for msg in msgs:
            try:
                valid.append((msg, schemas.decode("report", msg.data)))
            except schemas.SchemaError as exc:
                self._reject(msg, exc)
                await msg.term()
        if not valid:
            return

        def reporter(report: dict[str, Any]) -> Callable[[float], list[Effect]]:
            return lambda now: self.machine.report(report, now)

        results = await self._decide_all([reporter(r) for _, r in valid])
        for (msg, _), ok in zip(valid, results, strict=True):
            if ok:
                await msg.ack()
            else:
                await msg.nak(delay=1)

    async def _on_claim(self, msg: Msg) -> None:
        # Answered by `_claim_loop`, which takes every claim waiting at once: runners that
        # ask at the same moment are granted in one round of effects.
        self._claims.put_nowait(msg)

    async def _claim_loop(self) -> None:
        claims = self._claims
        while True:
            taken = [await claims.get()]
            while not claims.empty():
                taken.append(claims.get_nowait())
            msgs = [msg for msg in taken if msg is not None]
            if msgs:
                try:
                    await self._on_claims(msgs)
                except Exception:
                    # Unanswered, the runners nak their messages and ask again.
                    log.exception("claim handling failed")
            if None in taken:
                return  # stand_down

    async def _on_claims(self, msgs: list[Msg]) -> None:
        requests: list[tuple[Msg, dict[str, Any]]] = []
        for msg in msgs:
            try:
                requests.append((msg, schemas.decode("claim", msg.data)))
            except schemas.SchemaError as exc:
                self._reject(msg, exc)
        if not requests:
            return
        answered: set[int] = set()

        def answer_when_saved(index: int, reply: dict[str, Any]) -> Saved:
            async def saved() -> None:
                # The grant is stored (compare-and-set won): answer now, while its WORKING
                # event is in flight. The runner may start at once; that event still
                # reaches the stream before any later one of the job (its report waits for
                # this lock), and if it fails the state is reloaded and `load` publishes
                # it again from the record before the next input is decided.
                answered.add(index)
                await self._answer(*requests[index], reply)

            return saved

        async with self.lock:
            if not await self._ready():
                return  # no answer: the runners nak their messages and ask again
            now = self.clock()
            decided = [self.machine.claim(request, now) for _, request in requests]
            saved: list[Saved | None] = [
                answer_when_saved(i, reply) if reply["granted"] and effects else None
                for i, (reply, effects) in enumerate(decided)
            ]
            done = await self._perform_all([effects for _, effects in decided], saved)
        failed = any(d < len(effects) for d, (_, effects) in zip(done, decided, strict=True))
        for index, ((msg, request), (reply, effects)) in enumerate(
            zip(requests, decided, strict=True)
        ):
            if index in answered or effects:
                # Answered once its grant was stored; or the assignment never reached KV:
                # the runner must not start, and must not drop the message either (a
                # refusal would), so it hears nothing and asks again.
                continue
            if failed:
                # Decided on a memory that was ahead of KV (another claim of the batch
                # failed): a refusal might be wrong. Unanswered, it is asked again.
                continue
            await self._answer(msg, request, reply)

    async def _answer(self, msg: Msg, request: dict[str, Any], reply: dict[str, Any]) -> None:
        (GRANTED if reply["granted"] else REFUSED).inc()
        if not reply["granted"] or log.isEnabledFor(logging.DEBUG):
            # A grant is the job's WORKING event (runner_id, started_at) already: per job,
            # at debug. A refusal is the unusual case worth a line.
            log.log(
                logging.DEBUG if reply["granted"] else logging.INFO,
                "claim",
                extra={
                    "build_id": request["build_id"],
                    "runner_id": request["runner_id"],
                    "granted": reply["granted"],
                    "reason": reply.get("reason"),
                },
            )
        try:
            await msg.respond(codec.dumps(reply))
        except Exception:
            # Unanswered, the runner asks again and gets the same answer.
            log.warning("claim answer failed", exc_info=True)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            request = schemas.decode("cancel_request", msg.data)
        except schemas.SchemaError as exc:
            self._reject(msg, exc)
            return
        async with self.lock:
            if not await self._ready():
                return  # the gateway times out and says the scheduler is unavailable
            reply, effects = self.machine.cancel(request, self.clock())
            await self._perform(effects)
        log.info("cancel", extra={"build_id": request["build_id"], "ok": reply["ok"]})
        if msg.reply:
            await msg.respond(codec.dumps(reply))

    # --- timers ---------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self._decide(self.machine_tick)
            except Exception:
                log.exception("timer tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), TICK_S)

    def machine_tick(self, now: float) -> list[Effect]:
        return self.machine.tick(now)

    async def _registry_loop(self) -> None:
        last_compact = last_purge = self.clock()
        while not self.stopping.is_set():
            try:
                await self.sweep_registry()
                if self.clock() - last_compact >= COMPACT_S:
                    last_compact = self.clock()
                    await self.compact()
                if self.clock() - last_purge >= PURGE_TOMBSTONES_S:
                    last_purge = self.clock()
                    await self.store.purge_tombstones()
            except Exception:
                log.warning("registry sweep failed", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), SWEEP_S)

    async def _read_registry(self) -> dict[str, RunnerInfo]:
        bucket = self.settings.subjects.runners_bucket
        return await read_registry(self.js, self.runners_kv, bucket, self.registry_view.bad_entry)

    async def sweep_registry(self) -> None:
        try:
            read = await self._read_registry()
        except Exception:
            self.registry_view.failed()
            raise
        runners = self.registry_view.judge(read, self.clock(), self.nc.stats["reconnects"])

        def observe(now: float) -> list[Effect]:
            effects = self.machine.observe_runners(runners, now)
            for effect in effects:
                if isinstance(effect, PublishEvent) and effect.payload["reason"] == "runner-lost":
                    log.warning(
                        "runner lost",
                        extra={
                            "build_id": effect.build_id,
                            "runner_id": effect.payload["runner_id"],
                            "registry": ",".join(sorted(runners)),
                        },
                    )
            return effects

        await self._decide(observe)

    async def compact(self) -> None:
        floor = await self._submit_ack_floor()
        await self._decide(lambda _now: self.machine.compact(floor))


async def run(
    settings: Settings, metrics_port: int | None, stop: asyncio.Event | None = None
) -> int:
    """`xoogify scheduler`: run until SIGTERM/SIGINT (or until `stop` is set, for tests);
    the exit code.

    Standby until this process holds the leader lease, lead until it is lost, standby
    again; on stop, finish the input in flight, then release the lease so a standby takes
    over at once rather than after the TTL. If NATS loses its store (its buckets are
    gone), stop the same way and return STORE_LOST_EXIT: started again, it makes them anew.
    """
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    nc = await bus.until_done("connect", lambda: bus.connect(settings, "scheduler"), stop)
    if nc is None:
        return 0
    js = nc.jetstream()
    s = settings.subjects
    replicas = settings.stream_replicas

    async def set_up() -> tuple[Any, Any, Any, float]:
        await bus.ensure_streams(js, settings, waits_for=(s.submit_stream, s.events_stream))
        leader_kv = await bus.ensure_kv(
            js, s.leader_bucket, ttl=settings.leader_ttl_s, replicas=replicas
        )
        return (
            await bus.ensure_kv(js, s.sched_bucket, replicas=replicas),
            await bus.ensure_kv(
                js, s.runners_bucket, ttl=3 * settings.heartbeat_s, replicas=replicas
            ),
            leader_kv,
            # The bucket's TTL is the lease's, whatever this process was configured with.
            (await leader_kv.status()).ttl or settings.leader_ttl_s,
        )

    buckets = await bus.until_done("streams and buckets", set_up, stop)
    if buckets is None:
        await nc.close()
        return 0
    sched_kv, runners_kv, leader_kv, ttl = buckets
    lease = Lease(leader_kv, ttl)
    scheduler = Scheduler(settings, nc, js, sched_kv, runners_kv, lease=lease)
    server = None
    if metrics_port:
        server = await serve_metrics(
            metrics_port,
            scheduler.healthy,
            details=lambda: {"leader": lease.held(), "holder": lease.holder},
            host=settings.metrics_host,
        )
    log.info("scheduler standby", extra={"holder": lease.holder, "lease_ttl_s": ttl})
    own = (f"KV_{s.sched_bucket}", f"KV_{s.leader_bucket}")
    lost = asyncio.create_task(bus.until_store_lost(js, own), name="store")
    lost.add_done_callback(lambda _task: stop.set())
    try:
        while await lease.acquire(stop):
            LEADER.set(1)
            TAKEOVERS.inc()
            log.info("scheduler leads", extra={"holder": lease.holder, "lease": lease.revision})
            await _lead(scheduler, lease, stop)
            LEADER.set(0)
            await scheduler.stand_down()
            if stop.is_set():
                break
            log.warning("scheduler lease lost; standby", extra={"holder": lease.holder})
    finally:
        store_lost = lost.done()
        lost.cancel()
        LEADER.set(0)
        await scheduler.stand_down()
        await lease.release()
        await scheduler.stop()
        if server is not None:
            server.close()
    with contextlib.suppress(asyncio.CancelledError):
        await lost
    return bus.STORE_LOST_EXIT if store_lost else 0


async def _lead(scheduler: Scheduler, lease: Lease, stop: asyncio.Event) -> None:
    """One term: until stop is set or the lease is lost. The lease is renewed from the
    start (taking over the state may take seconds while NATS fails over); a term that
    cannot start ends, and the lease is competed for again; a side task that ends first
    is a bug."""
    holder = asyncio.create_task(lease.hold(stop), name="lease")
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        try:
            await scheduler.start()
        except Exception:
            log.exception("scheduler could not start leading")
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder  # no renew may land after the release
            await lease.release()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), lease.times.poll_every_s)
            return
        done, _ = await asyncio.wait(
            [stopper, holder, *scheduler.tasks], return_when=asyncio.FIRST_COMPLETED
        )
        for task in done:
            if task not in (stopper, holder) and task.exception() is not None:
                raise RuntimeError(f"scheduler task {task.get_name()} died") from task.exception()
    finally:
        stopper.cancel()
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder  # a renew in flight would make the release miss its revision
