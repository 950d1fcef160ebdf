"""Validation and insert of messages: the only way a job enters the queue.

Every check happens before the database is touched, and a batch is one statement, so
bad input leaves nothing behind. Errors carry a code, the field and a message the API
returns as-is.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import phonenumbers
import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from pgqueue import queries
from pgqueue.errors import ValidationError
from pgqueue.models import Enqueued, Message, conversation_key

MAX_TEXT = 1600
MAX_BATCH = 1000
MAX_KEY = 200
MAX_VARIABLES_JSON = 4096
MAX_SCHEDULE_AHEAD = timedelta(days=365)
# A sendAt in the past means "now"; one further back than this is a client's bug (and a
# year-1 moment is not even representable in UTC once read back).
MAX_SCHEDULE_BEHIND = timedelta(days=1)
# A deadline (validFor, or expiresAt past the send time) of at most a year.
MAX_VALID_FOR_S = 365 * 86400
_CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}$")
_MESSAGE_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")

ConnSource = queries.Conn | AsyncConnectionPool[Any]


@dataclass(frozen=True)
class _Row:
    """A validated message, normalised, in the columns' shape."""

    tenant_id: str
    conversation: str
    priority: int | None
    run_at: datetime | None
    to_number: str
    from_number: str | None
    body: str | None
    content_sid: str | None
    content_variables: dict[str, Any] | None
    message_type: str | None
    idempotency_key: str | None
    expires_at: datetime | None = None


