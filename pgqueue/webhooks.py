"""Tenants' webhooks: their delivery events posted to a URL of theirs, signed.

Each worker runs a `Webhooks` beside its dispatcher, on an HTTP session of its own, so a
slow or failing endpoint never holds a Twilio send. A worker leases a tenant's webhook
cursor (queries.sql webhook_take) for one batch at a time, so a tenant has at most one
request in flight and its events arrive in feed order; it moves the cursor only after
the endpoint answered 2xx, so every event arrives at least once (a worker that dies
mid-request leaves the lease to run out, and the batch is posted again). A batch that
fails is tried again with exponential backoff; after `max_attempts` it is kept as a
dead letter (webhook_dead_letters, with its events) and the cursor moves past it.

The request: POST, JSON `{"events": [...]}` (the feed's events, pgqueue.events), with
`Pgqueue-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" under the
tenant's webhook secret>`; `verify` checks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from psycopg_pool import AsyncConnectionPool

from pgqueue import events, queries
from pgqueue.credentials import CredentialError, Keyring

log = logging.getLogger("pgqueue.webhooks")

SIGNATURE_HEADER = "Pgqueue-Signature"
# A signature older than this is refused by `verify`: a captured request replayed later.
TOLERANCE_S = 300


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    """The signature header's value for `body`, made at `at` (unix seconds; now)."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    tolerance_s: int = TOLERANCE_S,
) -> bool:
    """Whether `header` signs `body` with `secret`, made within `tolerance_s` of now."""
    parts = dict(p.partition("=")[::2] for p in header.split(","))
    try:
        t = int(parts.get("t", ""))
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).partition(",v1=")[2]
    return hmac.compare_digest(expected, parts.get("v1", ""))


@dataclass(frozen=True)
class Posted:
    ok: bool
    status: int | None
    error: str | None


async def post(
    session: aiohttp.ClientSession, url: str, secret: str, payload: dict[str, Any]
) -> Posted:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)}
    try:
        async with session.post(url, data=body, headers=headers, allow_redirects=False) as r:
            await r.read()
            ok = 200 <= r.status < 300
            return Posted(ok, r.status, None if ok else f"HTTP {r.status}")
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        return Posted(False, None, f"{type(e).__name__}: {e}"[:300])


def session(*, timeout_s: float, limit: int = 100) -> aiohttp.ClientSession:
    """An HTTP session for webhooks only: never the provider's, so an endpoint that hangs
    holds no connection a send needs."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        connector=aiohttp.TCPConnector(limit=limit),
    )


def backoff_s(attempts: int, *, base_s: float = 1.0, cap_s: float = 300.0) -> float:
    """The wait before attempt `attempts` + 1: doubling, capped, with jitter so that
    endpoints that failed together are not retried together."""
    wait: float = min(cap_s, base_s * 2.0 ** max(attempts - 1, 0))
    return wait * random.uniform(0.8, 1.0)  # noqa: S311 (jitter, not a secret)


@dataclass(frozen=True)
class WebhookConfig:
    interval_s: float = 0.5
    # Tenants whose batches one worker posts at once (one request per tenant at most).
    concurrency: int = 8
    batch: int = 100
    lease_s: float = 30.0
    timeout_s: float = 10.0
    max_attempts: int = 10
    base_backoff_s: float = 1.0
    max_backoff_s: float = 300.0


class Webhooks:
    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        worker_id: str,
        keyring: Keyring,
        config: WebhookConfig | None = None,
    ) -> None:
        self.pool = pool
        self.worker_id = worker_id
        self.keyring = keyring
        self.config = config or WebhookConfig()
        self._session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failed = 0
        self.dead = 0

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = session(timeout_s=self.config.timeout_s, limit=self.config.concurrency)
        return self._session

    async def aclose(self) -> None:
        """Hands back this worker's leases (a post cut short is posted again by the next
        worker, as at least once allows) and closes the HTTP session."""
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                await queries.execute(conn, "webhook_release", {"worker_id": self.worker_id})
        except Exception as e:  # the database may be away: the leases then run out
            log.debug("webhook leases not handed back: %s", e)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                busy = await self.run_once()
            except Exception as e:  # the database may be restarting; try again later
                log.warning("webhook delivery skipped: %s", str(e).strip()[:200])
                busy = 0
            if not busy:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.config.interval_s)

    async def run_once(self) -> int:
        """Posts one batch for each of up to `concurrency` due tenants; how many."""
        cfg = self.config
        async with self.pool.connection() as conn:
            leased = await queries.fetch_all(
                conn,
                "webhook_take",
                {"limit": cfg.concurrency, "worker_id": self.worker_id, "lease": cfg.lease_s},
            )
        await asyncio.gather(*(self._deliver(lease) for lease in leased))
        return len(leased)

    async def _deliver(self, lease: queries.Row) -> None:
        tenant_id = lease["tenant_id"]
        async with self.pool.connection() as conn:
            rows = await events.read(
                conn,
                tenant_id,
                events.Cursor(lease["tx"], lease["event_id"]),
                limit=self.config.batch,
            )
        batch = [events.as_json(r) for r in rows]
        if not rows:  # read by another worker's lease meanwhile: nothing to post
            await self._record(lease, rows, batch, Posted(True, None, None))
            return
        try:
            secret = self.keyring.open(lease["webhook_secret"] or "")
        except CredentialError as e:
            outcome = Posted(False, None, str(e))
        else:
            outcome = await post(self.session(), lease["webhook_url"], secret, {"events": batch})
        await self._record(lease, rows, batch, outcome)

    async def _record(
        self, lease: queries.Row, rows: Sequence[queries.Row], batch: list[Any], outcome: Posted
    ) -> None:
        cfg = self.config
        attempts = lease["attempts"] + 1
        common = {"tenant_id": lease["tenant_id"], "worker_id": self.worker_id}
        last = events.next_cursor(list(rows), events.Cursor(lease["tx"], lease["event_id"]))
        async with self.pool.connection() as conn:
            if outcome.ok or attempts >= cfg.max_attempts:
                dead = not outcome.ok
                await queries.execute(
                    conn,
                    "webhook_done",
                    {
                        **common,
                        "tx": last.tx,
                        "id": last.id,
                        "n": len(rows),
                        "dead": dead,
                        "events": json.dumps(batch),
                        "attempts": attempts,
                        "error": outcome.error,
                    },
                )
                if dead:
                    self.dead += 1
                    log.warning(
                        "webhook of tenant %s: %d event(s) kept as a dead letter after %d "
                        "attempts (%s)",
                        lease["tenant_id"],
                        len(rows),
                        attempts,
                        outcome.error,
                    )
                else:
                    self.delivered += len(rows)
            else:
                self.failed += 1
                delay = backoff_s(attempts, base_s=cfg.base_backoff_s, cap_s=cfg.max_backoff_s)
                await queries.execute(
                    conn, "webhook_failed", {**common, "delay": delay, "error": outcome.error}
                )
                log.info(
                    "webhook of tenant %s failed (%s); attempt %d in %.1f s",
                    lease["tenant_id"],
                    outcome.error,
                    attempts + 1,
                    delay,
                )
