"""Providers deliver a claimed job. One protocol; Twilio for production, sandbox for demos.

A provider returns a SendResult on success and raises one of errors.TransientSendError,
PermanentSendError or TenantSendError on failure; completion.decide turns that into the
job's next state. Providers never see the database.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

from pgqueue.models import Job, SendResult

_slot_deadline: ContextVar[float | None] = ContextVar("pgqueue_slot_deadline", default=None)


class SlotMissed(Exception):
    """The send could not go out within its rate slot; nothing was sent (G4)."""


@contextlib.contextmanager
def slot_deadline(deadline: float) -> Iterator[None]:
    """The latest moment (epoch s) this send's first request may go on the wire."""
    token = _slot_deadline.set(deadline)
    try:
        yield
    finally:
        _slot_deadline.reset(token)


def check_slot() -> None:
    """Call right before a request goes on the wire: raises SlotMissed when the rate slot
    has passed (the dispatcher then takes a new one). Only a send's first request is
    checked, so a follow-up request of the same send (a fallback template) cannot loop.

    The later this check sits, the less jitter reaches the provider: CPU time spent
    building the request on a loaded machine would otherwise push starts together."""
    deadline = _slot_deadline.get()
    if deadline is None:
        return
    _slot_deadline.set(None)
    if time.time() > deadline:
        raise SlotMissed


class Provider(Protocol):
    async def send(self, job: Job) -> SendResult: ...

    async def aclose(self) -> None: ...