@functools.lru_cache(maxsize=65_536)
def _e164(text: str) -> str | None:
    """Parsing with phonenumbers costs tens of microseconds, a large share of an enqueue;
    a restaurant writes to the same customers again and again, so remember answers."""
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def normalize_phone(raw: object, *, field: str = "phoneNumber") -> str:
    """E.164 (`+14155550100`) from what people type; `whatsapp:` prefixes are accepted."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValidationError(
            f"{field} is required: a phone number in E.164 form such as +14155550100",
            code="invalid_phone_number",
            field=field,
        )
    text = raw.strip()
    if text.lower().startswith("whatsapp:"):
        text = text[len("whatsapp:") :]
    if not text.startswith("+") and text.startswith("00"):
        text = "+" + text[2:]
    e164 = _e164(text)
    if e164 is None:
        raise ValidationError(
            f"{field} {raw[:40]!r} is not a valid international phone number "
            "(E.164, with the country code, e.g. +14155550100)",
            code="invalid_phone_number",
            field=field,
        )
    return e164


def _text(value: object, name: str, *, max_len: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{name} must be a non-empty string", field=name)
    if len(value) > max_len:
        raise ValidationError(f"{name} must be at most {max_len} characters", field=name)
    return _no_nul(value, name)


def _no_nul(value: str, name: str, code: str = "invalid_request") -> str:
    # PostgreSQL's text and jsonb cannot hold U+0000: it would fail the insert instead.
    if "\x00" in value:
        raise ValidationError(f"{name} must not contain NUL (U+0000)", code=code, field=name)
    return value


def validate(message: Message, *, now: datetime | None = None) -> _Row:
    """Check and normalise one message; raises ValidationError naming the bad field."""
    tenant_id = _text(message.tenant_id, "tenantId", max_len=100)
    to_number = normalize_phone(message.phone_number)
    from_number = (
        None
        if message.from_number is None
        else normalize_phone(message.from_number, field="fromNumber")
    )

    body: str | None = None
    content_sid: str | None = None
    variables: dict[str, Any] | None = None
    if message.text is not None and message.content_sid is not None:
        raise ValidationError(
            "give either text or contentSid, not both", code="invalid_content", field="text"
        )
    if message.text is not None:
        if not isinstance(message.text, str) or not message.text.strip():
            raise ValidationError("text must not be empty", code="invalid_text", field="text")
        if len(message.text) > MAX_TEXT:
            raise ValidationError(
                f"text is {len(message.text)} characters; WhatsApp allows at most {MAX_TEXT}",
                code="text_too_long",
                field="text",
            )
        body = _no_nul(message.text, "text", "invalid_text")
        if message.content_variables is not None:
            raise ValidationError(
                "contentVariables only go with contentSid",
                code="invalid_content",
                field="contentVariables",
            )
    elif message.content_sid is not None:
        if not isinstance(message.content_sid, str) or not _CONTENT_SID.fullmatch(
            message.content_sid
        ):
            raise ValidationError(
                "contentSid must be a Twilio Content SID: HX followed by 32 hex digits",
                code="invalid_content_sid",
                field="contentSid",
            )
        content_sid = message.content_sid
        variables = _variables(message.content_variables)
    else:
        raise ValidationError(
            "a message needs text or contentSid", code="missing_content", field="text"
        )

    conversation = conversation_key(
        tenant_id,
        to_number
        if message.conversation_id is None
        else _text(message.conversation_id, "conversationId", max_len=MAX_KEY),
    )
    priority = message.priority
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not -100 <= priority <= 100
    ):
        raise ValidationError(
            "priority must be a whole number from -100 to 100",
            code="invalid_priority",
            field="priority",
        )
    now = now or datetime.now(UTC)
    run_at = _send_at(message.send_at, now)
    expires_at = _deadline(message, run_at or now, now)
    key = (
        None
        if message.idempotency_key is None
        else _text(message.idempotency_key, "idempotencyKey", max_len=MAX_KEY)
    )
    message_type = message.message_type
    if message_type is not None and (
        not isinstance(message_type, str) or not _MESSAGE_TYPE.fullmatch(message_type)
    ):
        raise ValidationError(
            "messageType must be a lower-case word such as customer_service, marketing "
            "or notification",
            code="invalid_message_type",
            field="messageType",
        )
    return _Row(
        tenant_id=tenant_id,
        conversation=conversation,
        priority=priority,
        run_at=run_at,
        to_number=to_number,
        from_number=from_number,
        body=body,
        content_sid=content_sid,
        content_variables=variables,
        message_type=message_type,
        idempotency_key=key,
        expires_at=expires_at,
    )


def _variables(value: object) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValidationError(
            'contentVariables must be an object such as {"1": "Ana"}',
            code="invalid_content_variables",
            field="contentVariables",
        )
    for k, v in value.items():
        if not isinstance(v, str | int | float) or isinstance(v, bool):
            raise ValidationError(
                f"contentVariables[{k[:20]!r}] must be a string or a number",
                code="invalid_content_variables",
                field="contentVariables",
            )
    if len(json.dumps(value)) > MAX_VARIABLES_JSON:
        raise ValidationError(
            f"contentVariables must be at most {MAX_VARIABLES_JSON} bytes as JSON",
            code="invalid_content_variables",
            field="contentVariables",
        )
    out = {k: str(v) for k, v in value.items()}
    for k, v in out.items():
        _no_nul(k + v, "contentVariables", "invalid_content_variables")
    return out


def _send_at(value: object, now: datetime) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValidationError(
            "sendAt must be a date and time with a time zone (ISO 8601, e.g. 2026-01-31T18:00:00Z)",
            code="invalid_send_at",
            field="sendAt",
        )
    ahead = value - now
    if ahead > MAX_SCHEDULE_AHEAD:
        raise ValidationError(
            "sendAt must be within a year from now", code="invalid_send_at", field="sendAt"
        )
    if ahead < -MAX_SCHEDULE_BEHIND:
        raise ValidationError(
            "sendAt is more than a day in the past; leave it out to send now",
            code="invalid_send_at",
            field="sendAt",
        )
    return value


def _deadline(message: Message, due: datetime, now: datetime) -> datetime | None:
    """When the message stops being worth sending: `expires_at`, or `valid_for_s` after
    it is due (its sendAt, else now); None: the queue's TTL for its type, if any."""
    if message.expires_at is not None and message.valid_for_s is not None:
        raise ValidationError(
            "give either expiresAt or validFor, not both",
            code="invalid_expires_at",
            field="expiresAt",
        )
    if message.valid_for_s is not None:
        valid_for = message.valid_for_s
        if isinstance(valid_for, bool) or not 1 <= valid_for <= MAX_VALID_FOR_S:
            raise ValidationError(
                f"validFor must be from 1 to {MAX_VALID_FOR_S} seconds",
                code="invalid_valid_for",
                field="validFor",
            )
        return due + timedelta(seconds=valid_for)
    expires_at = message.expires_at
    if expires_at is None:
        return None
    if not isinstance(expires_at, datetime) or expires_at.tzinfo is None:
        raise ValidationError(
            "expiresAt must be a date and time with a time zone (ISO 8601)",
            code="invalid_expires_at",
            field="expiresAt",
        )
    if expires_at <= max(due, now):
        raise ValidationError(
            "expiresAt must be after the message is due (its sendAt, else now): it could "
            "never be sent",
            code="invalid_expires_at",
            field="expiresAt",
        )
    if expires_at - due > timedelta(seconds=MAX_VALID_FOR_S):
        raise ValidationError(
            "expiresAt must be within a year of the message's send time",
            code="invalid_expires_at",
            field="expiresAt",
        )
    return expires_at


