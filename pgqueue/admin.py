"""Tenants, API tokens and queue limits: what operators change, shared by the CLI and the API.

The limits live in the database so every worker and API process sees the same values.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pgqueue import queries
from pgqueue.credentials import Keyring, is_sealed
from pgqueue.enqueue import MAX_VALID_FOR_S, normalize_phone
from pgqueue.errors import NotFoundError, PgQueueError, ValidationError, first_line

_TENANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_ACCOUNT_SID = re.compile(r"^AC[0-9a-fA-F]{32}$")
_CONTENT_SID = re.compile(r"^HX[0-9a-fA-F]{32}$")
TOKEN_PREFIX = "pgq_"  # noqa: S105 - a marker, not a secret


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


def _sealed(value: str, keyring: Keyring | None) -> str:
    token = _auth_token(value)
    return token if keyring is None else keyring.seal(token)


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
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """`whatsapp_from` is the default sender; `senders` the others a message may name.
    The auth token is stored encrypted with `keyring`'s first key (plain without one)."""
    validate_tenant_id(tenant_id)
    default = normalize_phone(whatsapp_from, field="from")
    others = [n for n in _senders(senders, "sender") if n != default]
    row = await queries.fetch_one(
        conn,
        "admin_add_tenant",
        {
            "id": tenant_id,
            "name": name or tenant_id,
            "account_sid": _account_sid(account_sid),
            "auth_token": _sealed(auth_token, keyring),
            "whatsapp_from": default,
            "senders": others,
            "max_concurrency": _positive_int(max_concurrency, "max_concurrency"),
            "rate_per_second": _positive_rate(rate_per_second, "rate"),
        },
    )
    if row is None:
        raise ValidationError(
            f"tenant {tenant_id!r} exists already; change it with `pgqueue tenant set`",
            code="tenant_exists",
            field="id",
        )
    return await get_tenant(conn, tenant_id)


async def list_tenants(conn: queries.Conn) -> list[dict[str, Any]]:
    return await queries.fetch_all(conn, "admin_tenants", {"id": None})


async def get_tenant(conn: queries.Conn, tenant_id: str) -> dict[str, Any]:
    row = await queries.fetch_one(conn, "admin_tenants", {"id": tenant_id})
    if row is None:
        raise NotFoundError(f"no tenant {tenant_id!r}")
    return row


_UNSET: Any = object()
# What set_tenant may change (queries.sql admin_set_tenant).
_TENANT_SETTABLE = (
    "name",
    "account_sid",
    "auth_token",
    "whatsapp_from",
    "senders",
    "max_concurrency",
    "rate_per_second",
    "fallback_content_sid",
    "fallback_variable",
    "paused",
    "pause_reason",
    "webhook_url",
    "webhook_secret",
)
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)


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
    webhook_url: str | None = _UNSET,
    new_webhook_secret: bool = False,
    keyring: Keyring | None = None,
) -> dict[str, Any]:
    """Change what is given; `None` for max_concurrency / rate / fallback / webhook means
    'back to the default' (queue limit, no own rate, no fallback, no webhook). A new auth
    token or webhook secret is stored encrypted with `keyring`'s first key (plain without
    one). A tenant's first webhook URL, or `new_webhook_secret`, makes a new secret: the
    answer's `webhook_secret` shows it, once."""
    changes: dict[str, Any] = {}
    secret: str | None = None
    if webhook_url is not _UNSET:
        changes["webhook_url"] = None if webhook_url is None else _webhook_url(webhook_url)
        current = await get_tenant(conn, tenant_id)
        new_webhook_secret = new_webhook_secret or (
            webhook_url is not None and current["webhook_url"] is None
        )
    if new_webhook_secret:
        secret = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
        changes["webhook_secret"] = secret if keyring is None else keyring.seal(secret)
    if name is not None:
        changes["name"] = name
    if account_sid is not None:
        changes["account_sid"] = _account_sid(account_sid)
    if auth_token is not None:
        changes["auth_token"] = _sealed(auth_token, keyring)
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
    params = {col: changes.get(col) for col in _TENANT_SETTABLE}
    row = await queries.fetch_one(
        conn, "admin_set_tenant", {**params, "set": list(changes), "id": tenant_id}
    )
    if row is None:
        raise NotFoundError(f"no tenant {tenant_id!r}")
    if changes.get("webhook_url"):
        await queries.execute(conn, "admin_webhook_start", {"id": tenant_id})
    if paused is False:
        # Resumed tenants' jobs are claimable again: wake the workers.
        await queries.execute(conn, "notify_all_queues", {})
    return {**await get_tenant(conn, tenant_id), "webhook_secret": secret}


