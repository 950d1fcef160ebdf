"""Tenants, API tokens and queue limits: what operators change, shared by the CLI and the API.

The limits live in the database so every worker and API process sees the same values.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pgqueue import queries
from pgqueue.enqueue import normalize_phone
from pgqueue.errors import NotFoundError, ValidationError

_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}$")
TOKEN_PREFIX = "pgq_"  # noqa: S105 - a marker, not a secret

# Tenant columns that are safe to show; the auth token is never read back out. Sends in
# flight and finished ones come from the views that count and sum them.
TENANT_PUBLIC = (
    "id, name, account_sid, whatsapp_from, senders, max_concurrency, rate_per_second, paused, "
    "pause_reason, fallback_content_sid, fallback_variable, "
    "coalesce((SELECT f.n FROM pgqueue.tenant_in_flight f"
    " WHERE f.tenant_id = tenants.id), 0) AS active, "
    "last_served_at, "
    "coalesce((SELECT f.completed FROM pgqueue.tenant_finished f"
    " WHERE f.tenant_id = tenants.id), 0) AS completed_total, "
    "coalesce((SELECT f.failed FROM pgqueue.tenant_finished f"
    " WHERE f.tenant_id = tenants.id), 0) AS failed_total, "
    "created_at"
)


def validate_tenant_id(tenant_id: str) -> str:
    if not _TENANT_ID.fullmatch(tenant_id or ""):
        raise ValidationError(
            f"tenant id {tenant_id[:40]!r} must be 1-100 letters, digits, '.', '_' or '-'",
            field="id",
        )
    return tenant_id


def _account_sid(value: str) -> str:
    if not _ACCOUNT_SID.fullmatch(value or ""):
        raise ValidationError(
            "account SID must be AC followed by 32 hex digits", field="account_sid"
        )
    return value


def _auth_token(value: str) -> str:
    if not value or len(value) < 8 or len(value) > 200 or not value.isprintable():
        raise ValidationError("auth token must be 8-200 printable characters", field="auth_token")
    return value


def _positive_int(value: int | None, name: str) -> int | None:
    if value is not None and (isinstance(value, bool) or value < 1 or value > 100_000):
        raise ValidationError(f"{name} must be a whole number from 1 to 100000", field=name)
    return value


def _positive_rate(value: float | None, name: str) -> float | None:
    if value is not None and not (0 < value <= 1_000_000):
        raise ValidationError(f"{name} must be more than 0 and at most 1000000", field=name)
    return value


def _senders(values: Sequence[str], field: str) -> list[str]:
    return sorted({normalize_phone(v, field=field) for v in values})


async def add_tenant(
    conn: queries.Conn,
    *,
    tenant_id: str,
    account_sid: str,
    auth_token: str,
    whatsapp_from: str,
    senders: Sequence[str] = (),
    name: str | None = None,
    max_concurrency: int | None = None,
    rate_per_second: float | None = None,
) -> dict[str, Any]:
    """`whatsapp_from` is the default sender; `senders` the others a message may name."""
    validate_tenant_id(tenant_id)
    default = normalize_phone(whatsapp_from, field="from")
    others = [n for n in _senders(senders, "sender") if n != default]
    row = await (
        await conn.execute(
            f"""INSERT INTO pgqueue.tenants
                    (id, name, account_sid, auth_token, whatsapp_from, senders,
                     max_concurrency, rate_per_second)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (id) DO NOTHING
                RETURNING {TENANT_PUBLIC}""",
            (
                tenant_id,
                name or tenant_id,
                _account_sid(account_sid),
                _auth_token(auth_token),
                default,
                others,
                _positive_int(max_concurrency, "max_concurrency"),
                _positive_rate(rate_per_second, "rate"),
            ),
        )
    ).fetchone()
    if row is None:
        raise ValidationError(
            f"tenant {tenant_id!r} exists already; change it with `pgqueue tenant set`",
            code="tenant_exists",
            field="id",
        )
    return row


async def list_tenants(conn: queries.Conn) -> list[dict[str, Any]]:
    cur = await conn.execute(f"SELECT {TENANT_PUBLIC} FROM pgqueue.tenants ORDER BY id")
    return await cur.fetchall()


async def get_tenant(conn: queries.Conn, tenant_id: str) -> dict[str, Any]:
    cur = await conn.execute(
        f"SELECT {TENANT_PUBLIC} FROM pgqueue.tenants WHERE id = %s", (tenant_id,)
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFoundError(f"no tenant {tenant_id!r}")
    return row


_UNSET: Any = object()


async def set_tenant(
    conn: queries.Conn,
    tenant_id: str,
    *,
    name: str | None = None,
    account_sid: str | None = None,
    auth_token: str | None = None,
    whatsapp_from: str | None = None,
    add_senders: Sequence[str] = (),
    remove_senders: Sequence[str] = (),
    max_concurrency: int | None = _UNSET,
    rate_per_second: float | None = _UNSET,
    paused: bool | None = None,
    fallback_content_sid: str | None = _UNSET,
    fallback_variable: str | None = _UNSET,
) -> dict[str, Any]:
    """Change what is given; `None` for max_concurrency / rate / fallback means 'back to
    the default' (queue limit, no own rate, no fallback)."""
    changes: dict[str, Any] = {}
    if name is not None:
        changes["name"] = name
    if account_sid is not None:
        changes["account_sid"] = _account_sid(account_sid)
    if auth_token is not None:
        changes["auth_token"] = _auth_token(auth_token)
    if whatsapp_from is not None:
        changes["whatsapp_from"] = normalize_phone(whatsapp_from, field="from")
    if add_senders or remove_senders:
        current = await get_tenant(conn, tenant_id)
        removed = set(_senders(remove_senders, "remove_sender"))
        default = changes.get("whatsapp_from", current["whatsapp_from"])
        if default in removed:
            raise ValidationError(
                f"{default} is the tenant's default sender; set another with --from first",
                field="remove_sender",
            )
        kept = set(current["senders"]) - removed
        changes["senders"] = sorted((kept | set(_senders(add_senders, "add_sender"))) - {default})
    if max_concurrency is not _UNSET:
        changes["max_concurrency"] = _positive_int(max_concurrency, "max_concurrency")
    if rate_per_second is not _UNSET:
        changes["rate_per_second"] = _positive_rate(rate_per_second, "rate")
    if fallback_content_sid is not _UNSET:
        if fallback_content_sid is not None and not _CONTENT_SID.fullmatch(fallback_content_sid):
            raise ValidationError(
                "fallback content SID must be HX followed by 32 hex digits",
                field="fallback_content_sid",
            )
        changes["fallback_content_sid"] = fallback_content_sid
    if fallback_variable is not _UNSET:
        changes["fallback_variable"] = fallback_variable
    if paused is not None:
        changes["paused"] = paused
        if not paused:
            changes["pause_reason"] = None
        else:
            changes["pause_reason"] = "paused by an operator"
    if not changes:
        return await get_tenant(conn, tenant_id)
    assignments = ", ".join(f"{col} = %({col})s" for col in changes)
    cur = await conn.execute(
        f"UPDATE pgqueue.tenants SET {assignments}, updated_at = now() "
        f"WHERE id = %(tenant_id)s RETURNING {TENANT_PUBLIC}",
        {**changes, "tenant_id": tenant_id},
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFoundError(f"no tenant {tenant_id!r}")
    if paused is False:
        # Resumed tenants' jobs are claimable again: wake the workers.
        await conn.execute("SELECT pg_notify('pgqueue_' || name, '') FROM pgqueue.queues")
    return row


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(conn: queries.Conn, tenant_id: str) -> str:
    """A new API token for the tenant. Only its hash is stored: show it once."""
    await get_tenant(conn, tenant_id)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(
        "INSERT INTO pgqueue.api_tokens (tenant_id, token_hash, prefix) VALUES (%s, %s, %s)",
        (tenant_id, hash_token(token), token[:12]),
    )
    return token


@dataclass(frozen=True)
class QueueLimits:
    name: str
    global_concurrency: int
    tenant_concurrency: int
    rate_per_second: float
    retention_days: int
    message_type_priorities: dict[str, int]
    active: int


async def get_queue(conn: queries.Conn, queue: str) -> QueueLimits:
    await queries.ensure_queue(conn, queue)
    cur = await conn.execute(
        "SELECT name, global_concurrency, tenant_concurrency, rate_per_second, "
        "retention_days, message_type_priorities, "
        "(SELECT count(*) FROM pgqueue.jobs j"
        " WHERE j.queue = queues.name AND j.state = 'active')::int AS active "
        "FROM pgqueue.queues WHERE name = %s",
        (queue,),
    )
    row = await cur.fetchone()
    if row is None:
        raise NotFoundError(f"no queue {queue!r}")
    return QueueLimits(**row)


async def set_queue(
    conn: queries.Conn,
    queue: str,
    *,
    global_concurrency: int | None = None,
    tenant_concurrency: int | None = None,
    rate_per_second: float | None = None,
    retention_days: int | None = None,
    message_type_priorities: dict[str, int] | None = None,
) -> QueueLimits:
    changes: dict[str, Any] = {}
    if global_concurrency is not None:
        changes["global_concurrency"] = _positive_int(global_concurrency, "global_concurrency")
    if tenant_concurrency is not None:
        changes["tenant_concurrency"] = _positive_int(tenant_concurrency, "tenant_concurrency")
    if rate_per_second is not None:
        changes["rate_per_second"] = _positive_rate(rate_per_second, "rate")
    if retention_days is not None:
        changes["retention_days"] = _positive_int(retention_days, "retention_days")
    if message_type_priorities is not None:
        from psycopg.types.json import Jsonb

        for key, value in message_type_priorities.items():
            if not isinstance(value, int) or not -100 <= value <= 100:
                raise ValidationError(
                    f"priority of message type {key!r} must be from -100 to 100",
                    field="message_type_priorities",
                )
        changes["message_type_priorities"] = Jsonb(message_type_priorities)
    await queries.ensure_queue(conn, queue)
    if changes:
        assignments = ", ".join(f"{col} = %({col})s" for col in changes)
        await conn.execute(
            f"UPDATE pgqueue.queues SET {assignments}, updated_at = now() WHERE name = %(queue)s",
            {**changes, "queue": queue},
        )
        await conn.execute("SELECT pg_notify('pgqueue_' || %s, '')", (queue,))
    return await get_queue(conn, queue)
