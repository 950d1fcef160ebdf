"""The API's request and response bodies as typed models (msgspec): camelCase on the
wire, unknown fields refused, lengths and ranges declared here once (from enqueue's
limits). The OpenAPI document's schemas are generated from them (openapi.py), and a
refusal names the field and the rule it broke. Domain checks (E.164 numbers, the
tenant's senders, suppressions, the schedule's bounds) stay in enqueue."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from pgqueue import enqueue
from pgqueue import models as domain
from pgqueue.http.errors import HttpError
from pgqueue.models import Enqueued, conversation_id

JobStates = Literal["waiting", "delayed", "active", "completed", "failed", "expired"]


class Answer(msgspec.Struct, rename="camel", kw_only=True):
    """A JSON object the API answers with."""


class Model(Answer, forbid_unknown_fields=True):
    """A JSON object the API reads: a field it does not know is refused."""


# -- requests ------------------------------------------------------------------------------


class Message(Model):
    """One WhatsApp message: `text`, or `contentSid` with optional `contentVariables`
    (an approved template)."""

    phone_number: Annotated[
        str, Meta(description="Recipient in E.164 (+14155550100); `whatsapp:` prefix allowed")
    ]
    text: Annotated[str, Meta(min_length=1, max_length=enqueue.MAX_TEXT)] | None = None
    content_sid: (
        Annotated[str, Meta(description="Twilio Content SID: HX + 32 hex digits")] | None
    ) = None
    content_variables: (
        Annotated[
            dict[str, str | int | float], Meta(description='Template variables, e.g. {"1": "Ana"}')
        ]
        | None
    ) = None
    from_number: Annotated[str, Meta(description="Sender; default: the tenant's")] | None = None
    conversation_id: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=enqueue.MAX_KEY,
                description="Messages of one conversation are sent in order, one at a "
                "time. Default: tenant + phone number",
            ),
        ]
        | None
    ) = None
    priority: (
        Annotated[
            int, Meta(ge=-100, le=100, description="Higher first; default from messageType, else 0")
        ]
        | None
    ) = None
    send_at: (
        Annotated[
            datetime, Meta(tz=True, description="Send at (ISO 8601 with a zone, within a year)")
        ]
        | None
    ) = None
    expires_at: (
        Annotated[
            datetime,
            Meta(
                tz=True,
                description="Deadline: not started by then, the message is never sent (it "
                "ends `expired`); Twilio gets the time left as ValidityPeriod",
            ),
        ]
        | None
    ) = None
    valid_for: (
        Annotated[
            int,
            Meta(
                ge=1,
                le=enqueue.MAX_VALID_FOR_S,
                description="Deadline in seconds after the message is due (its sendAt, "
                "else now); instead of expiresAt",
            ),
        ]
        | None
    ) = None
    idempotency_key: (
        Annotated[
            str,
            Meta(
                min_length=1,
                max_length=enqueue.MAX_KEY,
                description="Repeating a key returns the first job (also the Idempotency-Key "
                "header)",
            ),
        ]
        | None
    ) = None
    message_type: (
        Annotated[
            str,
            Meta(
                description="customer_service (priority 10), marketing (5), notification (0), "
                "or another lower-case word"
            ),
        ]
        | None
    ) = None


class Batch(Model):
    messages: Annotated[list[Message], Meta(min_length=1, max_length=enqueue.MAX_BATCH)]


# -- answers -------------------------------------------------------------------------------


class Error(Answer):
    error: str
    message: str
    field: str | None = None
    index: int | None = None
    provider_code: str | None = None


class QueuePosition(Answer):
    state: Annotated[
        JobStates,
        Meta(
            description="waiting or delayed for a new message; a repeated idempotency key "
            "gives the first job's current state"
        ),
    ]
    ahead: Annotated[int, Meta(ge=0, description="Messages of the same conversation ahead of it")]


class EnqueuedJob(Answer):
    job_id: int
    queue_position: QueuePosition
    duplicate: bool

    @classmethod
    def of(cls, result: Enqueued) -> EnqueuedJob:
        return cls(
            job_id=result.job_id,
            queue_position=QueuePosition(state=result.state, ahead=result.ahead),  # type: ignore[arg-type]
            duplicate=result.duplicate,
        )


class Queued(EnqueuedJob):
    status: Literal["queued"]
    message: str


class BatchQueued(Answer):
    status: Literal["queued"]
    message: str
    jobs: list[EnqueuedJob]


class DirectSend(Answer):
    status: Literal["ok"]
    message: str
    channel: Literal["freeform", "template"]
    sid: str


class QueueMetrics(Answer):
    waiting: Annotated[int, Meta(ge=0)]
    active: Annotated[int, Meta(ge=0)]
    completed: Annotated[int, Meta(ge=0)]
    failed: Annotated[int, Meta(ge=0)]
    delayed: Annotated[int, Meta(ge=0)]
    tenant_concurrency: dict[str, Annotated[int, Meta(ge=0)]]
    max_concurrency_per_tenant: Annotated[int, Meta(ge=1)]
    paused_tenants: list[str] = []
    expired: Annotated[int, Meta(ge=0, description="never sent: their deadline passed")] = 0


class Job(Answer):
    """A job as the API shows it (and `pgqueue jobs --json`): never the message's text."""

    id: int
    tenant_id: str
    conversation_id: str
    state: JobStates
    attempts: int
    max_attempts: int
    priority: int
    message_type: str | None
    phone_number: str
    channel: str | None
    content_sid: str | None
    last_error_code: str | None
    last_error_message: str | None
    provider_sid: str | None
    provider_status: str | None
    created_at: datetime
    run_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Job:
        return cls(
            id=int(row["id"]),
            tenant_id=row["tenant_id"],
            conversation_id=conversation_id(row["tenant_id"], row["conversation"]),
            state=row["state"],
            attempts=int(row["attempts"]),
            max_attempts=int(row["max_attempts"]),
            priority=int(row["priority"]),
            message_type=row["message_type"],
            phone_number=row["to_number"],
            channel=row["channel"],
            content_sid=row["content_sid"],
            last_error_code=row["last_error_code"],
            last_error_message=row["last_error_message"],
            provider_sid=row["provider_sid"],
            provider_status=row["provider_status"],
            created_at=row["created_at"],
            run_at=row["run_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            expires_at=row.get("expires_at"),
        )


class Event(Answer):
    """One state change of a message (pgqueue.events.as_json makes them)."""

    cursor: Annotated[str, Meta(description="this event's place in the feed")]
    id: int
    type: domain.EventKind
    job_id: int
    at: datetime
    attempt: int | None = None
    sid: Annotated[str | None, Meta(description="the provider's message SID")] = None
    error_code: str | None = None
    error_message: str | None = None
    run_at: Annotated[
        datetime | None, Meta(description="queued: when it is due; retry_scheduled: the retry")
    ] = None


class EventPage(Answer):
    events: list[Event]
    next_cursor: Annotated[
        str, Meta(description="pass as `after` to read on (the same cursor when no events)")
    ]

    @classmethod
    def of(cls, rows: list[dict[str, Any]], next_cursor: str) -> EventPage:
        return cls(events=[msgspec.convert(r, Event) for r in rows], next_cursor=next_cursor)


class WebhookTest(Answer):
    url: str
    delivered: Annotated[bool, Meta(description="the endpoint answered 2xx")]
    status: int | None = None
    error: str | None = None


class WebhookDeadLetter(Answer):
    id: int
    tenant_id: str
    events: list[Event]
    attempts: int
    last_error: str | None
    failed_at: datetime

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> WebhookDeadLetter:
        return cls(
            id=int(row["id"]),
            tenant_id=row["tenant_id"],
            events=[msgspec.convert(e, Event) for e in row["events"]],
            attempts=int(row["attempts"]),
            last_error=row["last_error"],
            failed_at=row["failed_at"],
        )


class WebhookDeadLetters(Answer):
    dead_letters: list[WebhookDeadLetter]


class Canceled(Answer):
    job_id: int
    status: Literal["canceled"]


class Deleted(Answer):
    deleted: Annotated[int, Meta(ge=0)]


class StatusCallbackResult(Answer):
    status: str
    updated: Annotated[int, Meta(ge=0)]
    held: Annotated[
        bool,
        Meta(
            description="no message carries this SID yet; the status is applied once its "
            "send's completion has committed"
        ),
    ]


class Status(Answer):
    status: str


class Ready(Answer):
    status: str
    database: str | None = None
    migration: str | None = None


# What openapi.py publishes under components/schemas, by these names.
SCHEMAS: dict[str, type[Answer]] = {
    "Error": Error,
    "Message": Message,
    "Batch": Batch,
    "QueuePosition": QueuePosition,
    "Queued": Queued,
    "EnqueuedJob": EnqueuedJob,
    "BatchQueued": BatchQueued,
    "DirectSend": DirectSend,
    "QueueMetrics": QueueMetrics,
    "Job": Job,
    "Canceled": Canceled,
    "Deleted": Deleted,
    "Event": Event,
    "EventPage": EventPage,
    "WebhookTest": WebhookTest,
    "WebhookDeadLetter": WebhookDeadLetter,
    "WebhookDeadLetters": WebhookDeadLetters,
    "StatusCallbackResult": StatusCallbackResult,
    "Status": Status,
    "Ready": Ready,
}


def json_body(value: Answer) -> dict[str, Any]:
    """A model as the plain JSON object the answer carries."""
    out: dict[str, Any] = msgspec.to_builtins(value)
    return out


# -- reading a message ---------------------------------------------------------------------

# A refusal by the model, as msgspec words it: "<what> - at `$.field`".
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<name>[^`]*)`")
_MISSING = re.compile(r"Object missing required field `(?P<name>[^`]*)`")
_WRONG_TYPE = re.compile(r"Expected `(?P<want>[^`]*)`, got `(?P<got>[^`]*)`")
_TYPE_WORDS = {
    "str": "a string",
    "int": "a whole number",
    "float": "a number",
    "bool": "true or false",
    "object": "an object",
    "array": "an array",
    "datetime": "a string (ISO 8601 date and time with a zone)",
    "int | float | str": "a string or a number",
}
# The code of a rule a field's value broke, where enqueue.validate has one for it.
_RULE_CODES = {
    "text": "invalid_text",
    "priority": "invalid_priority",
    "sendAt": "invalid_send_at",
    "contentVariables": "invalid_content_variables",
    "expiresAt": "invalid_expires_at",
    "validFor": "invalid_valid_for",
    "phoneNumber": "invalid_phone_number",
    "messages": "invalid_request",
}


def _words(msgspec_type: str) -> str:
    wanted = msgspec_type.removesuffix(" | null")
    return _TYPE_WORDS.get(wanted, f"of type {wanted}")


def refusal(exc: msgspec.ValidationError, prefix: str = "") -> HttpError:
    """The 422 for a body the model refused, naming the field (`prefix` + its path)."""
    text = str(exc)
    m = _AT.match(text)
    what, path = (m["what"], m["path"] or "") if m else (text, "")
    inner = re.sub(r"^\.", "", path).replace("[...]", "")
    field = prefix + inner
    # Where a field the object lacks or should not have would sit.
    within = prefix + (f"{inner}." if inner else "")
    if unknown := _UNKNOWN.match(what):
        name = unknown["name"][:60]
        known = ", ".join(Message.__struct_encode_fields__)
        return HttpError(
            422,
            "unknown_field",
            f"unknown field {name!r}; known fields: {known}",
            field=within + name,
        )
    if missing := _MISSING.match(what):
        name = missing["name"]
        where = within + name
        return HttpError(
            422, _RULE_CODES.get(name, "invalid_request"), f"{where} is required", field=where
        )
    leaf = re.split(r"[.\[]", inner)[0]
    if wrong := _WRONG_TYPE.match(what):
        return HttpError(
            422, "invalid_type", f"{field} must be {_words(wrong['want'])}", field=field
        )
    if leaf == "text" and "<=" in what:
        code = "text_too_long"
    else:
        code = _RULE_CODES.get(leaf, "invalid_request")
    return HttpError(422, code, f"{field}: {what[0].lower()}{what[1:]}", field=field)


def message_in(body: object, prefix: str = "") -> Message:
    """The message model from one decoded JSON value, or a 422 naming the field."""
    if not isinstance(body, dict):
        where = prefix.rstrip(".") or "body"
        raise HttpError(422, "invalid_type", f"{where} must be a JSON object", field=where)
    try:
        return msgspec.convert(body, Message)
    except msgspec.ValidationError as exc:
        raise refusal(exc, prefix) from None


def message(model: Message, tenant_id: str) -> domain.Message:
    return domain.Message(
        tenant_id=tenant_id,
        phone_number=model.phone_number,
        text=model.text,
        content_sid=model.content_sid,
        content_variables=model.content_variables,
        from_number=model.from_number,
        conversation_id=model.conversation_id,
        priority=model.priority,
        send_at=model.send_at,
        idempotency_key=model.idempotency_key,
        message_type=model.message_type,
        expires_at=model.expires_at,
        valid_for_s=model.valid_for,
    )
