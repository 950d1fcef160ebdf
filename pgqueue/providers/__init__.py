"""Providers deliver a claimed job. One protocol; Twilio for production, sandbox for demos.

A provider returns a SendResult on success and raises one of errors.TransientSendError,
PermanentSendError or TenantSendError on failure; completion.decide turns that into the
job's next state. Providers never see the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Protocol

from pgqueue.models import Job, Outgoing, SendResult

log = logging.getLogger("pgqueue.providers")

# [not before, not after] (epoch s): when this send's first request may go on the wire;
# emptied once a request passed its check. A list, because the check runs in a task of
# the HTTP client's own that has a copy of this context: emptied there, it is emptied for
# the send's later requests too (a fallback template is never held to the slot).
_slot_window: ContextVar[list[float] | None] = ContextVar("pgqueue_slot_window", default=None)
# The slot a request passed its check for, and how late it could still have passed, until
# note_on_wire sees its bytes leave.
_passed: ContextVar[list[float] | None] = ContextVar("pgqueue_slot_passed", default=None)
# A request leaving this much later than its check allowed is logged (see note_on_wire).
WIRE_LATE_LOG_S = 0.004


class SlotMissed(Exception):
    """The send could not go out within its rate slot; nothing was sent (G4)."""


@contextlib.contextmanager
def slot_deadline(deadline: float, start: float = 0.0) -> Iterator[None]:
    """The window (epoch s) in which this send's first request may go on the wire: not
    before `start` (a provider that waits at the wire is woken a little early), not after
    `deadline`."""
    token = _slot_window.set([start, deadline])
    try:
        yield
    finally:
        _slot_window.reset(token)


async def wait_for_slot(*, final: bool = True) -> None:
    """Await right before a request goes on the wire: holds it until the rate slot starts
    and raises SlotMissed when the slot has passed (the dispatcher then takes a new one).
    Only a send's first request is checked, so a follow-up request of the same send (a
    fallback template) cannot loop. `final=False` checks without using the window up: a
    look before a later, final check.

    The later this sits, the less jitter reaches the provider: CPU time spent building
    the request on a loaded machine would otherwise push starts together. A provider that
    calls it sets `waits_for_slot = True`, and the dispatcher then wakes its sends
    SLOT_LEAD_S before their slots, so that building the request happens before the slot
    instead of eating into the few ms a send may be late."""
    window = _slot_window.get()
    if not window:
        return
    start, deadline = window
    while (early := start - time.time()) > 0:
        await asyncio.sleep(early)
    if time.time() > deadline:
        raise SlotMissed
    if not final:
        return
    window.clear()
    if deadline != float("inf"):
        _passed.set([start, deadline])


def note_on_wire() -> None:
    """Call once the request's bytes are handed to the socket. The slot check runs just
    before the write, but the process can still be held up in between (a starved
    machine); such a send reaches the provider late and can bunch with the next ones (G4).
    It cannot be taken back, so it is logged, for the reliability harness to count."""
    passed = _passed.get()
    if not passed:
        return
    start, deadline = passed
    passed.clear()
    now = time.time()
    if now - deadline > WIRE_LATE_LOG_S:
        log.warning("a send went on the wire %.1f ms after its rate slot", (now - start) * 1000)


class Provider(Protocol):
    async def send(self, job: Job) -> SendResult: ...

    async def send_now(self, out: Outgoing) -> SendResult:
        """A send without a job (the API's direct send): no rate slot, no retry."""
        ...

    async def aclose(self) -> None: ...
