"""A provider that sends nothing: it waits like Twilio would, then records the message in
`pgqueue.sandbox_messages` so the demo (and anyone curious) can see what was "sent".

Failures can be injected to watch retries and dead letters: a random transient failure
rate, and numbers that are always invalid.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from psycopg_pool import AsyncConnectionPool

from pgqueue import queries
from pgqueue.errors import PermanentSendError, TransientSendError
from pgqueue.models import Job, Outgoing, SendResult


class SandboxProvider:
    """`latency` is a (low, high) range in seconds, drawn uniformly per send, or a fixed
    number. `seed` makes latencies and injected failures repeatable (not the SIDs)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        latency: tuple[float, float] | float = (0.1, 0.3),
        failure_rate: float = 0.0,
        seed: int | None = None,
        invalid_numbers: Iterable[str] = (),
    ) -> None:
        low, high = (latency, latency) if isinstance(latency, int | float) else latency
        if not 0 <= low <= high:
            raise ValueError(f"latency must be 0 <= low <= high, got {latency!r}")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be between 0 and 1, got {failure_rate!r}")
        self._pool = pool
        self._latency = (float(low), float(high))
        self._failure_rate = failure_rate
        self._rng = random.Random(seed)  # noqa: S311 - simulation, not security
        self.invalid_numbers = set(invalid_numbers)

    async def send(self, job: Job) -> SendResult:
        return await self.send_now(Outgoing.from_job(job))

    async def send_now(self, out: Outgoing) -> SendResult:
        started_at = datetime.now(UTC)
        await asyncio.sleep(self._rng.uniform(*self._latency))
        if out.to_number in self.invalid_numbers:
            raise PermanentSendError(
                f"Invalid 'To' Phone Number: {out.to_number} (sandbox)",
                provider_code="21211",
                http_status=400,
            )
        if self._failure_rate and self._rng.random() < self._failure_rate:
            raise TransientSendError(
                "Service unavailable (sandbox failure injection)",
                provider_code="sandbox-503",
                http_status=503,
            )
        # Random, not seeded: two sandbox workers with the same seed must not share SIDs.
        sid = "SM" + uuid.uuid4().hex
        async with self._pool.connection() as conn:
            await queries.execute(
                conn,
                "record_sandbox_message",
                {
                    "tenant_id": out.tenant_id,
                    "job_id": out.job_id,
                    "to_number": out.to_number,
                    "body": out.body,
                    "content_sid": out.content_sid,
                    "sid": sid,
                    "started_at": started_at,
                },
            )
        if out.content_sid is not None:
            return SendResult(sid=sid, status="queued", channel="template")
        return SendResult(sid=sid, status="queued", channel="freeform")

    async def aclose(self) -> None:
        """The pool belongs to the caller; nothing of ours to close."""