def _webhook_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or len(value) > 2000:
        raise ValidationError(
            "webhook URL must be an http:// or https:// URL with a host (at most 2000 "
            "characters), or 'none'",
            field="webhook_url",
        )
    return value


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


MAX_TOKEN_DAYS = 3650


async def create_token(
    conn: queries.Conn, tenant_id: str, *, expires_in_days: int | None = None
) -> str:
    """A new API token for the tenant, valid for `expires_in_days` (None: until revoked).
    Only its hash is stored: show it once."""
    if expires_in_days is not None and (
        isinstance(expires_in_days, bool) or not 1 <= expires_in_days <= MAX_TOKEN_DAYS
    ):
        raise ValidationError(
            f"expires in days must be a whole number from 1 to {MAX_TOKEN_DAYS}",
            field="expires_in_days",
        )
    await get_tenant(conn, tenant_id)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    await queries.execute(
        conn,
        "admin_create_token",
        {
            "tenant_id": tenant_id,
            "token_hash": hash_token(token),
            "prefix": token[:12],
            "expires_in_days": expires_in_days,
        },
    )
    return token


async def list_tokens(conn: queries.Conn, tenant_id: str | None = None) -> list[dict[str, Any]]:
    return await _tokens(conn, tenant=tenant_id)


async def _tokens(
    conn: queries.Conn,
    *,
    tenant: str | None = None,
    id: int | None = None,
    prefix: str | None = None,
    token_hash: str | None = None,
) -> list[dict[str, Any]]:
    """API tokens as `token list` shows them (never the hash), narrowed by what is given."""
    return await queries.fetch_all(
        conn,
        "admin_tokens",
        {"tenant": tenant, "id": id, "prefix": prefix, "token_hash": token_hash},
    )


async def revoke_token(conn: queries.Conn, ref: str) -> dict[str, Any]:
    """Revoke one token, named by its id, its prefix (as `token list` shows them) or the
    token itself. Revoking a revoked token changes nothing and says when it was. API
    processes stop taking it within their token cache's time (api.LOCAL_TOKEN_TTL_S;
    api.TOKEN_TTL_S through Redis)."""
    ref = ref.strip()
    if ref.isascii() and ref.isdigit() and len(ref) <= 18:
        found = await _tokens(conn, id=int(ref))
    elif ref.startswith(TOKEN_PREFIX) and len(ref) > 12:
        found = await _tokens(conn, token_hash=hash_token(ref))
    elif ref.startswith(TOKEN_PREFIX) and len(ref) == 12:
        found = await _tokens(conn, prefix=ref)
    else:
        raise ValidationError(
            f"{ref[:20]!r} is not a token id, a token prefix (pgq_ and 8 characters, "
            "as `pgqueue token list` shows) or a token",
            field="token",
        )
    if not found:
        raise NotFoundError(f"no API token {ref[:20]!r}")
    if len(found) > 1:
        ids = ", ".join(str(r["id"]) for r in found)
        raise ValidationError(
            f"prefix {ref!r} names {len(found)} tokens (ids {ids}); revoke one by its id",
            code="ambiguous_token",
            field="token",
        )
    revoked = await queries.fetch_one(conn, "admin_revoke_token", {"id": found[0]["id"]})
    row = (await _tokens(conn, id=found[0]["id"]))[:1] if revoked else []
    if not row:  # deleted with its tenant meanwhile
        raise NotFoundError(f"no API token {ref[:20]!r}")
    return row[0]


