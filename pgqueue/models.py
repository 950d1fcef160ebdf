"""The shapes that move between modules: messages in, claimed jobs, send results, outcomes."""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

# What a delivery event says happened to a message (pgqueue.events, migration 0015).
EventKind = Literal[
    "queued",
    "sending",
    "sent",
    "retry_scheduled",
    "delivered",
    "read",
    "failed",
    "expired",
    "canceled",
]


class JobState(enum.StrEnum):
    """The old system's words. Live jobs are waiting, delayed or active; finished ones
    completed or failed (the dead-letter state)."""

    WAITING = "waiting"
    DELAYED = "delayed"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"


def conversation_key(tenant_id: str, conversation_id: str) -> str:
    """The stored key of a tenant's conversation. Tenant ids hold no ':' (admin checks
    them), so the key names exactly one tenant: no input of one tenant can reach the
    conversation (heads, advisory lock, FIFO) of another; the database checks it too
    (`jobs_conversation_of_tenant`)."""
    return f"{tenant_id}:{conversation_id}"


def conversation_id(tenant_id: str, key: str) -> str:
    """What the tenant called the conversation: the stored key without its tenant."""
    prefix = f"{tenant_id}:"
    return key[len(prefix) :] if key.startswith(prefix) else key


@dataclass(frozen=True)
class Message:
    """One WhatsApp message to enqueue, as a caller gives it (validated by enqueue)."""

    tenant_id: str
    phone_number: str
    text: str | None = None
    content_sid: str | None = None
    content_variables: dict[str, Any] | None = None
    from_number: str | None = None
    conversation_id: str | None = None
    priority: int | None = None
    send_at: datetime | None = None
    idempotency_key: str | None = None
    message_type: str | None = None
    # A deadline: not started by then, the message is never sent (it ends `expired`).
    # expires_at, or valid_for_s seconds after it is due; neither: the queue's TTL for
    # its message type, if it has one.
    expires_at: datetime | None = None
    valid_for_s: int | None = None


@dataclass(frozen=True)
class Enqueued:
    job_id: int
    state: str
    ahead: int
    run_at: datetime
    created_at: datetime
    duplicate: bool = False


@dataclass(frozen=True)
class Job:
    """A claimed job, with what the provider needs to send it. The tenant's auth token is
    kept out of repr so it cannot reach a log line by accident."""

    id: int
    queue: str
    tenant_id: str
    conversation: str
    priority: int
    to_number: str
    from_number: str | None
    body: str | None
    content_sid: str | None
    content_variables: dict[str, Any] | None
    message_type: str | None
    attempts: int
    max_attempts: int
    claim_token: uuid.UUID
    start_at: datetime
    start_delay: float
    created_at: datetime
    lock_key: int
    locked: bool
    account_sid: str
    whatsapp_from: str
    auth_token: str = field(repr=False)
    fallback_content_sid: str | None = None
    fallback_variable: str | None = None
    # Not started by then, the job is never sent (it ends expired).
    expires_at: datetime | None = None
    # The rate is so far above what can be in flight that a late start cannot break G4
    # (claim_jobs in queries.sql): no need to take a new slot when late.
    late_ok: bool = False
    # 1 / (h * rate) for a tenant with a rate of its own: its next slot opens this long
    # after this job's, for the dispatcher to come back then.
    rate_spacing: float | None = None
    # The global slots the claim left free (G3), for the dispatcher to tell whether
    # claiming ahead would crowd other workers out.
    global_free: int = 0

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        """From a row of claim_jobs, whose columns are exactly these fields (a column
        without its field fails every claim: the dispatcher tests catch it at once)."""
        return cls(**row)

    @property
    def preview(self) -> str:
        """At most 30 characters of the text for log lines, never the whole message."""
        if self.body is None:
            return f"[template {self.content_sid}]"
        return self.body[:30] + ("…" if len(self.body) > 30 else "")


@dataclass(frozen=True)
class Outgoing:
    """What one send needs, whether it comes from a claimed job (`job_id`) or is a
    direct send without one (WHATSAPP_SEND_QUEUE_ENABLED=false). The auth token stays out
    of repr."""

    tenant_id: str
    account_sid: str
    auth_token: str = field(repr=False)
    from_number: str
    to_number: str
    body: str | None
    content_sid: str | None
    content_variables: dict[str, Any] | None
    fallback_content_sid: str | None
    fallback_variable: str | None
    job_id: int | None = None
    expires_at: datetime | None = None

    @classmethod
    def from_job(cls, job: Job) -> Outgoing:
        return cls(
            tenant_id=job.tenant_id,
            account_sid=job.account_sid,
            auth_token=job.auth_token,
            from_number=job.from_number or job.whatsapp_from,
            to_number=job.to_number,
            body=job.body,
            content_sid=job.content_sid,
            content_variables=job.content_variables,
            fallback_content_sid=job.fallback_content_sid,
            fallback_variable=job.fallback_variable,
            job_id=job.id,
            expires_at=job.expires_at,
        )


@dataclass(frozen=True)
class SendResult:
    sid: str
    status: str = "queued"
    channel: Literal["freeform", "template"] = "freeform"


OutcomeKind = Literal["completed", "retry", "failed", "release", "expired"]


@dataclass(frozen=True)
class Outcome:
    """What to do with a claimed job after its send (see completion.decide)."""

    kind: OutcomeKind
    delay: float = 0.0
    code: str | None = None
    message: str | None = None
    sid: str | None = None
    status: str | None = None
    channel: str | None = None
    # Side effects on the whole queue or tenant, applied with the outcome.
    throttle_s: float | None = None
    pause_tenant: str | None = None
    # The tenant's sender rests this long (a limit of its own at Twilio), then goes on.
    rest_tenant_s: float | None = None
    suppress: bool = False

    @property
    def needs_queue_lock(self) -> bool:
        """Pausing the queue or a tenant writes rows claims write: under the queue lock
        (its lock order), or it could deadlock with a claim."""
        return bool(self.throttle_s or self.pause_tenant or self.rest_tenant_s)

    def as_row(self, job_id: int, token: uuid.UUID) -> dict[str, Any]:
        return {
            "id": job_id,
            "token": token,
            "outcome": self.kind,
            "delay": self.delay,
            "code": self.code,
            "message": self.message,
            "sid": self.sid,
            "status": self.status,
            "channel": self.channel,
        }