def _params(row: _Row, *, queue: str, max_attempts: int) -> dict[str, Any]:
    return {
        "queue": queue,
        "tenant_id": row.tenant_id,
        "conversation": row.conversation,
        "priority": row.priority,
        "run_at": row.run_at,
        "to_number": row.to_number,
        "from_number": row.from_number,
        "body": row.body,
        "content_sid": row.content_sid,
        "content_variables": None
        if row.content_variables is None
        else Jsonb(row.content_variables),
        "message_type": row.message_type,
        "idempotency_key": row.idempotency_key,
        "expires_at": row.expires_at,
        "max_attempts": max_attempts,
    }


def _enqueued(
    r: dict[str, Any], *, duplicate: bool = False, now: datetime | None = None
) -> Enqueued:
    state = r["state"]
    if state in ("waiting", "delayed"):
        state = "delayed" if r["run_at"] > (now or datetime.now(UTC)) else "waiting"
    return Enqueued(
        job_id=int(r["id"]),
        state=state,
        ahead=int(r["ahead"]),
        run_at=r["run_at"],
        created_at=r["created_at"],
        duplicate=duplicate,
    )


@asynccontextmanager
async def _connection(source: ConnSource) -> AsyncIterator[queries.Conn]:
    if isinstance(source, AsyncConnectionPool):
        async with source.connection() as conn:
            yield conn
    else:
        yield source


async def refusal(conn: queries.Conn, row: _Row) -> ValidationError | None:
    """Why this message may not be sent (the reasons enqueue_job checks), or None."""
    why = await queries.fetch_one(
        conn,
        "enqueue_refusal",
        {"tenant_id": row.tenant_id, "to_number": row.to_number, "from_number": row.from_number},
    )
    if why is None or not why["tenant_exists"]:
        return ValidationError(
            f"unknown tenant {row.tenant_id!r}", code="unknown_tenant", field="tenantId"
        )
    if not why["sender_allowed"]:
        return ValidationError(
            f"fromNumber {row.from_number} is not one of this tenant's WhatsApp senders; "
            "leave it out to use the default sender, or ask an operator to add it "
            "(`pgqueue tenant set ID --add-sender NUMBER`)",
            code="unknown_sender",
            field="fromNumber",
        )
    if why["suppressed_code"] is not None:
        return ValidationError(
            f"{row.to_number} does not receive messages from this tenant any more "
            f"(provider error {why['suppressed_code']}); remove it from the suppression list "
            "first if the customer opted in again",
            code="number_suppressed",
            field="phoneNumber",
        )
    return None


async def _refusal(conn: queries.Conn, row: _Row) -> ValidationError:
    # The refused insert and this look are two snapshots: an operator may have changed
    # the tenant in between. The client's retry then sees the new state.
    return await refusal(conn, row) or ValidationError(
        "the tenant's settings changed while the message was enqueued; retry the request",
        code="tenant_changed",
        field="tenantId",
    )


async def enqueue_whatsapp_send(
    source: ConnSource,
    message: Message,
    *,
    queue: str = "whatsapp-send",
    max_attempts: int = 4,
) -> Enqueued:
    """Validate and enqueue one message; one round trip unless it carries an idempotency
    key (then the key is looked up first). With a key already used by this tenant the
    first job comes back, marked `duplicate`."""
    row = validate(message)
    params = _params(row, queue=queue, max_attempts=max_attempts)
    async with _connection(source) as conn:
        for _ in range(3):
            if row.idempotency_key is not None:
                existing = await queries.fetch_one(conn, "find_idempotent", params)
                if existing is not None:
                    return _enqueued(existing, duplicate=True)
            try:
                found = await queries.fetch_one(conn, "enqueue_job", params)
            except psycopg.errors.UniqueViolation:
                # The same key, enqueued concurrently: the other insert won, look again.
                continue
            if found is None:
                raise await _refusal(conn, row)
            return _enqueued(found)
    raise ValidationError(
        "idempotencyKey is being used concurrently; retry the request",
        code="idempotency_conflict",
        field="idempotencyKey",
    )


class BatchValidationError(ValidationError):
    """The batch was refused whole; `index` is the first bad message (0-based)."""

    def __init__(self, index: int, error: ValidationError) -> None:
        super().__init__(f"messages[{index}]: {error.message}", code=error.code, field=error.field)
        self.index = index


