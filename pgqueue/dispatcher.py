"""The dispatcher: wake, claim only what local slots allow (and, while that costs
nothing, a batch ahead: Dispatcher._ahead), send, complete.

One dispatcher per worker process. It owns the process's *lock connection*: claims run
there, so the conversation advisory locks they take (G1, G9) belong to this process's
session and vanish with it. Its loop works in turns, one transaction each
(queries.cycle, under the queue lock): the locks of the sends that finished since the
last turn are dropped and the slots they freed claimed again. Their outcomes are then
written by the *completer*, on a second connection, without the queue lock (no row a
claim writes changes), while the next turn's claim runs: the two halves of the work, and
this process's own, use the machine's cores side by side instead of taking turns. An
outcome that pauses a tenant or the queue is written by the turn itself, under the lock.

A lost lock connection (network blip, database restart) does not lose anything: sends
in flight keep going, their outcomes wait in memory, and once reconnected the dispatcher
takes its locks back and writes them. Rescuers give a restarted server a grace period
(queries.sql: find_orphans) so that this happens before anyone re-sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgqueue import queries
from pgqueue.completion import decide, decide_lost, expired
from pgqueue.db import connect, connection_lost
from pgqueue.errors import first_line
from pgqueue.logs import DeferredJobLog
from pgqueue.models import Job, Outcome
from pgqueue.providers import Provider, SlotMissed, slot_deadline

log = logging.getLogger("pgqueue.dispatcher")

RECONNECT_MAX_S = 1.0
# A send may start at most this long after its rate slot; later, it takes a new slot. Of
# the 22.5 ms of jitter pacing tolerates (queries.RATE_HEADROOM): the check sits in the
# step that writes the request (providers.twilio._OnSlot), so what is left covers the
# write itself and a process descheduled right there.
MAX_LATE_S = 0.015
# A provider that waits for the slot at the wire (providers.wait_for_slot) is woken this
# long before it, to build its request meanwhile (the Twilio SDK takes a few ms of CPU,
# and a busy worker has several sends' worth to build around each slot).
SLOT_LEAD_S = 0.02
# A slot this far ahead comes from a provider pause (claims hand out slots at most
# lookahead_s ahead, reslots of every send in flight a few hundred ms); it is taken again
# when it comes near, so that a pause committed meanwhile applies to it too.
FAR_SLOT_S = 0.5
# The completer starts at the latest this long after a turn handed it outcomes.
COMPLETER_DELAY_S = 0.002
# Between paced turns, sends that finish are gathered this long before their locks are
# dropped and their outcomes handed to the completer (Dispatcher._paced_gap).
RELEASE_GATHER_S = 0.005
# Weight of the newest sample in the running means of send and turn durations: about
# the last ten count, so a provider slowing down stops claiming ahead within a turn or two.
EWMA_WEIGHT = 0.2


@dataclass(frozen=True)
class DispatcherConfig:
    queue: str = "whatsapp-send"
    concurrency: int = 20
    # A claim and a completion transaction serve up to this many sends.
    batch_size: int = 20
    # Up to this many jobs may be claimed beyond the free local slots (and beyond one
    # batch), to wait for one there, so that the next claim runs while the current
    # sends finish; only while that costs nothing (Dispatcher._ahead). 0: never.
    claim_ahead: int = 20
    lease_s: float = 60.0
    # How far ahead of its start a rate slot may be handed out (see claim_jobs). Short,
    # because a job waiting for its slot holds a concurrency slot meanwhile; not much
    # shorter, because a tenant's slot can only be claimed between lookahead_s and
    # queries.SLOT_MARGIN_S ahead, and a claim after that window starts it late (the
    # slot is lost). bench/senders.py, a 50/s sender allowed 10 in flight: 0.74 of its
    # rate at 0.05 (its sends spent 45 of 215 ms in flight waiting for their slots),
    # 0.84 at 0.035, 0.77 at 0.03 (a window of 10 ms, half a paced turn gap).
    lookahead_s: float = 0.035
    # While claims come back short because rates bind, a turn runs at most this often:
    # a turn costs the server about 1.2 ms whatever it claims, and one for every send
    # that finished claimed one job a turn (bench/senders.py: 450 turns/s for 300 sends/s
    # with 45 paced senders). A finished send waits at most this long for its lock to be
    # dropped; slots are handed out `lookahead_s` ahead, so none is lost meanwhile.
    paced_turn_gap_s: float = 0.02
    poll_interval_s: float = 1.0
    send_timeout_s: float = 30.0
    backoff_ms: int = 2000
    # Cut so that "pgqueue-worker:<id>" fits PostgreSQL's 63 bytes of application_name:
    # the rescuer recognises a live worker by that name, and a truncated one never matches.
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()[:32]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    )

    @property
    def application_name(self) -> str:
        return f"pgqueue-worker:{self.worker_id}"


@dataclass
class _InFlight:
    job: Job
    task: asyncio.Task[None] | None = None
    outcome: Outcome | None = None


@dataclass
class DispatcherStats:
    claimed: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    expired: int = 0
    released: int = 0
    fenced: int = 0
    reconnects: int = 0
    reslotted: int = 0
    largest_claim: int = 0


class Dispatcher:
    def __init__(self, url: str, provider: Provider, config: DispatcherConfig) -> None:
        self.url = url
        self.provider = provider
        self.config = config
        self.stats = DispatcherStats()
        self._conn: queries.Conn | None = None
        self._conn_lock = asyncio.Lock()
        self._in_flight: dict[int, _InFlight] = {}
        self._done: list[_InFlight] = []
        # Finished sends whose locks are dropped, for the completer to write.
        self._to_complete: list[_InFlight] = []
        self._completing: dict[int, _InFlight] = {}
        self._completer: asyncio.Task[None] | None = None
        self._completer_conn: queries.Conn | None = None
        self._closed = False
        # Set by a wake-up (NOTIFY), a finished send, or stop: the loop has work.
        self._attention = asyncio.Event()
        # Set with _attention when a send finishes; the paced gap waits for it alone.
        self._finished = asyncio.Event()
        self._claiming = True
        self._on_reconnect: list[Callable[[], Awaitable[None]]] = []
        # Jobs whose conversation lock could not be taken back after a lost lock
        # connection: no longer provably ours, so a send not started yet never starts.
        self._lost: set[int] = set()
        self._paused_until = 0.0  # epoch s; set by a provider's 429
        # (tenant, missed slot or None, the new slot's future)
        self._reslot_waiters: list[tuple[str, float | None, asyncio.Future[float]]] = []
        self._reslot_task: asyncio.Task[None] | None = None
        self._job_log = DeferredJobLog()
        self._lead = SLOT_LEAD_S if getattr(provider, "waits_for_slot", False) else 0.0
        # The local limit (--concurrency) holds for sends, not for claims: jobs claimed
        # ahead wait here.
        self._sending = asyncio.Semaphore(config.concurrency)
        # Running means (s) of a send and of a turn, and what the last claim said: a
        # late start cannot break the rate (late_ok), the global slots it left free.
        # When to claim ahead (_ahead).
        self._send_s = math.inf
        self._turn_s = math.inf
        self._late_ok = False
        self._global_free = 0
        self._timed_conn: queries.Conn | None = None
        # When the next rate slot of each tenant with a rate of its own that this worker
        # served opens (epoch s): with the queue's rate not binding, nothing else wakes
        # this worker for them.
        self._tenant_next: dict[str, float] = {}

    # -- the lock connection -------------------------------------------------------------

    async def _connection(self) -> queries.Conn:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        delay = 0.05
        while True:
            try:
                self._conn = await connect(
                    self.url,
                    application_name=self.config.application_name,
                    generic_plans=True,
                    primary=True,
                )
                break
            except psycopg.OperationalError as e:
                log.warning("lock connection: cannot connect (%s); retrying", first_line(e))
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
        self.stats.reconnects += 1
        if self._in_flight:
            await self._retake_locks(self._conn)
        if self.stats.reconnects > 1:
            await self._release_unknown(self._conn)
        for hook in self._on_reconnect:
            await hook()
        return self._conn

    async def _retake_locks(self, conn: queries.Conn) -> None:
        tokens = [f.job.claim_token for f in self._in_flight.values()]
        rows = await queries.fetch_all(conn, "retake_locks", {"tokens": tokens})
        lost = len(tokens) - sum(1 for r in rows if r["locked"])
        # Rescued meanwhile, or its claim never reached the node that took over (an
        # asynchronous failover): someone else may send it; ours must not start.
        self._lost |= set(self._in_flight) - {r["id"] for r in rows if r["locked"]}
        log.warning(
            "lock connection re-established: %d conversation locks taken back, %d lost",
            len(tokens) - lost,
            lost,
        )

    async def _release_unknown(self, conn: queries.Conn) -> None:
        """Hands back the jobs active under this worker's name with a token it does not
        hold (queries.sql: unknown_claims), as a rescuer would, without waiting for their
        lease: this worker is alive, so no rescuer takes them sooner."""
        rows = await queries.fetch_all(
            conn,
            "unknown_claims",
            {
                "queue": self.config.queue,
                "worker": self.config.worker_id,
                "tokens": self.claim_tokens(),
            },
        )
        if not rows:
            return
        decided = [
            (
                r,
                decide_lost(
                    attempts=r["attempts"],
                    max_attempts=r["max_attempts"],
                    code="claim-lost",
                    message="its claim or outcome was lost with the database connection",
                ),
            )
            for r in rows
        ]
        applied = await queries.complete_jobs(
            conn,
            queue=self.config.queue,
            outcomes=[d.as_row(r["id"], r["claim_token"]) for r, d in decided],
            conversations=[r["conversation"] for r, d in decided if d.kind == "failed"],
        )
        log.warning(
            "%d job(s) active under this worker but unknown to it (claim or outcome lost "
            "with the connection) handed back: %s",
            len(applied),
            ", ".join(str(r["id"]) for r in applied),
        )

    def on_reconnect(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` after the lock connection was replaced (session locks are gone)."""
        self._on_reconnect.append(hook)

    async def with_connection(self, fn: Callable[[queries.Conn], Awaitable[Any]]) -> Any:
        """Run `fn` on the lock connection (serialised with claims and completions),
        reconnecting and retrying while the database is unreachable."""
        while True:
            async with self._conn_lock:
                conn = await self._connection()
                try:
                    return await fn(conn)
                except psycopg.errors.TransactionRollback:
                    # A deadlock or serialization failure: the statement failed, the
                    # connection and its conversation locks are fine. The caller retries.
                    raise
                except psycopg.Error as e:
                    # A node in recovery (a failover left this connection on a standby)
                    # can never take the claim: like a lost connection, drop it.
                    if not connection_lost(e):
                        raise
                    log.warning("lock connection lost: %s", first_line(e))
                    with contextlib.suppress(Exception):
                        await conn.close()
                    self._conn = None
            await asyncio.sleep(0.05)

    # -- claiming ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def unanswered_by_tenant(self) -> dict[str, int]:
        """Jobs claimed (sending or claimed ahead) without an answer yet, per tenant:
        what this worker's claims count against each tenant's limit (G2)."""
        done = {e.job.id for e in self._done}
        return Counter(e.job.tenant_id for e in self._in_flight.values() if e.job.id not in done)

    def claim_tokens(self) -> list[uuid.UUID]:
        """Tokens of the jobs still active under this worker: sending, or finished with
        their outcomes not yet committed."""
        entries = [*self._in_flight.values(), *self._completing.values()]
        return [f.job.claim_token for f in entries]

    def _want(self, freed: int = 0) -> int:
        """How many jobs to claim now: the free local slots, counting `freed` finished
        sends whose locks the same turn drops, at most one batch; and, while claiming
        ahead (`_ahead`), that many more: a turn costs the server about 1.2 ms of CPU
        whatever it claims, and each job about 0.11 ms more (bench/turn_cost.py: 3.3 ms
        a turn of 20, 5.6 ms of 40), so when sends are fast the bigger claims are where
        claiming ahead gains most."""
        if not self._claiming:
            return 0
        ahead = self._ahead()
        free = self.config.concurrency + ahead - len(self._in_flight) + freed
        return max(min(free, self.config.batch_size + ahead), 0)

    def _ahead(self) -> int:
        """How many jobs to claim beyond the free local slots. A job claimed ahead is
        active (counted in flight by every limit, G2 and G3) and waits here for a local
        slot, so the next claim overlaps the current sends instead of following them.
        Only while that costs nothing: sends finish faster than a turn (the job waits
        less than the claim it saves, and holds its tenant's slot no longer); the rate
        is so far above what can be in flight that its start may come late (late_ok:
        claim_jobs in queries.sql; not for a tenant with a rate of its own); and the
        last claim left at least twice `claim_ahead` global slots free, so claiming
        ahead never takes the last ones another worker could send with now. With a provider
        taking 150 ms at 80/s, never. The last claim's word counts: a change of the
        limits shows from the next claim on."""
        ahead = self.config.claim_ahead
        known = not math.isinf(self._turn_s)
        if (
            known
            and self._late_ok
            and self._global_free >= 2 * ahead
            and self._send_s < self._turn_s
        ):
            return ahead
        return 0

    async def turn(self) -> queries.CycleResult:
        """One turn of the loop, in one transaction: drop the locks of the sends that
        finished since the last turn and count them out of the limits (writing here only
        the outcomes that pause a tenant or the queue; the completer writes the others
        once the locks are gone), then claim what the freed slots (and any others)
        allow, and start those sends."""
        batch, self._done = self._done, []
        here = [e for e in batch if e.outcome is not None and e.outcome.needs_queue_lock]
        written_here = {e.job.id for e in here}
        outcomes = self._outcomes(here)
        claim = queries.Claim(
            worker_id=self.config.worker_id,
            max_jobs=self._want(freed=len(batch)),
            lease_s=self.config.lease_s,
            lookahead_s=self.config.lookahead_s,
            # Finished, or handed to the completer and not yet written: in flight no
            # more (G2, G3), so this claim may use their places.
            answered=[e.job.claim_token for e in (*batch, *self._completing.values())],
        )
        release = [e.job.lock_key for e in batch if e.job.locked]

        async def turn(conn: queries.Conn) -> queries.CycleResult:
            began = time.perf_counter()
            result = await queries.cycle(
                conn,
                queue=self.config.queue,
                outcomes=outcomes,
                release=release,
                claim=claim,
                notify=self.config.worker_id,
                on_sent=self._while_the_server_works,
            )
            # Timed on the connection only, and not the first turn of a connection: a new
            # backend plans every statement and compiles the claim's functions, tens of
            # ms once, and a mean seeded with that claimed ahead of slow sends for turns.
            if conn is self._timed_conn:
                self._turn_s = _ewma(self._turn_s, time.perf_counter() - began)
            self._timed_conn = conn
            return result

        try:
            result: queries.CycleResult = await self.with_connection(turn)
        except BaseException:
            self._done[:0] = batch  # written by the next turn
            raise
        if outcomes.throttle_s:
            # Committed: from now on no worker is handed a slot inside the pause.
            log.warning(
                "queue %s paused for %.1f s: the provider asked to slow down",
                self.config.queue,
                outcomes.throttle_s,
            )
        mine = {r["id"] for r in result.applied}
        for entry in batch:
            if entry.job.id in written_here:
                self._in_flight.pop(entry.job.id, None)
                self._log_outcome(entry, entry.job.id in mine)
            else:
                self._hand_over(entry)
        if self._to_complete:
            # Started by the next turn once its statements are out, so that its Python
            # work overlaps that turn's wait for the server; or a moment later.
            asyncio.get_running_loop().call_later(COMPLETER_DELAY_S, self._start_completer)
        jobs = [Job.from_row(row) for row in result.claimed]
        if jobs:
            self._late_ok = all(job.late_ok for job in jobs)
            self._global_free = jobs[0].global_free
        for job in jobs:
            if job.rate_spacing is not None:
                slot = job.start_at.timestamp() + job.rate_spacing
                self._tenant_next[job.tenant_id] = max(
                    slot, self._tenant_next.get(job.tenant_id, 0)
                )
            entry = _InFlight(job)
            self._in_flight[job.id] = entry
            entry.task = asyncio.create_task(self._send(entry), name=f"send-{job.id}")
        self.stats.claimed += len(result.claimed)
        self.stats.largest_claim = max(self.stats.largest_claim, len(result.claimed))
        return result

    def wake(self) -> None:
        self._attention.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Claim, send and complete until `stop` is set; then stop claiming and return.
        The caller drains with `drain()`, which keeps writing outcomes."""

        async def on_stop() -> None:
            await stop.wait()
            self._attention.set()

        watcher = asyncio.create_task(on_stop())
        try:
            await self._loop(stop)
        finally:
            watcher.cancel()

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._attention.clear()
            wait = self.config.poll_interval_s
            want = self._want()
            if self._done or want:
                try:
                    result = await self.turn()
                except psycopg.Error as e:
                    # Not the connection (with_connection retries that): a statement
                    # failed. Nothing is lost: the outcomes wait for the next turn.
                    log.error("dispatch turn failed, retrying: %s", first_line(e))
                    await asyncio.sleep(0.1)
                    continue
                if want and len(result.claimed) >= want:
                    continue  # maybe more to claim right now
                paced = False
                if want:
                    rate_wait = result.rate_wait
                    if rate_wait is not None and rate_wait > self.config.lookahead_s / 2:
                        # Slots are handed out `lookahead_s` ahead: come back while the
                        # next one is still half of that ahead, so the send waits for its
                        # slot rather than the slot for the claim (a late start would
                        # cost the slot, G4).
                        rate_wait -= self.config.lookahead_s / 2
                    tenant_wait = self._tenant_wait()
                    for hint in (rate_wait, result.due_wait, tenant_wait):
                        if hint is not None and hint > 0:
                            wait = min(wait, hint)
                    wait = max(wait, 0.001)
                    paced = tenant_wait is not None or (rate_wait is not None and rate_wait > 0)
                    paced = paced and self.config.paced_turn_gap_s > 0
                if self._done and not paced:
                    continue  # more to write
                if paced:
                    # Wake-ups gather meanwhile for the next turn; finished sends go to
                    # the completer without one (a turn waits for the queue lock).
                    await self._paced_gap(self.config.paced_turn_gap_s)
                    wait = max(wait - self.config.paced_turn_gap_s, 0.0)
            # One event and a timer: this wait runs once per turn.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._attention.wait()

    async def _paced_gap(self, gap: float) -> None:
        """The pause between paced turns. Sends that finish meanwhile have their locks
        dropped and go to the completer at once (gathered RELEASE_GATHER_S), not at the
        next turn: until their outcomes commit, every other worker's claims count them in
        flight (G2, G3), and a sender at its concurrency limit lost the slots of that
        wait (bench/senders.py: 31 ms from an answer to its outcome's commit, median)."""
        end = time.monotonic() + gap
        while True:
            if any(e.outcome and e.outcome.needs_queue_lock for e in self._done):
                return  # a pause to write: the turn does that now
            if self._done:
                try:
                    await self._release_finished()
                except psycopg.Error as e:
                    # Nothing is lost: the next turn drops these locks.
                    log.error("dropping finished sends' locks failed: %s", first_line(e))
                    return
            left = end - time.monotonic()
            if left <= 0:
                return
            self._finished.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self._finished.wait()
                # Sends finish in bunches (a claim's start together): one statement each.
                await asyncio.sleep(max(min(RELEASE_GATHER_S, end - time.monotonic()), 0))

    async def _release_finished(self) -> None:
        """Drop the locks of the finished sends whose outcomes need no queue lock and hand
        them to the completer; the others wait for the next turn."""
        batch = [e for e in self._done if e.outcome and not e.outcome.needs_queue_lock]
        if not batch:
            return
        taken = {id(e) for e in batch}
        self._done = [e for e in self._done if id(e) not in taken]
        release = [e.job.lock_key for e in batch if e.job.locked]
        try:
            if release:
                await self.with_connection(lambda conn: queries.release_locks(conn, release))
        except BaseException:
            self._done[:0] = batch  # dropped by the next turn
            raise
        for entry in batch:
            self._hand_over(entry)
        self._start_completer()

    def _hand_over(self, entry: _InFlight) -> None:
        """A finished send whose lock is dropped: the completer writes its outcome."""
        self._in_flight.pop(entry.job.id, None)
        self._completing[entry.job.id] = entry
        self._to_complete.append(entry)

    def _tenant_wait(self) -> float | None:
        """Seconds until the first of the served tenants' next slots is half a lookahead
        ahead (claimable, with time to spare, as the queue's slots are claimed); at least
        half a lookahead, though: with many tenants a slot opens every few ms, and a turn
        each time would spend the CPU the sends need, while a claim every half lookahead
        still takes every slot before it is due."""
        now = time.time()
        self._tenant_next = {t: s for t, s in self._tenant_next.items() if s > now}
        if not self._tenant_next:
            return None
        half = self.config.lookahead_s / 2
        return max(min(self._tenant_next.values()) - now - half, half)

    async def drain(self, timeout: float) -> int:
        """Stop claiming; let sends in flight finish (at most `timeout` seconds) and write
        their outcomes. Sends still running after that are cancelled and their jobs
        released (not counted as an attempt), so nothing is lost. Returns how many were
        cut short."""
        self._claiming = False
        tasks = [f.task for f in self._in_flight.values() if f.task is not None]
        cut = 0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            cut = len(pending)
            if pending:
                await asyncio.wait(pending)
        # Outcomes are written while the database answers; if it stays away, give up
        # after a while: the jobs stay active and the rescuer sends them again later.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._write_remaining(), timeout=timeout + 10.0)
        unwritten = len(self._in_flight) + len(self._completing)
        if unwritten:
            log.error(
                "%d outcome(s) could not be written before exit; those jobs will be "
                "rescued and sent again",
                unwritten,
            )
        return cut

    async def _write_remaining(self) -> None:
        while self._done or self._to_complete or self._completer is not None:
            if self._done:
                try:
                    await self.turn()
                except psycopg.Error as e:
                    log.error("writing outcomes failed, retrying: %s", first_line(e))
                    await asyncio.sleep(0.1)
                    continue
            await self.wait_completed()

    async def close(self) -> None:
        self._closed = True
        if self._completer is not None:
            self._completer.cancel()
            with contextlib.suppress(BaseException):
                await self._completer
        self._job_log.flush()
        for conn in (self._conn, self._completer_conn):
            if conn is not None:
                await conn.close()
        self._conn = self._completer_conn = None

    # -- sending -------------------------------------------------------------------------

    async def _send(self, entry: _InFlight) -> None:
        job = entry.job
        try:
            if not job.locked:
                # Another session still holds this conversation (a wedged worker whose
                # lease ran out): sending now could overlap its send. Give the job back.
                entry.outcome = Outcome("release", code="conversation-busy")
                return
            async with self._sending:
                entry.outcome = await self._send_now(job)
            if entry.outcome.throttle_s:
                # The provider asked us to slow down: this process holds its own sends
                # at once; the others learn it when the outcome is written.
                self._paused_until = max(self._paused_until, time.time() + entry.outcome.throttle_s)
                log.warning(
                    "provider throttled job %s (Retry-After %.1f s): this worker holds its "
                    "sends; its next turn pauses the queue",
                    job.id,
                    entry.outcome.throttle_s,
                )
        except asyncio.CancelledError:
            # Cut short by a drain: the job goes back unspent; the provider may or may
            # not have taken it (at-least-once).
            entry.outcome = Outcome("release", code="worker-shutdown")
        finally:
            if entry.outcome is None:
                entry.outcome = Outcome("release", code="internal-error")
            self._lost.discard(job.id)
            self._done.append(entry)
            self._attention.set()
            self._finished.set()

    async def _send_now(self, job: Job) -> Outcome:
        """The send itself, in its rate slot and a local slot."""
        late_ok = job.late_ok
        slot = await self._wait_for_slot(job, job.start_at.timestamp())
        too_late = expired(job, time.time())
        if too_late is not None:
            return too_late
        self._job_log.add(
            "processing",
            f"processing job {job.id}",
            job_id=job.id,
            tenant=job.tenant_id,
            attempt=job.attempts,
            preview=job.preview,
        )
        result: Any
        while True:
            if job.id in self._lost:
                # Its lock was not taken back after a lost connection (_retake_locks;
                # a new slot may have reconnected): another worker may send it now.
                return Outcome("release", code="lock-lost")
            began = time.perf_counter()
            try:
                with slot_deadline(math.inf if late_ok else slot + MAX_LATE_S, start=slot):
                    async with asyncio.timeout(self.config.send_timeout_s):
                        result = await self.provider.send(job)
            except SlotMissed:
                # Nothing went out: building the request took too long. Try again in a
                # fresh slot rather than start late.
                slot = await self._wait_for_slot(job, await self._reslot(job.tenant_id, slot))
                continue
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # every failure becomes an outcome, never a loss
                result = e
            break
        self._send_s = _ewma(self._send_s, time.perf_counter() - began)
        return decide(job, result, backoff_ms=self.config.backoff_ms)

    async def _wait_for_slot(self, job: Job, start_at: float) -> float:
        """Sleep until the job's rate slot (SLOT_LEAD_S before it for a provider that
        waits for the slot at the wire) and return it; if the event loop wakes us too
        late, take a new slot rather than start late (a late start would bunch up with
        the next slots and put more than R starts into one second, G4), unless the rate
        is far enough above the global limit that lateness cannot matter (`late_ok`).
        A far slot is taken again when it comes near (a pause committed meanwhile then
        applies to it), except a slot of a tenant's own rate: far is its normal pace, and
        a new slot would only come after the tenant's next one, never nearer."""
        tenant, late_ok = job.tenant_id, job.late_ok
        while True:
            delay = start_at - self._lead - time.time()
            if delay > FAR_SLOT_S and job.rate_spacing is None:
                await asyncio.sleep(delay - self.config.lookahead_s)
                start_at = await self._reslot(tenant)
                continue
            if delay > 0:
                await asyncio.sleep(delay)
                continue  # a timer can fire early (run_loop): look at the clock again
            if time.time() < self._paused_until:
                await asyncio.sleep(self._paused_until - time.time())
                start_at = await self._reslot(tenant)
                continue
            late = time.time() - start_at
            if late_ok or late <= MAX_LATE_S:
                return start_at
            start_at = await self._reslot(tenant, start_at)

    async def _reslot(self, tenant: str, missed: float | None = None) -> float:
        """A new rate slot. Sends that miss their slots together (the process was starved
        of CPU) share one statement: the first asks, the others join its request.
        The slot is paced by the queue's rate and by the tenant's own, if it has one.
        `missed`: the slot missed (epoch s); None for a slot taken again after a provider
        pause or because it was far (FAR_SLOT_S), not a miss."""
        late = 0.0 if missed is None else time.time() - missed
        if missed is not None:
            self.stats.reslotted += 1
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._reslot_waiters.append((tenant, missed, waiter))
        if len(self._reslot_waiters) == 1:
            self._reslot_task = asyncio.create_task(self._reslot_batch(), name="reslot")
        slot = await waiter
        if missed is not None:
            log.info(
                "rate slot missed by %.1f ms; new slot in %.0f ms",
                late * 1000,
                (slot - time.time()) * 1000,
            )
        else:
            log.info("rate slot taken again; new slot in %.0f ms", (slot - time.time()) * 1000)
        return slot

    async def _reslot_batch(self) -> None:
        # Let the other sends woken in this same tick join first.
        await asyncio.sleep(0)
        waiters, self._reslot_waiters = self._reslot_waiters, []

        async def reslot(conn: queries.Conn) -> list[float]:
            return await queries.reslot(
                conn,
                queue=self.config.queue,
                tenants=[t for t, _, _ in waiters],
                missed=[m for _, m, _ in waiters],
            )

        try:
            slots: list[float] = await self.with_connection(reslot)
        except Exception as e:  # the sends waiting for the slots fail with it
            for _, _, w in waiters:
                if not w.done():
                    w.set_exception(e)
            return
        for (_, _, w), slot in zip(waiters, slots, strict=True):
            if not w.done():
                w.set_result(slot)

    # -- completing ----------------------------------------------------------------------

    def _while_the_server_works(self) -> None:
        self._start_completer()
        self._job_log.flush()

    def _start_completer(self) -> None:
        if self._to_complete and self._completer is None and not self._closed:
            self._completer = asyncio.create_task(self._complete(), name="completer")

    async def _complete(self) -> None:
        """The completer: writes the outcomes of finished sends whose locks the loop has
        dropped, a batch per transaction, on a connection of its own, until none wait."""
        try:
            while self._to_complete:
                batch = self._to_complete[: self.config.batch_size * 2]
                del self._to_complete[: len(batch)]
                try:
                    applied, unsure = await self._write_completions(batch)
                except BaseException:
                    self._to_complete[:0] = batch
                    raise
                mine = {r["id"] for r in applied}
                for entry in batch:
                    self._completing.pop(entry.job.id, None)
                    if entry.job.id in mine or not unsure:
                        self._log_outcome(entry, entry.job.id in mine)
                    else:
                        log.warning(
                            "job %s: its %s outcome was probably written before the "
                            "connection was lost (the job is no longer this worker's)",
                            entry.job.id,
                            entry.outcome.kind if entry.outcome else "unknown",
                        )
                self._job_log.flush()
                # Heads promoted or retried: this worker's next turn may claim them.
                self._attention.set()
        finally:
            self._completer = None

    async def _write_completions(self, batch: list[_InFlight]) -> tuple[list[queries.Row], bool]:
        """Writes the batch's outcomes; also says whether an earlier attempt may have
        committed them unseen (its connection was lost)."""
        outcomes = self._outcomes(batch)
        unsure = False
        while True:
            try:
                conn = await self._completer_connection()
                done = await queries.cycle(
                    conn,
                    queue=self.config.queue,
                    outcomes=outcomes,
                    notify=self.config.worker_id,
                    lock=False,
                )
                return done.applied, unsure
            except psycopg.errors.TransactionRollback as e:
                log.warning("writing outcomes failed, retrying: %s", first_line(e))
            except psycopg.Error as e:
                if not connection_lost(e):  # a statement failed; the connection is fine
                    log.error("writing outcomes failed, retrying: %s", first_line(e))
                    await asyncio.sleep(0.1)
                    continue
                # Fenced by the claim tokens, so writing again after an unknown end is
                # safe: a job already finished is simply no longer ours. A node in
                # recovery (failover) is dropped the same way.
                log.warning("completion connection lost: %s", first_line(e))
                unsure = True
                if self._completer_conn is not None:
                    with contextlib.suppress(Exception):
                        await self._completer_conn.close()
                self._completer_conn = None
            except Exception:  # the outcomes stay in memory: report it, try again
                log.exception("writing outcomes failed, retrying")
            await asyncio.sleep(0.1)

    async def _completer_connection(self) -> queries.Conn:
        if self._completer_conn is None or self._completer_conn.closed:
            self._completer_conn = await connect(
                self.url,
                application_name=f"{self.config.application_name}:completer",
                generic_plans=True,
                primary=True,
            )
        return self._completer_conn

    async def wait_completed(self) -> None:
        """Until every outcome handed to the completer is written."""
        self._start_completer()
        while self._completer is not None:
            await asyncio.shield(self._completer)

    def _outcomes(self, batch: list[_InFlight]) -> queries.Outcomes:
        rows: list[queries.Row] = []
        conversations: set[str] = set()
        pauses: list[tuple[str, str]] = []
        suppressions: list[tuple[str, str, str]] = []
        rests: list[tuple[str, float, str]] = []
        throttle = 0.0
        for entry in batch:
            job, outcome = entry.job, entry.outcome
            if outcome is None:
                continue
            rows.append(outcome.as_row(job.id, job.claim_token))
            if outcome.kind in ("completed", "failed", "expired"):
                conversations.add(job.conversation)
            if outcome.pause_tenant:
                pauses.append((outcome.pause_tenant, f"{outcome.code}: {outcome.message}"))
            if outcome.rest_tenant_s:
                rests.append(
                    (job.tenant_id, outcome.rest_tenant_s, f"{outcome.code}: {outcome.message}")
                )
            if outcome.suppress and outcome.code:
                suppressions.append((job.tenant_id, job.to_number, outcome.code))
            if outcome.throttle_s:
                throttle = max(throttle, outcome.throttle_s)
        return queries.Outcomes(
            rows, sorted(conversations), pauses, suppressions, throttle or None, rests
        )

    def _log_outcome(self, entry: _InFlight, applied: bool) -> None:
        job, outcome = entry.job, entry.outcome
        if outcome is None:
            return
        if not applied:
            self.stats.fenced += 1
            log.warning(
                "job %s was rescued while its send ran; its %s outcome was not written",
                job.id,
                outcome.kind,
            )
            return
        common: dict[str, Any] = {"job_id": job.id, "tenant": job.tenant_id}
        if outcome.kind == "completed":
            self.stats.completed += 1
            self._job_log.add(
                "completed",
                f"job {job.id} completed",
                sid=outcome.sid,
                channel=outcome.channel,
                **common,
            )
        elif outcome.kind == "retry":
            self.stats.retried += 1
            self._job_log.add(
                "retry",
                f"job {job.id} retry scheduled in {outcome.delay:.1f}s",
                attempt=job.attempts,
                delay_s=round(outcome.delay, 3),
                code=outcome.code,
                **common,
            )
        elif outcome.kind == "failed":
            self.stats.failed += 1
            self._job_log.add(
                "failed",
                f"job {job.id} failed",
                code=outcome.code,
                error=outcome.message,
                attempts=job.attempts,
                **common,
            )
        elif outcome.kind == "expired":
            self.stats.expired += 1
            self._job_log.add(
                "expired", f"job {job.id} expired before its send: not sent", **common
            )
        else:
            self.stats.released += 1
            self._job_log.add("released", f"job {job.id} released", code=outcome.code, **common)


def _ewma(mean: float, sample: float) -> float:
    if math.isinf(mean):
        return sample
    return mean + EWMA_WEIGHT * (sample - mean)