@dataclass(frozen=True)
class Rotated:
    tenants: int
    were_plain: int


async def rotate_key(conn: queries.Conn, keyring: Keyring) -> Rotated:
    """Every tenant's auth token (and webhook secret) encrypted again with the keyring's
    first key (plain ones for the first time), in one transaction that locks the tenants'
    rows, so a token changed meanwhile is not overwritten. Raises CredentialError,
    changing nothing, when a token is encrypted with a key the keyring lacks."""
    async with conn.transaction():
        rows = await queries.fetch_all(conn, "admin_lock_auth_tokens", {})
        fresh = [
            {
                "auth_token": keyring.reseal(r["auth_token"]),
                "webhook_secret": r["webhook_secret"] and keyring.reseal(r["webhook_secret"]),
                "id": r["id"],
            }
            for r in rows
        ]
        async with conn.cursor() as update:
            await update.executemany(queries.sql("admin_store_auth_token"), fresh)
    return Rotated(tenants=len(rows), were_plain=sum(not is_sealed(r["auth_token"]) for r in rows))


@dataclass(frozen=True)
class QueueLimits:
    name: str
    global_concurrency: int
    tenant_concurrency: int
    rate_per_second: float
    retention_days: int
    message_type_priorities: dict[str, int]
    message_type_ttls: dict[str, float]
    active: int


async def get_queue(conn: queries.Conn, queue: str) -> QueueLimits:
    await queries.ensure_queue(conn, queue)
    row = await queries.fetch_one(conn, "admin_queue", {"queue": queue})
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
    message_type_ttls: dict[str, float | None] | None = None,
) -> QueueLimits:
    """Changes what is given. `message_type_ttls` adds to the queue's TTLs per message
    type (seconds a message of that type may wait when it gives no deadline); a type
    given None loses its TTL."""
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
        for key, value in message_type_priorities.items():
            if not isinstance(value, int) or not -100 <= value <= 100:
                raise ValidationError(
                    f"priority of message type {key!r} must be from -100 to 100",
                    field="message_type_priorities",
                )
        changes["message_type_priorities"] = Jsonb(message_type_priorities)
    if message_type_ttls is not None:
        for key, ttl in message_type_ttls.items():
            if ttl is not None and not 1 <= ttl <= MAX_VALID_FOR_S:
                raise ValidationError(
                    f"TTL of message type {key!r} must be from 1 to {MAX_VALID_FOR_S} seconds",
                    field="message_type_ttls",
                )
        changes["message_type_ttls"] = Jsonb(message_type_ttls)
    await queries.ensure_queue(conn, queue)
    if changes:
        limits = (
            "global_concurrency",
            "tenant_concurrency",
            "rate_per_second",
            "retention_days",
            "message_type_priorities",
            "message_type_ttls",
        )
        await queries.execute(
            conn, "admin_set_queue", {**{k: changes.get(k) for k in limits}, "queue": queue}
        )
        await queries.execute(conn, "notify_queue", {"queue": queue, "payload": None})
    return await get_queue(conn, queue)


ROLES = ("pgqueue_api", "pgqueue_worker", "pgqueue_inspector")


async def apply_roles(conn: queries.Conn, *, create: bool) -> list[dict[str, Any]]:
    """Each group role with its state (created, granted or missing) and its members."""
    try:
        rows = await queries.fetch_all(conn, "apply_roles", {"create": create})
    except psycopg.errors.InsufficientPrivilege as e:
        raise PgQueueError(
            f"{first_line(e)} (run `pgqueue roles` as the schema's owner; creating the "
            "roles needs CREATEROLE too, or --no-create to grant to the roles that exist)"
        ) from None
    found = await queries.fetch_all(conn, "role_members", {"roles": [r["role"] for r in rows]})
    members = {r["role"]: r["members"] for r in found}
    return [{**r, "members": members.get(r["role"], [])} for r in rows]