async def enqueue_whatsapp_send_batch(
    source: ConnSource,
    messages: Sequence[Message],
    *,
    queue: str = "whatsapp-send",
    max_attempts: int = 4,
) -> list[Enqueued]:
    """All or nothing: every message is validated first, then all are inserted in one
    statement. Results are in input order; a message whose idempotency key was already
    used (before or earlier in this batch) returns that job, marked `duplicate`."""
    if not messages:
        return []
    if len(messages) > MAX_BATCH:
        raise ValidationError(
            f"a batch holds at most {MAX_BATCH} messages, got {len(messages)}",
            code="batch_too_large",
            field="messages",
        )
    now = datetime.now(UTC)
    rows: list[_Row] = []
    for i, m in enumerate(messages):
        try:
            rows.append(validate(m, now=now))
        except ValidationError as e:
            raise BatchValidationError(i, e) from None

    async with _connection(source) as conn:
        for _ in range(3):
            try:
                return await _insert_batch(conn, rows, queue=queue, max_attempts=max_attempts)
            except psycopg.errors.UniqueViolation:
                continue
    raise ValidationError(
        "idempotency keys of this batch are being used concurrently; retry the request",
        code="idempotency_conflict",
        field="idempotencyKey",
    )


def _column(values: list[Any]) -> list[Any] | None:
    """An all-NULL column goes as one NULL instead of an array of them: writing the
    arrays as text is the largest client cost of a batch, and a multi-argument unnest
    pads a NULL array with NULLs to the longest one."""
    return None if all(v is None for v in values) else values


async def _insert_batch(
    conn: queries.Conn, rows: list[_Row], *, queue: str, max_attempts: int
) -> list[Enqueued]:
    results: list[Enqueued | None] = [None] * len(rows)
    first_with_key: dict[tuple[str, str], int] = {}
    to_insert: list[int] = []
    for i, r in enumerate(rows):
        if r.idempotency_key is None:
            continue
        existing = await queries.fetch_one(
            conn,
            "find_idempotent",
            {"tenant_id": r.tenant_id, "idempotency_key": r.idempotency_key},
        )
        if existing is not None:
            results[i] = _enqueued(existing, duplicate=True)
    for i, r in enumerate(rows):
        if results[i] is not None:
            continue
        if r.idempotency_key is not None:
            k = (r.tenant_id, r.idempotency_key)
            if k in first_with_key:
                continue  # filled in from the first one below
            first_with_key[k] = i
        to_insert.append(i)

    if to_insert:
        batch = [rows[i] for i in to_insert]
        refused = await queries.fetch_one(
            conn,
            "batch_refusals",
            {
                "tenant_ids": [r.tenant_id for r in batch],
                "to_numbers": [r.to_number for r in batch],
                "from_numbers": _column([r.from_number for r in batch]),
            },
        )
        if refused is not None:
            index = to_insert[int(refused["index"])]
            raise BatchValidationError(index, await _refusal(conn, rows[index]))
        inserted = await queries.fetch_all(
            conn,
            "enqueue_batch",
            {
                "queue": queue,
                "max_attempts": max_attempts,
                "tenant_ids": [r.tenant_id for r in batch],
                "conversations": [r.conversation for r in batch],
                "priorities": _column([r.priority for r in batch]),
                "run_ats": _column([r.run_at for r in batch]),
                "to_numbers": [r.to_number for r in batch],
                "from_numbers": _column([r.from_number for r in batch]),
                "bodies": _column([r.body for r in batch]),
                "content_sids": _column([r.content_sid for r in batch]),
                "content_variables": _column(
                    [
                        None if r.content_variables is None else Jsonb(r.content_variables)
                        for r in batch
                    ]
                ),
                "message_types": _column([r.message_type for r in batch]),
                "idempotency_keys": _column([r.idempotency_key for r in batch]),
                "expires_ats": _column([r.expires_at for r in batch]),
            },
        )
        now = datetime.now(UTC)
        for i, inserted_row in zip(to_insert, inserted, strict=True):
            results[i] = _enqueued(inserted_row, now=now)
    out: list[Enqueued] = []
    for i, r in enumerate(rows):
        result = results[i]
        if result is None and r.idempotency_key is not None:
            first = results[first_with_key[(r.tenant_id, r.idempotency_key)]]
            result = None if first is None else replace(first, duplicate=True)
        if result is None:
            raise RuntimeError(f"batch message {i} got no result")  # a bug, not bad input
        out.append(result)
    return out
