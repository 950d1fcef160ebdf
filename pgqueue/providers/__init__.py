"""Providers deliver a claimed job. One protocol; Twilio for production, sandbox for demos.

A provider returns a SendResult on success and raises one of errors.TransientSendError,
PermanentSendError or TenantSendError on failure; completion.decide turns that into the
job's next state. Providers never see the database.
"""

from __future__ import annotations

from typing import Protocol

from pgqueue.models import Job, SendResult


class Provider(Protocol):
    async def send(self, job: Job) -> SendResult: ...

    async def aclose(self) -> None: ...
