"""The HTTP API: a Starlette app of thin routes over enqueue, jobs, metrics and admin.

Contract, for every route:

* answers are JSON; an error is `{"error": code, "message": ...}` (plus `field`, and
  `index` for a batch) with the right 4xx. Bad input is refused before the database is
  touched. A database that cannot be reached is a 503 with Retry-After within a few
  seconds, never a 500 and never a hang. No traceback and no secret reaches a client.
* `Authorization: Bearer <token>`: a tenant token (stored hashed, see admin.py) scopes
  every route to its own tenant, so another tenant's job is simply not found; the admin
  token (PGQUEUE_ADMIN_TOKEN) sees every tenant but cannot send.
* A checked token is trusted by this process for 5 s, so a revoked token stops working
  within 5 s; no cache trusts a token past its expiry. Redis (REDIS_URL) is only a
  cache: token -> tenant for 60 s (keyed by the token's sha256, never the token) and the
  metrics answer for 1 s. When Redis is down the database answers, and a dead Redis is
  left alone for a few seconds instead of being asked on every request.
* A client address that fails authentication PGQUEUE_AUTH_FAILURES_PER_MINUTE times in
  a minute gets 429 for the rest of that minute, whatever token it sends then, so a
  token cannot be guessed faster than that (per API process).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import psycopg
import uvicorn
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from twilio.request_validator import RequestValidator

from pgqueue import admin, dashboard, jobs, migrate, queries
from pgqueue.config import Settings
from pgqueue.credentials import CredentialError, Keyring
from pgqueue.db import make_pool, resolve_database_url
from pgqueue.enqueue import (
    BatchValidationError,
    enqueue_whatsapp_send,
    enqueue_whatsapp_send_batch,
    refusal,
    validate,
)
from pgqueue.errors import (
    DatabaseUnavailableError,
    NotFoundError,
    PermanentSendError,
    PgQueueError,
    RequestTimeoutError,
    TenantSendError,
    TransientSendError,
    ValidationError,
)
from pgqueue.logs import setup_logging
from pgqueue.metrics import queue_metrics
from pgqueue.models import Enqueued, Job, Message
from pgqueue.providers.default import default_provider
from pgqueue.server import BodyDeadline, uvicorn_options
from pgqueue.statuses import apply_status

log = logging.getLogger("pgqueue.api")

MAX_BODY = 64 * 1024
# A full batch (1,000 messages of up to 1,600 characters) cannot fit in 64 KiB.
MAX_BATCH_BODY = 8 * 1024 * 1024
MAX_BATCH = 1000
TOKEN_TTL_S = 60
# Each process also remembers tokens it has seen for a few seconds: the lookup is the
# larger half of an enqueue's cost. A revoked token stops working within this long (and
# within TOKEN_TTL_S when Redis is configured).
LOCAL_TOKEN_TTL_S = 5.0
LOCAL_TOKENS_MAX = 10_000
AUTH_FAILURE_WINDOW_S = 60.0
# Client addresses whose failures are remembered; past this the oldest are forgotten, so
# a flood from many addresses costs bounded memory (and lets those addresses guess again).
AUTH_FAILURE_CLIENTS_MAX = 100_000
METRICS_TTL_S = 1.0
RETRY_AFTER_S = 5
# After a database failure: how long to remember it, and the wait for a connection then.
DOWN_MEMORY_S = 5.0
DOWN_TIMEOUT_S = 0.5
_MAX_JOB_ID = 2**63 - 1
_TENANT_IN_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# RFC 3339, the profile of ISO 8601 with a mandatory zone that JSON Schema's date-time is.
_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


class HttpError(PgQueueError):
    """An answer other than success, decided in this module (status, code, message)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.field = field
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def _error(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {"error": code, "message": message}
    if field is not None:
        body["field"] = field
    body.update(extra or {})
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _unavailable(message: str, retry_after: float = RETRY_AFTER_S) -> JSONResponse:
    return _error(
        503,
        "database_unavailable",
        message,
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def error_response(exc: BaseException) -> JSONResponse:
    """The client's view of a failure. Messages of our own errors are written for
    clients; anything else is logged here and answered without its details."""
    if isinstance(exc, HttpError):
        return _error(
            exc.status, exc.code, exc.message, field=exc.field, headers=exc.headers, extra=exc.extra
        )
    if isinstance(exc, BatchValidationError):
        field = f"messages[{exc.index}]" + (f".{exc.field}" if exc.field else "")
        return _error(422, exc.code, exc.message, field=field, extra={"index": exc.index})
    if isinstance(exc, ValidationError):
        status = (
            409 if exc.code in ("not_failed", "not_cancelable", "idempotency_conflict") else 422
        )
        return _error(status, exc.code, exc.message, field=exc.field)
    if isinstance(exc, NotFoundError):
        return _error(404, "not_found", exc.message)
    if isinstance(exc, PermanentSendError):
        return _error(422, "send_failed", exc.message, extra={"providerCode": exc.provider_code})
    if isinstance(exc, TenantSendError):
        return _error(
            502, "provider_rejected_tenant", exc.message, extra={"providerCode": exc.provider_code}
        )
    if isinstance(exc, TransientSendError):
        return _error(
            503,
            "provider_unavailable",
            exc.message,
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after or RETRY_AFTER_S)))},
            extra={"providerCode": exc.provider_code},
        )
    if isinstance(exc, DatabaseUnavailableError):
        return _unavailable(exc.message)
    if isinstance(exc, RequestTimeoutError):
        # The rest of the body is not waited for, so the connection cannot be reused.
        return _error(408, exc.code, exc.message, headers={"Connection": "close"})
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        log.error("the database is not migrated: %s", exc)
        return _error(
            503,
            "database_not_migrated",
            "the database schema is missing or old; run `pgqueue migrate`",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if isinstance(exc, psycopg.OperationalError):
        # PoolTimeout and PoolClosed are OperationalErrors too.
        log.warning(
            "database unavailable: %s", (str(exc).strip() or type(exc).__name__).splitlines()[0]
        )
        return _unavailable("the database is unavailable; retry later")
    if isinstance(exc, TimeoutError):
        log.warning("request timed out")
        return _unavailable("the request timed out; retry later")
    if isinstance(exc, PgQueueError):
        return _error(400, exc.code, exc.message)
    log.error("unhandled error in the API", exc_info=exc)
    return _error(500, "internal_error", "internal error; the server log has the details")


# -- Redis as an optional cache --------------------------------------------------------


class Cache:
    """Redis, only ever a cache. Every failure is a miss and the caller asks the
    database; after one, Redis is not asked again for `backoff_s`, so a dead or
    unreachable Redis costs at most one short timeout every few seconds."""

    def __init__(self, url: str | None, *, timeout_s: float = 0.2, backoff_s: float = 5.0):
        self.url = url
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._client: Any = None
        self._down_until = 0.0

    def _redis(self) -> Any:
        if self.url is None or time.monotonic() < self._down_until:
            return None
        if self._client is None:
            from redis.asyncio import Redis  # noqa: PLC0415 (optional)
            from redis.asyncio.retry import Retry  # noqa: PLC0415 (optional)
            from redis.backoff import NoBackoff  # noqa: PLC0415 (optional)

            self._client = Redis.from_url(
                self.url,
                socket_timeout=self.timeout_s,
                socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0),
                decode_responses=True,
            )
        return self._client

    def _failed(self, exc: BaseException) -> None:
        if time.monotonic() >= self._down_until:
            log.warning(
                "redis unavailable (%s); using the database for %.0f s",
                type(exc).__name__,
                self.backoff_s,
            )
        self._down_until = time.monotonic() + self.backoff_s

    async def get(self, key: str) -> str | None:
        client = self._redis()
        if client is None:
            return None
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                value = await client.get(key)
        except Exception as exc:  # any Redis trouble is a cache miss, by design
            self._failed(exc)
            return None
        return None if value is None else str(value)

    async def set(self, key: str, value: str, *, ttl_s: float) -> None:
        client = self._redis()
        if client is None:
            return
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await client.set(key, value, px=max(1, int(ttl_s * 1000)))
        except Exception as exc:  # a cache that cannot store is still not an error
            self._failed(exc)

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


# -- request parsing -------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit`: by Content-Length before reading, and by
    the bytes actually received (a client may omit or understate the length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "invalid_content_length", "Content-Length must be a number")
        if int(declared) > limit:
            raise HttpError(
                413, "body_too_large", f"the request body must be at most {limit} bytes"
            )
    received = bytearray()
    try:
        async for chunk in request.stream():
            received += chunk
            if len(received) > limit:
                raise HttpError(
                    413, "body_too_large", f"the request body must be at most {limit} bytes"
                )
    except ClientDisconnect:
        raise HttpError(400, "client_disconnected", "the client went away") from None
    return bytes(received)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def _read_json(request: Request, limit: int) -> Any:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise HttpError(415, "unsupported_media_type", "send the body as application/json")
    raw = await _read_body(request, limit)
    if not raw.strip():
        raise HttpError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not valid JSON"
        raise HttpError(
            400, "invalid_json", f"the request body is not valid JSON: {detail}"
        ) from None


# JSON field -> (Message attribute, accepted JSON type, type name for the message).
_FIELDS: dict[str, tuple[str, type, str]] = {
    "phoneNumber": ("phone_number", str, "a string"),
    "text": ("text", str, "a string"),
    "contentSid": ("content_sid", str, "a string"),
    "contentVariables": ("content_variables", dict, "an object"),
    "fromNumber": ("from_number", str, "a string"),
    "conversationId": ("conversation_id", str, "a string"),
    "priority": ("priority", int, "a whole number"),
    "sendAt": ("send_at", str, "a string (ISO 8601 date and time with a zone)"),
    "idempotencyKey": ("idempotency_key", str, "a string"),
    "messageType": ("message_type", str, "a string"),
}


def _check_text(value: str, field: str) -> None:
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded: both would
    # fail in the database, so they are refused here as the bad input they are.
    if "\x00" in value:
        raise HttpError(422, "invalid_characters", f"{field} must not contain NUL", field=field)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HttpError(
            422, "invalid_characters", f"{field} is not valid Unicode text", field=field
        ) from None


def _check_variables(value: dict[str, Any], field: str) -> None:
    for key, item in value.items():
        _check_text(key, field)
        if isinstance(item, str):
            _check_text(item, field)
        elif isinstance(item, float) and not math.isfinite(item):
            raise HttpError(
                422,
                "invalid_content_variables",
                f"{field} values must be strings or finite numbers",
                field=field,
            )


def _send_at(value: str, field: str) -> datetime:
    if not _RFC3339.fullmatch(value):
        raise HttpError(
            422,
            "invalid_send_at",
            "sendAt must be an ISO 8601 date and time with a zone, e.g. 2026-01-31T18:00:00Z",
            field=field,
        )
    try:
        return datetime.fromisoformat(value.upper())
    except ValueError:
        raise HttpError(
            422, "invalid_send_at", "sendAt is not a real date and time", field=field
        ) from None


def message_from_json(
    body: object, tenant_id: str, *, prefix: str = "", idempotency_header: str | None = None
) -> Message:
    """A Message from one JSON object, or HttpError (422) naming the field: unknown
    fields and wrong types are refused here; values are checked by enqueue.validate."""
    if not isinstance(body, dict):
        where = prefix.rstrip(".") or "body"
        raise HttpError(422, "invalid_type", f"{where} must be a JSON object", field=where)
    unknown = sorted(k for k in body if k not in _FIELDS)
    if unknown:
        name = unknown[0][:60]
        raise HttpError(
            422,
            "unknown_field",
            f"unknown field {name!r}; known fields: {', '.join(_FIELDS)}",
            field=prefix + name,
        )
    values: dict[str, Any] = {}
    for name, (attr, kind, kind_name) in _FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        field = prefix + name
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise HttpError(422, "invalid_type", f"{field} must be {kind_name}", field=field)
        if isinstance(value, str):
            _check_text(value, field)
        if isinstance(value, dict):
            _check_variables(value, field)
        values[attr] = _send_at(str(value), field) if name == "sendAt" else value
    if idempotency_header is not None:
        _check_text(idempotency_header, "Idempotency-Key")
        in_body = values.get("idempotency_key")
        if in_body is not None and in_body != idempotency_header:
            raise HttpError(
                422,
                "invalid_request",
                "the Idempotency-Key header and idempotencyKey differ; send one of them",
                field=prefix + "idempotencyKey",
            )
        values["idempotency_key"] = idempotency_header
    return Message(tenant_id=tenant_id, phone_number=values.pop("phone_number", ""), **values)


def _known_parameters(request: Request, known: tuple[str, ...]) -> None:
    for name in request.query_params:
        if name not in known:
            hint = f"; known: {', '.join(known)}" if known else "; this route takes none"
            raise HttpError(
                422,
                "unknown_parameter",
                f"unknown query parameter {name[:60]!r}{hint}",
                field=name[:60],
            )


def _token_shape(token: str) -> bool:
    """Tokens are made by admin.create_token; anything else is not looked up at all."""
    return token.startswith(admin.TOKEN_PREFIX) and len(token) <= 200


def _job_id(request: Request) -> int:
    raw = str(request.path_params.get("job_id", ""))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and 1 <= int(raw) <= _MAX_JOB_ID):
        raise HttpError(404, "not_found", f"no job {raw[:30]!r}")
    return int(raw)


def parse_older_than(text: str, *, now: datetime | None = None) -> datetime:
    """`7d`, `12h`, `30m`, `90s`, `2w` ago, or an ISO 8601 moment with a zone."""
    return jobs.parse_older_than(text, now=now, field="olderThan")


# -- answers ---------------------------------------------------------------------------


def _enqueued_json(result: Enqueued) -> dict[str, Any]:
    return {
        "jobId": result.job_id,
        "queuePosition": {"state": result.state, "ahead": result.ahead},
        "duplicate": result.duplicate,
    }


# -- the application -------------------------------------------------------------------


class AuthFailures:
    """Failed authentications per client address, counted over a minute from the first
    one. Kept in this process's memory: the limit holds per API process, and a restart
    forgets it."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._seen: dict[str, tuple[float, int]] = {}

    def retry_after(self, client: str, now: float) -> float | None:
        """Seconds until `client` may authenticate again; None when it may now."""
        entry = self._seen.get(client)
        if entry is None:
            return None
        start, failures = entry
        if now - start >= AUTH_FAILURE_WINDOW_S:
            del self._seen[client]
            return None
        return start + AUTH_FAILURE_WINDOW_S - now if failures >= self.per_minute else None

    def failed(self, client: str, now: float) -> None:
        entry = self._seen.get(client)
        if entry is None or now - entry[0] >= AUTH_FAILURE_WINDOW_S:
            self._seen.pop(client, None)
            if len(self._seen) >= AUTH_FAILURE_CLIENTS_MAX:
                self._forget(now)
            self._seen[client] = (now, 1)
        else:
            self._seen[client] = (entry[0], entry[1] + 1)

    def _forget(self, now: float) -> None:
        # Windows start in insertion order, so the oldest are first.
        stale = [c for c, (start, _) in self._seen.items() if now - start >= AUTH_FAILURE_WINDOW_S]
        if len(stale) < AUTH_FAILURE_CLIENTS_MAX // 4:
            stale += list(self._seen)[: AUTH_FAILURE_CLIENTS_MAX // 4]
        for client in stale:
            self._seen.pop(client, None)


def _cached_token(value: str | None) -> tuple[str, float]:
    """(tenant, seconds still valid) of a cached token; ("", 0) for a miss."""
    tenant, _, until = (value or "").partition(" ")
    if not until:
        return tenant, math.inf
    try:
        return tenant, float(until) - time.time()
    except ValueError:
        return "", 0.0


def _client_address(request: Request) -> str:
    # uvicorn has already replaced it with X-Forwarded-For's for a trusted proxy
    # (FORWARDED_ALLOW_IPS, 127.0.0.1 by default).
    return request.client.host if request.client is not None else "unknown"


@dataclass(frozen=True)
class Caller:
    """Who is asking: a tenant, or the admin (`tenant_id` None)."""

    tenant_id: str | None


Handler = Callable[[Request], Awaitable[Response]]


class Api:
    """The routes and what they share: settings, the pool, the cache, a provider for
    direct sends and the process's own HTTP metrics."""

    def __init__(
        self,
        settings: Settings,
        pool: AsyncConnectionPool[Any],
        *,
        db_timeout_s: float = 5.0,
        cache: Cache | None = None,
        local_token_ttl_s: float = LOCAL_TOKEN_TTL_S,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.queue = settings.queue_name
        self.db_timeout_s = db_timeout_s
        self.request_timeout_s = max(10.0, 2 * db_timeout_s + settings.send_timeout_s + 5.0)
        self.cache = cache or Cache(settings.redis_url)
        self.keyring = Keyring(settings.secret_keys)
        self.auth_failures = AuthFailures(settings.auth_failures_per_minute)
        self._admin_digest = (
            hashlib.sha256(settings.admin_token.encode()).hexdigest()
            if settings.admin_token
            else None
        )
        self._metrics_digest = (
            hashlib.sha256(settings.metrics_token.encode()).hexdigest()
            if settings.metrics_token
            else None
        )
        self._provider: Any = None
        self._head: str | None = None
        self._db_down_until = 0.0
        self.local_token_ttl_s = local_token_ttl_s
        self._tokens: dict[str, tuple[str, float]] = {}
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pgqueue_http_requests",
            "HTTP requests answered by this API process",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pgqueue_http_request_duration_seconds",
            "Time to answer an HTTP request in this API process",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )

    # -- plumbing ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def db(self) -> AsyncIterator[queries.Conn]:
        """A pooled connection. Right after the database failed, the wait for one is
        short, so an outage answers 503 at once instead of making every client wait out
        the full timeout; the first success restores the normal wait."""
        recently_down = time.monotonic() < self._db_down_until
        timeout = min(self.db_timeout_s, DOWN_TIMEOUT_S) if recently_down else self.db_timeout_s
        try:
            async with self.pool.connection(timeout=timeout) as conn:
                yield conn
        except psycopg.OperationalError:
            self._db_down_until = time.monotonic() + DOWN_MEMORY_S
            raise
        self._db_down_until = 0.0

    def route(
        self, path: str, handler: Handler, methods: list[str], *, query: tuple[str, ...] | None = ()
    ) -> Route:
        """Every route goes through here: one place for errors, timeouts and metrics.
        `query` names the query parameters the route takes; others are refused, as unknown
        body fields are (None: any, for callers that may add their own)."""
        template = path

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            try:
                if query is not None:
                    _known_parameters(request, query)
                async with asyncio.timeout(self.request_timeout_s):
                    response = await handler(request)
            except Exception as exc:
                response = error_response(exc)
            self.latency.labels(template).observe(time.perf_counter() - started)
            self.requests.labels(template, request.method, str(response.status_code)).inc()
            return response

        return Route(path, endpoint, methods=methods)

    def _scraper(self, request: Request) -> None:
        """With PGQUEUE_METRICS_TOKEN set, /metrics answers only that token or the admin's."""
        self._not_throttled(request)
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode("utf-8", "replace")).hexdigest()
        allowed = [d for d in (self._metrics_digest, self._admin_digest) if d is not None]
        if scheme.lower() != "bearer" or not any(hmac.compare_digest(digest, d) for d in allowed):
            raise self._refused(
                request,
                "invalid_token",
                "/metrics needs Authorization: Bearer <PGQUEUE_METRICS_TOKEN>",
            )

    def _not_throttled(self, request: Request) -> None:
        """429 for a client over its failed authentications, before its token is looked
        at: a right guess made while throttled must not be told apart from a wrong one."""
        wait = self.auth_failures.retry_after(_client_address(request), time.monotonic())
        if wait is not None:
            raise HttpError(
                429,
                "too_many_auth_failures",
                f"too many failed authentications from this address; retry in {math.ceil(wait)} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def _refused(self, request: Request, code: str, message: str) -> HttpError:
        """A 401 for a token that does not authenticate, counted against its client."""
        self.auth_failures.failed(_client_address(request), time.monotonic())
        return HttpError(401, code, message, headers={"WWW-Authenticate": "Bearer"})

    async def caller(self, request: Request) -> Caller:
        header = request.headers.get("authorization")
        if not header:
            raise HttpError(
                401,
                "missing_token",
                "send Authorization: Bearer <token>",
                headers={"WWW-Authenticate": "Bearer"},
            )
        self._not_throttled(request)
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self._refused(
                request, "invalid_token", "the Authorization header must be: Bearer <token>"
            )
        digest = hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return Caller(None)
        now = time.monotonic()
        known = self._tokens.get(digest)
        if known is not None and known[1] > now:
            return Caller(known[0])
        key = f"pgqueue:token:{digest}"
        cached = await self.cache.get(key)
        # Cached as "tenant" or "tenant <epoch s it expires>" (a tenant id has no space).
        tenant, valid_s = _cached_token(cached)
        if not tenant or valid_s <= 0:
            found = await self._tenant_for_token(digest) if _token_shape(token) else None
            if found is None:
                raise self._refused(
                    request, "invalid_token", "the token is unknown, expired or revoked"
                )
            tenant, valid_s = found
            value = tenant if math.isinf(valid_s) else f"{tenant} {time.time() + valid_s:.3f}"
            await self.cache.set(key, value, ttl_s=min(TOKEN_TTL_S, valid_s))
        if len(self._tokens) >= LOCAL_TOKENS_MAX:
            self._tokens.clear()
        self._tokens[digest] = (tenant, now + min(self.local_token_ttl_s, valid_s))
        return Caller(tenant)

    async def _tenant_for_token(self, digest: str) -> tuple[str, float] | None:
        """The token's tenant and for how many seconds it is still valid (inf: until
        revoked); None for an unknown, expired or revoked token."""
        async with self.db() as conn:
            row = await queries.fetch_one(conn, "api_tenant_for_token", {"token_hash": digest})
        if row is None:
            return None
        valid_s = math.inf if row["valid_s"] is None else float(row["valid_s"])
        return str(row["tenant_id"]), valid_s

    async def tenant_caller(self, request: Request) -> str:
        caller = await self.caller(request)
        if caller.tenant_id is None:
            raise HttpError(
                403,
                "tenant_token_required",
                "messages are sent with a tenant's token, not the admin token",
            )
        return caller.tenant_id

    @staticmethod
    def scope(caller: Caller, request: Request) -> str | None:
        """The tenant a request is about: a tenant token's own; for the admin, the
        optional `tenant` query parameter (None = every tenant)."""
        wanted = request.query_params.get("tenant")
        if wanted is not None:
            if not wanted:
                raise HttpError(422, "invalid_request", "tenant must not be empty", field="tenant")
            _check_text(wanted, "tenant")
        if caller.tenant_id is None:
            return wanted
        if wanted is not None and wanted != caller.tenant_id:
            raise HttpError(403, "forbidden", "a tenant token sees only its own tenant")
        return caller.tenant_id

    async def aclose(self) -> None:
        await self.cache.aclose()
        provider, self._provider = self._provider, None
        if provider is not None:
            await provider.aclose()

    # -- sending -----------------------------------------------------------------------

    async def send(self, request: Request) -> Response:
        tenant_id = await self.tenant_caller(request)
        body = await _read_json(request, MAX_BODY)
        message = message_from_json(
            body, tenant_id, idempotency_header=request.headers.get("idempotency-key")
        )
        if not self.settings.queue_enabled:
            return JSONResponse(await self._direct_send(message))
        async with self.db() as conn:
            result = await enqueue_whatsapp_send(
                conn, message, queue=self.queue, max_attempts=self.settings.max_attempts
            )
        return JSONResponse(
            {
                "status": "queued",
                "message": "Message queued for sending",
                **_enqueued_json(result),
            },
            status_code=202,
            headers={"Location": f"/api/jobs/{result.job_id}"},
        )

    async def send_batch(self, request: Request) -> Response:
        tenant_id = await self.tenant_caller(request)
        if not self.settings.queue_enabled:
            raise HttpError(
                409,
                "queue_disabled",
                "batch sends need the queue (WHATSAPP_SEND_QUEUE_ENABLED=true); "
                "send messages one at a time",
            )
        body = await _read_json(request, MAX_BATCH_BODY)
        if not isinstance(body, dict):
            raise HttpError(422, "invalid_type", "body must be a JSON object", field="body")
        unknown = sorted(k for k in body if k != "messages")
        if unknown:
            raise HttpError(
                422,
                "unknown_field",
                f'unknown field {unknown[0][:60]!r}; a batch is {{"messages": [...]}}',
                field=unknown[0][:60],
            )
        items = body.get("messages")
        if not isinstance(items, list):
            raise HttpError(
                422, "invalid_type", "messages must be an array of messages", field="messages"
            )
        if not 1 <= len(items) <= MAX_BATCH:
            raise HttpError(
                422,
                "batch_too_large" if items else "invalid_request",
                f"a batch holds 1 to {MAX_BATCH} messages, got {len(items)}",
                field="messages",
            )
        messages = []
        for i, item in enumerate(items):
            try:
                messages.append(message_from_json(item, tenant_id, prefix=f"messages[{i}]."))
            except HttpError as exc:
                exc.extra["index"] = i
                raise
        async with self.db() as conn:
            results = await enqueue_whatsapp_send_batch(
                conn, messages, queue=self.queue, max_attempts=self.settings.max_attempts
            )
        return JSONResponse(
            {
                "status": "queued",
                "message": f"{len(results)} messages queued for sending",
                "jobs": [_enqueued_json(r) for r in results],
            },
            status_code=202,
        )

    async def _direct_send(self, message: Message) -> dict[str, str]:
        """WHATSAPP_SEND_QUEUE_ENABLED=false: send now, answer as the old system did."""
        row = validate(message)
        async with self.db() as conn:
            tenant = await queries.fetch_one(
                conn, "api_tenant_credentials", {"tenant_id": row.tenant_id}
            )
            refused = await refusal(conn, row)
        if refused is not None:
            raise refused
        if tenant is None:
            raise ValidationError(
                f"unknown tenant {row.tenant_id!r}", code="unknown_tenant", field="tenantId"
            )
        if tenant["paused"]:
            raise HttpError(
                409,
                "tenant_paused",
                f"tenant {row.tenant_id} is paused ({tenant['pause_reason'] or 'no reason'}); "
                "an operator resumes it with `pgqueue tenant set ID --resume`",
            )
        try:
            return await self._deliver_now(tenant, row)
        except PermanentSendError as exc:
            if exc.suppress and exc.provider_code:
                async with self.db() as conn:
                    await queries.execute(
                        conn,
                        "suppress_number",
                        {
                            "tenant_id": row.tenant_id,
                            "phone_number": row.to_number,
                            "code": exc.provider_code,
                        },
                    )
            raise

    async def _deliver_now(self, tenant: Mapping[str, Any], row: Any) -> dict[str, str]:
        if self._provider is None:
            self._provider = default_provider(self.settings, self.pool)
        if self.settings.provider == "twilio":
            answer: dict[str, str] = await self._provider.direct_send(
                tenant_id=row.tenant_id,
                account_sid=tenant["account_sid"],
                auth_token=tenant["auth_token"],
                whatsapp_from=tenant["whatsapp_from"],
                to_number=row.to_number,
                body=row.body,
                content_sid=row.content_sid,
                content_variables=row.content_variables,
                from_number=row.from_number,
                fallback_content_sid=tenant["fallback_content_sid"],
                fallback_variable=tenant["fallback_variable"],
            )
            return answer
        # The sandbox sends jobs only; this one never was a row (id 0).
        now = datetime.now(UTC)
        job = Job(
            id=0,
            queue=self.queue,
            tenant_id=row.tenant_id,
            conversation=row.conversation,
            priority=row.priority or 0,
            to_number=row.to_number,
            from_number=row.from_number,
            body=row.body,
            content_sid=row.content_sid,
            content_variables=row.content_variables,
            message_type=row.message_type,
            attempts=1,
            max_attempts=1,
            claim_token=uuid.uuid4(),
            start_at=now,
            start_delay=0.0,
            created_at=now,
            lock_key=0,
            locked=False,
            account_sid=tenant["account_sid"],
            whatsapp_from=tenant["whatsapp_from"],
            auth_token=tenant["auth_token"],
        )
        result = await self._provider.send(job)
        return {
            "status": "ok",
            "message": "Successfully sent",
            "channel": result.channel,
            "sid": result.sid,
        }

    # -- queue and jobs ----------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        caller = await self.caller(request)
        tenant_id = self.scope(caller, request)
        key = f"pgqueue:metrics:{self.queue}:{tenant_id or '*'}"
        cached = await self.cache.get(key)
        if cached is not None:
            return Response(cached, media_type="application/json")
        async with self.db() as conn:
            data = await queue_metrics(conn, self.queue, tenant_id=tenant_id)
        text = json.dumps(data, separators=(",", ":"))
        await self.cache.set(key, text, ttl_s=METRICS_TTL_S)
        return Response(text, media_type="application/json")

    async def get_job(self, request: Request) -> Response:
        caller = await self.caller(request)
        job_id = _job_id(request)
        async with self.db() as conn:
            row = await jobs.get_job(conn, job_id, tenant_id=caller.tenant_id)
        return JSONResponse(jobs.job_json(row))

    async def cancel_job(self, request: Request) -> Response:
        caller = await self.caller(request)
        job_id = _job_id(request)
        async with self.db() as conn:
            await jobs.cancel_job(conn, job_id, queue=self.queue, tenant_id=caller.tenant_id)
        return JSONResponse({"jobId": job_id, "status": "canceled"})

    async def retry_job(self, request: Request) -> Response:
        caller = await self.caller(request)
        job_id = _job_id(request)
        async with self.db() as conn:
            row = await jobs.retry_job(conn, job_id, queue=self.queue, tenant_id=caller.tenant_id)
        return JSONResponse(jobs.job_json(row))

    async def clean_jobs(self, request: Request) -> Response:
        caller = await self.caller(request)
        tenant_id = self.scope(caller, request)
        state = request.query_params.get("state")
        if state is None:
            raise HttpError(
                422, "invalid_request", "state is required: state=failed", field="state"
            )
        if state != "failed":
            raise HttpError(
                422,
                "invalid_state",
                "only failed jobs (dead letters) can be cleaned: state=failed",
                field="state",
            )
        raw_age = request.query_params.get("olderThan")
        older_than = None if raw_age is None else parse_older_than(raw_age)
        async with self.db() as conn:
            deleted = await jobs.clean_failed(
                conn, queue=self.queue, older_than=older_than, tenant_id=tenant_id
            )
        return JSONResponse({"deleted": deleted})

    # -- Twilio status callbacks -------------------------------------------------------

    async def twilio_status(self, request: Request) -> Response:
        """Form-encoded, signed by Twilio with the tenant's auth token over the URL it
        was given (built from PGQUEUE_PUBLIC_URL, since proxies change the one we see).
        Without PGQUEUE_PUBLIC_URL the route is off (404): the only other URL to check the
        signature against is the request's own Host header, which the caller chooses."""
        if self.settings.public_base_url is None:
            raise HttpError(
                404, "not_found", "status callbacks are off: PGQUEUE_PUBLIC_URL is not set"
            )
        forbidden = HttpError(403, "invalid_signature", "the Twilio signature does not match")
        signature = request.headers.get("x-twilio-signature")
        tenant_in_path = request.path_params.get("tenant")
        if not signature or (
            tenant_in_path is not None and not _TENANT_IN_PATH.fullmatch(str(tenant_in_path))
        ):
            raise forbidden
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            raise HttpError(
                415, "unsupported_media_type", "Twilio posts application/x-www-form-urlencoded"
            )
        raw = await _read_body(request, MAX_BODY)

        try:
            pairs = parse_qsl(
                raw.decode("utf-8"),
                keep_blank_values=True,
                strict_parsing=False,
                max_num_fields=200,
            )
        except (UnicodeDecodeError, ValueError):
            raise forbidden from None
        if any("\x00" in k or "\x00" in v for k, v in pairs):
            raise HttpError(422, "invalid_callback", "the form holds NUL characters")
        form = _Form(pairs)
        url = self._callback_url(request, self.settings.public_base_url)
        async with self.db() as conn:
            if tenant_in_path is not None:
                row = await queries.fetch_one(
                    conn, "api_tenant_credentials", {"tenant_id": tenant_in_path}
                )
                candidates = [row] if row is not None else []
            else:
                account = form.get("AccountSid", "")
                candidates = await queries.fetch_all(
                    conn, "api_tenants_by_account", {"account_sid": account}
                )
        tenant_id = next(
            (c["id"] for c in candidates if self._signed_by(c, url, form, signature)), None
        )
        if tenant_id is None:
            raise forbidden

        def first(*names: str) -> str | None:
            return next((form[n] for n in names if form.get(n)), None)

        sid = first("MessageSid", "SmsSid")
        status = first("MessageStatus", "SmsStatus")
        if sid is None or status is None:
            raise HttpError(
                422,
                "invalid_callback",
                "MessageSid and MessageStatus are required",
                field="MessageStatus" if sid else "MessageSid",
            )
        code = first("ErrorCode")
        async with self.db() as conn:
            update = await apply_status(
                conn, tenant_id=tenant_id, sid=sid, status=status, error_code=code
            )
        # `held`: no message carries this SID yet (its send's completion has not
        # committed); maintenance applies the status once it has.
        return JSONResponse({"status": "ok", "updated": update.updated, "held": update.held})

    def _signed_by(self, tenant: Mapping[str, Any], url: str, form: _Form, signature: str) -> bool:
        """Whether `tenant`'s auth token (the HMAC key) signed the callback. A token this
        process cannot decrypt signs nothing: Twilio's retries get 403 until the keys
        are fixed."""
        try:
            auth_token = self.keyring.open(tenant["auth_token"])
        except CredentialError as exc:
            log.error("status callback for tenant %s not checked: %s", tenant["id"], exc.message)
            return False
        return _signed(auth_token, url, form, signature)

    @staticmethod
    def _callback_url(request: Request, public_base_url: str) -> str:
        raw_path = request.scope.get("raw_path")
        path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.url.path
        query = request.url.query
        return public_base_url.rstrip("/") + path + (f"?{query}" if query else "")

    # -- operations --------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def head_revision(self) -> str | None:
        if self._head is None:
            self._head = migrate.head_revision()
        return self._head

    async def readyz(self, request: Request) -> Response:
        try:
            head = self.head_revision()
        except PgQueueError as exc:
            return _error(503, "not_ready", exc.message)
        try:
            async with self.db() as conn:
                row = await queries.fetch_one(conn, "api_schema_version", {})
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            return _error(
                503,
                "not_ready",
                f"the database is not migrated (code expects {head}); run `pgqueue migrate`",
            )
        except (psycopg.OperationalError, TimeoutError):
            return _error(
                503,
                "not_ready",
                "the database is unreachable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        current = None if row is None else str(row["version_num"])
        if current != head:
            return _error(
                503,
                "not_ready",
                f"the database is at migration {current}, the code expects {head}; "
                "run `pgqueue migrate`",
            )
        return JSONResponse({"status": "ready", "database": "ok", "migration": current})

    async def prometheus(self, request: Request) -> Response:
        if self._metrics_digest is not None:
            self._scraper(request)
        async with self.db() as conn:
            snapshot = await _snapshot(conn, self.queue)
        own = generate_latest(self.registry)
        queue = generate_latest(_SnapshotCollector.registry(snapshot, self.queue))
        return Response(queue + own, media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_spec())


class _Form(dict[str, str]):
    """Form fields (the first value of each) that also hands Twilio's validator every
    value of a repeated field, as the MultiDicts it knows do."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        super().__init__()
        self._all: dict[str, list[str]] = {}
        for key, value in pairs:
            self._all.setdefault(key, []).append(value)
            self.setdefault(key, value)

    def getall(self, name: str) -> list[str]:
        return self._all[name]


def _signed(auth_token: str, url: str, form: _Form, signature: str) -> bool:
    return bool(RequestValidator(auth_token).validate(url, form, signature))


# -- Prometheus --------------------------------------------------------------------------


async def _snapshot(conn: queries.Conn, queue: str) -> dict[str, Any]:
    params = {"queue": queue, "tenant_id": None}
    return {
        "counts": await queries.fetch_one(conn, "api_queue_counts", params) or {},
        "state": await queries.fetch_one(conn, "api_queue_state", params),
        "tenants": await queries.fetch_all(conn, "api_tenants", params),
        "failures": await queries.fetch_all(conn, "api_recent_failures", params),
        "retrying": await queries.fetch_all(conn, "api_retrying_by_code", params),
    }


class _SnapshotCollector:
    """The queue as the database sees it at scrape time (all processes, all hosts)."""

    def __init__(self, snapshot: dict[str, Any], queue: str) -> None:
        self.snapshot = snapshot
        self.queue = queue

    @classmethod
    def registry(cls, snapshot: dict[str, Any], queue: str) -> Any:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(cls(snapshot, queue))
        return reg

    def collect(self) -> Any:
        q = self.queue
        counts = self.snapshot["counts"]
        depth = GaugeMetricFamily("pgqueue_jobs", "Live jobs by state", labels=["queue", "state"])
        for state in ("waiting", "delayed", "active"):
            depth.add_metric([q, state], float(counts.get(state) or 0))
        yield depth

        sends = CounterMetricFamily(
            "pgqueue_sends_completed",
            "Messages the provider accepted, per tenant",
            labels=["queue", "tenant"],
        )
        dead = GaugeMetricFamily(
            "pgqueue_dead_letters",
            "Failed jobs kept (dead letters), per tenant",
            labels=["queue", "tenant"],
        )
        in_flight = GaugeMetricFamily(
            "pgqueue_tenant_in_flight", "Sends in flight per tenant", labels=["queue", "tenant"]
        )
        limit = GaugeMetricFamily(
            "pgqueue_tenant_max_concurrency",
            "Sends in flight allowed per tenant",
            labels=["queue", "tenant"],
        )
        paused = GaugeMetricFamily(
            "pgqueue_tenant_paused", "1 when the tenant is paused", labels=["queue", "tenant"]
        )
        for t in self.snapshot["tenants"]:
            labels = [q, str(t["id"])]
            sends.add_metric(labels, float(t["completed_total"]))
            dead.add_metric(labels, float(t["failed_total"]))
            in_flight.add_metric(labels, float(t["active"]))
            limit.add_metric(labels, float(t["max_concurrency"] or 0))
            paused.add_metric(labels, 1.0 if t["paused"] else 0.0)
        yield from (sends, dead, in_flight, limit, paused)

        failures = GaugeMetricFamily(
            "pgqueue_failures_last_hour",
            "Jobs that died in the last hour, by error code",
            labels=["queue", "code"],
        )
        for f in self.snapshot["failures"]:
            failures.add_metric([q, str(f["code"])], float(f["n"]))
        yield failures
        retrying = GaugeMetricFamily(
            "pgqueue_jobs_retrying",
            "Live jobs waiting for a retry, by the error code of their last attempt",
            labels=["queue", "code"],
        )
        for r in self.snapshot["retrying"]:
            retrying.add_metric([q, str(r["code"])], float(r["n"]))
        yield retrying

        state = self.snapshot["state"]
        if state is None:
            return
        for name, help_text, key in (
            ("pgqueue_queue_in_flight", "Sends in flight in the whole queue", "in_flight"),
            (
                "pgqueue_queue_max_in_flight",
                "Sends in flight allowed in the queue",
                "global_concurrency",
            ),
            ("pgqueue_rate_limit_per_second", "Send starts allowed per second", "rate_per_second"),
            (
                "pgqueue_rate_booked_ahead_seconds",
                "How far ahead of now send starts are booked (a provider 429 pushes it out)",
                "rate_ahead_s",
            ),
            ("pgqueue_workers", "Workers that sent a heartbeat in the last minute", "workers"),
            (
                "pgqueue_oldest_due_waiting_seconds",
                "Age of the oldest message that is due and not yet sent",
                "oldest_due_s",
            ),
        ):
            gauge = GaugeMetricFamily(name, help_text, labels=["queue"])
            gauge.add_metric([q], float(state.get(key) or 0.0))
            yield gauge
        bucket = GaugeMetricFamily(
            "pgqueue_rate_bucket_level",
            "Send starts already booked ahead of now (rate_per_second x booked seconds)",
            labels=["queue"],
        )
        bucket.add_metric(
            [q], float(state.get("rate_ahead_s") or 0.0) * float(state["rate_per_second"])
        )
        yield bucket


# -- the application ---------------------------------------------------------------------


def create_app(
    settings: Settings,
    pool: AsyncConnectionPool[Any],
    *,
    db_timeout_s: float = 5.0,
    cache: Cache | None = None,
    local_token_ttl_s: float = LOCAL_TOKEN_TTL_S,
) -> Starlette:
    """The API over `pool`. A pool that is not open yet is opened by the app's lifespan
    (and closed by it); an open one stays the caller's. `db_timeout_s` bounds the wait
    for a connection, after which a request is answered 503; `local_token_ttl_s` is how
    long this process trusts a token it has checked (0: ask every time)."""
    api = Api(
        settings,
        pool,
        db_timeout_s=db_timeout_s,
        cache=cache,
        local_token_ttl_s=local_token_ttl_s,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if settings.public_base_url is None:
            log.warning(
                "Twilio status callbacks are off (/api/twilio/status answers 404): "
                "PGQUEUE_PUBLIC_URL is not set, and a signature checked against the "
                "request's own Host header proves nothing"
            )
        opened_here = pool.closed
        if opened_here:
            # Not waiting: the API starts even while the database is down; /readyz says so.
            await pool.open(wait=False)
        try:
            yield
        finally:
            await api.aclose()
            if opened_here:
                await pool.close()

    async def http_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
            return _error(exc.status_code, code, str(exc.detail), headers=exc.headers)
        return error_response(exc)

    routes = [
        api.route("/api/whatsapp/send", api.send, ["POST"]),
        api.route("/api/whatsapp/send/batch", api.send_batch, ["POST"]),
        api.route("/api/queue/metrics", api.metrics, ["GET"], query=("tenant",)),
        api.route("/api/jobs", api.clean_jobs, ["DELETE"], query=("state", "olderThan", "tenant")),
        api.route("/api/jobs/{job_id}", api.get_job, ["GET"]),
        api.route("/api/jobs/{job_id}", api.cancel_job, ["DELETE"]),
        api.route("/api/jobs/{job_id}/retry", api.retry_job, ["POST"]),
        # Query strings are part of what Twilio signs; they are checked there.
        api.route("/api/twilio/status", api.twilio_status, ["POST"], query=None),
        api.route("/api/twilio/status/{tenant}", api.twilio_status, ["POST"], query=None),
        api.route("/metrics", api.prometheus, ["GET"], query=None),
        api.route("/healthz", api.healthz, ["GET"], query=None),
        api.route("/readyz", api.readyz, ["GET"], query=None),
        api.route("/openapi.json", api.openapi, ["GET"], query=None),
        *dashboard.routes(settings, pool),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error, Exception: http_error},
        # A body that trickles in is answered 408 by the route (error_response), instead
        # of holding its request until the route's own timeout calls it a database 503.
        middleware=[Middleware(BodyDeadline, timeout_s=settings.http_body_timeout_s)],
    )
    app.state.api = api
    return app


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> int:
    """Run the API in this process with uvicorn until SIGINT/SIGTERM."""

    setup_logging(settings.log_format, preview=settings.log_preview)
    url = resolve_database_url(settings)
    pool = make_pool(url, min_size=2, max_size=10, application_name="pgqueue-api")
    app = create_app(settings, pool)
    _warn_if_not_migrated(app, url)
    mode = "queue " + settings.queue_name if settings.queue_enabled else "direct send (no queue)"
    log.info("pgqueue API on http://%s:%d (%s)", host, port, mode)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
        # Head size and time, keep-alive and connection limits (pgqueue/server.py).
        **uvicorn_options(settings),
    )
    server = _uvicorn_server_class()(config)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when it cannot bind
        return int(exc.code) if isinstance(exc.code, int) else 1
    return 0 if server.started else 1


def _uvicorn_server_class() -> Any:

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process
        would end "killed by a signal"; a drained API exits 0, as the worker does."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    return Server


def _warn_if_not_migrated(app: Starlette, url: str) -> None:
    try:
        current = migrate.current_revision(url)
        head = app.state.api.head_revision()
    except (psycopg.Error, PgQueueError) as exc:
        log.warning("cannot check migrations now (%s); /readyz will tell", type(exc).__name__)
        return
    if current != head:
        log.warning(
            "the database is at migration %s, the code expects %s: run `pgqueue migrate` "
            "(/readyz answers 503 until then)",
            current,
            head,
        )


# -- OpenAPI -----------------------------------------------------------------------------


def _err(description: str, codes: str) -> dict[str, Any]:
    return {
        "description": f"{description} (error codes: {codes})",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _json_ok(description: str, ref: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }
    if headers:
        out["headers"] = headers
    return out


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
_E400 = _err("Malformed request: the body is not JSON", "invalid_json, invalid_content_length")
_E401 = _err(
    "Missing, malformed, unknown, expired or revoked token", "missing_token, invalid_token"
)
_E403 = _err("The token may not do this", "tenant_token_required, forbidden")
_E404 = _err("Not found (another tenant's job is not found either)", "not_found")
_E413 = _err("The body is larger than allowed", "body_too_large")
_E408 = _err("The body did not arrive within PGQUEUE_HTTP_BODY_TIMEOUT", "request_timeout")
_E429 = {
    **_err(
        "Too many failed authentications from this client address in the last minute; "
        "retry after Retry-After seconds",
        "too_many_auth_failures",
    ),
    "headers": _RETRY_AFTER,
}
_E415 = _err("The body is not JSON", "unsupported_media_type")
_E503 = {
    **_err(
        "The database (or, for a direct send, the provider) is unavailable; retry after "
        "Retry-After seconds",
        "database_unavailable, database_not_migrated, provider_unavailable",
    ),
    "headers": _RETRY_AFTER,
}
_E422_QUERY = _err(
    "Bad or unknown query parameter", "unknown_parameter, invalid_request, invalid_characters"
)
_E422_SEND = _err(
    "A field is wrong: wrong type, unknown field, invalid phone number, empty or too long "
    "text, suppressed number, bad schedule; `field` names it",
    "invalid_type, unknown_field, invalid_characters, invalid_phone_number, invalid_text, "
    "text_too_long, missing_content, invalid_content, invalid_content_sid, "
    "invalid_content_variables, invalid_priority, invalid_send_at, invalid_message_type, "
    "number_suppressed, unknown_tenant, send_failed, invalid_request, unknown_parameter",
)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _message_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["phoneNumber"],
        "description": "One WhatsApp message: `text`, or `contentSid` with optional "
        "`contentVariables` (an approved template).",
        "properties": {
            "phoneNumber": {
                "type": "string",
                "description": "Recipient in E.164 (+14155550100); `whatsapp:` prefix allowed",
            },
            "text": _nullable({"type": "string", "minLength": 1, "maxLength": 1600}),
            "contentSid": _nullable(
                {"type": "string", "description": "Twilio Content SID: HX + 32 hex digits"}
            ),
            "contentVariables": _nullable(
                {
                    "type": "object",
                    "additionalProperties": {"oneOf": [{"type": "string"}, {"type": "number"}]},
                    "description": 'Template variables, e.g. {"1": "Ana"}',
                }
            ),
            "fromNumber": _nullable(
                {"type": "string", "description": "Sender; default: the tenant's"}
            ),
            "conversationId": _nullable(
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 200,
                    "description": "Messages of one conversation are sent in order, one at "
                    "a time. Default: tenant + phone number",
                }
            ),
            "priority": _nullable(
                {
                    "type": "integer",
                    "minimum": -100,
                    "maximum": 100,
                    "description": "Higher first; default from messageType, else 0",
                }
            ),
            "sendAt": _nullable(
                {
                    "type": "string",
                    "format": "date-time",
                    "description": "Send at (ISO 8601 with a zone, within a year)",
                }
            ),
            "idempotencyKey": _nullable(
                {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 200,
                    "description": "Repeating a key returns the first job (also the "
                    "Idempotency-Key header)",
                }
            ),
            "messageType": _nullable(
                {
                    "type": "string",
                    "description": "customer_service (priority 10), marketing (5), "
                    "notification (0), or another lower-case word",
                }
            ),
        },
    }


def openapi_spec() -> dict[str, Any]:
    """The API as OpenAPI 3.0: every route, request body and error answer."""
    spec = _openapi_routes()
    # Answers every route may give for the same reason: a route that takes a token may
    # throttle its client, and one that reads a body may time out waiting for it.
    for operation in (op for path in spec["paths"].values() for op in path.values()):
        responses = operation["responses"]
        if "401" in responses:
            responses.setdefault("429", _E429)
        if "413" in responses:
            responses.setdefault("408", _E408)
    return spec


def _openapi_routes() -> dict[str, Any]:
    tenant_auth: list[dict[str, list[str]]] = [{"bearer": []}]
    job_id = {
        "name": "job_id",
        "in": "path",
        "required": True,
        "schema": {"type": "integer", "format": "int64", "minimum": 1},
    }
    tenant_query = {
        "name": "tenant",
        "in": "query",
        "required": False,
        "description": "Admin token: one tenant only. A tenant token always sees itself.",
        "schema": {"type": "string", "minLength": 1},
    }
    idem_header = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 200},
    }
    status_form = {
        "application/x-www-form-urlencoded": {
            "schema": {
                "type": "object",
                "properties": {
                    "MessageSid": {"type": "string"},
                    "MessageStatus": {"type": "string"},
                    "ErrorCode": {"type": "string"},
                    "AccountSid": {"type": "string"},
                },
            }
        }
    }
    status_responses = {
        "200": _json_ok("Applied (or ignored: repeat, older status)", "StatusCallbackResult"),
        "403": _err("Missing or wrong X-Twilio-Signature, or unknown tenant", "invalid_signature"),
        "404": _err("Status callbacks are off: PGQUEUE_PUBLIC_URL is not set", "not_found"),
        "413": _E413,
        "415": _err("Not form-encoded", "unsupported_media_type"),
        "422": _err("Signed, but without MessageSid or MessageStatus", "invalid_callback"),
        "503": _E503,
    }
    signature = {
        "name": "X-Twilio-Signature",
        "in": "header",
        "required": True,
        "schema": {"type": "string"},
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "pgqueue",
            "version": "1",
            "description": "A PostgreSQL send queue for WhatsApp messages through Twilio. "
            "Errors are JSON {error, message[, field, index]}.",
        },
        "paths": {
            "/api/whatsapp/send": {
                "post": {
                    "summary": "Queue one message (or send it now when the queue is disabled)",
                    "security": tenant_auth,
                    "parameters": [idem_header],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Message"}}
                        },
                    },
                    "responses": {
                        "200": _json_ok(
                            "Sent directly (WHATSAPP_SEND_QUEUE_ENABLED=false)", "DirectSend"
                        ),
                        "202": _json_ok(
                            "Queued",
                            "Queued",
                            {"Location": {"schema": {"type": "string"}}},
                        ),
                        "400": _E400,
                        "401": _E401,
                        "403": _E403,
                        "409": _err(
                            "Tenant paused (direct send) or idempotency key in use",
                            "tenant_paused, idempotency_conflict",
                        ),
                        "413": _E413,
                        "415": _E415,
                        "422": _E422_SEND,
                        "502": _err(
                            "The provider refused the tenant's credentials (direct send)",
                            "provider_rejected_tenant",
                        ),
                        "503": _E503,
                    },
                }
            },
            "/api/whatsapp/send/batch": {
                "post": {
                    "summary": "Queue up to 1,000 messages, all or nothing",
                    "security": tenant_auth,
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Batch"}}
                        },
                    },
                    "responses": {
                        "202": _json_ok("All queued, results in input order", "BatchQueued"),
                        "400": _E400,
                        "401": _E401,
                        "403": _E403,
                        "409": _err(
                            "The queue is disabled, or an idempotency key is in use",
                            "queue_disabled, idempotency_conflict",
                        ),
                        "413": _err("The body is larger than 8 MiB", "body_too_large"),
                        "415": _E415,
                        "422": _err(
                            "A message is wrong; nothing was queued. `index` is the first "
                            "bad message, `field` its field",
                            "as for one message, and batch_too_large",
                        ),
                        "503": _E503,
                    },
                }
            },
            "/api/queue/metrics": {
                "get": {
                    "summary": "Queue counts in the old system's shape",
                    "security": tenant_auth,
                    "parameters": [tenant_query],
                    "responses": {
                        "200": _json_ok(
                            "Counts (a tenant token: that tenant's only)", "QueueMetrics"
                        ),
                        "401": _E401,
                        "403": _E403,
                        "404": _E404,
                        "422": _E422_QUERY,
                        "503": _E503,
                    },
                }
            },
            "/api/jobs": {
                "delete": {
                    "summary": "Delete dead letters (failed jobs)",
                    "security": tenant_auth,
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string", "enum": ["failed"]},
                        },
                        {
                            "name": "olderThan",
                            "in": "query",
                            "required": False,
                            "description": "7d, 12h, 30m, 90s, 2w, or an ISO 8601 time",
                            "schema": {"type": "string"},
                        },
                        tenant_query,
                    ],
                    "responses": {
                        "200": _json_ok("Deleted", "Deleted"),
                        "401": _E401,
                        "403": _E403,
                        "422": _err(
                            "Bad or unknown query parameter",
                            "invalid_request, invalid_state, invalid_older_than, unknown_parameter",
                        ),
                        "503": _E503,
                    },
                }
            },
            "/api/jobs/{job_id}": {
                "get": {
                    "summary": "One job: state, attempts, last error, provider SID and status",
                    "security": tenant_auth,
                    "parameters": [job_id],
                    "responses": {
                        "200": _json_ok("The job", "Job"),
                        "401": _E401,
                        "404": _E404,
                        "422": _E422_QUERY,
                        "503": _E503,
                    },
                },
                "delete": {
                    "summary": "Cancel a job that has not started: it is deleted, its "
                    "conversation's next message moves up",
                    "security": tenant_auth,
                    "parameters": [job_id],
                    "responses": {
                        "200": _json_ok("The job is canceled", "Canceled"),
                        "401": _E401,
                        "404": _E404,
                        "409": _err("The job is being sent or has finished", "not_cancelable"),
                        "422": _E422_QUERY,
                        "503": _E503,
                    },
                },
            },
            "/api/jobs/{job_id}/retry": {
                "post": {
                    "summary": "Send a failed job again (it goes to its conversation's tail)",
                    "security": tenant_auth,
                    "parameters": [job_id],
                    "responses": {
                        "200": _json_ok("The job, queued again", "Job"),
                        "401": _E401,
                        "404": _E404,
                        "409": _err("The job is not failed", "not_failed"),
                        "422": _E422_QUERY,
                        "503": _E503,
                    },
                }
            },
            "/api/twilio/status/{tenant}": {
                "post": {
                    "summary": "Twilio status callback for one tenant's messages",
                    "parameters": [
                        {
                            "name": "tenant",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        signature,
                    ],
                    "requestBody": {"required": True, "content": status_form},
                    "responses": status_responses,
                }
            },
            "/api/twilio/status": {
                "post": {
                    "summary": "Twilio status callback; the tenant is found by AccountSid",
                    "parameters": [signature],
                    "requestBody": {"required": True, "content": status_form},
                    "responses": status_responses,
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "description": "Open to anyone unless PGQUEUE_METRICS_TOKEN is set; then "
                    "it takes that token or the admin token as a bearer token.",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "401": _err(
                            "PGQUEUE_METRICS_TOKEN is set and the request carries neither it "
                            "nor the admin token",
                            "invalid_token",
                        ),
                        "503": _E503,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "The process is up",
                    "responses": {"200": _json_ok("Up", "Status")},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Database reachable and migrated to the code's head",
                    "responses": {
                        "200": _json_ok("Ready", "Ready"),
                        "503": _err("Not ready; the message says why", "not_ready"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.0",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "message"],
                    "properties": {
                        "error": {"type": "string"},
                        "message": {"type": "string"},
                        "field": {"type": "string"},
                        "index": {"type": "integer"},
                        "providerCode": {"type": "string", "nullable": True},
                    },
                },
                "Message": _message_schema(),
                "Batch": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["messages"],
                    "properties": {
                        "messages": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": MAX_BATCH,
                            "items": {"$ref": "#/components/schemas/Message"},
                        }
                    },
                },
                "QueuePosition": {
                    "type": "object",
                    "required": ["state", "ahead"],
                    "properties": {
                        "state": {
                            "type": "string",
                            "enum": ["waiting", "delayed", "active", "completed", "failed"],
                            "description": "waiting or delayed for a new message; a repeated "
                            "idempotency key gives the first job's current state",
                        },
                        "ahead": {
                            "type": "integer",
                            "minimum": 0,
                            "description": "Messages of the same conversation ahead of it",
                        },
                    },
                },
                "Queued": {
                    "type": "object",
                    "required": ["status", "message", "jobId", "queuePosition", "duplicate"],
                    "properties": {
                        "status": {"type": "string", "enum": ["queued"]},
                        "message": {"type": "string"},
                        "jobId": {"type": "integer", "format": "int64"},
                        "queuePosition": {"$ref": "#/components/schemas/QueuePosition"},
                        "duplicate": {"type": "boolean"},
                    },
                },
                "BatchQueued": {
                    "type": "object",
                    "required": ["status", "message", "jobs"],
                    "properties": {
                        "status": {"type": "string", "enum": ["queued"]},
                        "message": {"type": "string"},
                        "jobs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["jobId", "queuePosition", "duplicate"],
                                "properties": {
                                    "jobId": {"type": "integer", "format": "int64"},
                                    "queuePosition": {"$ref": "#/components/schemas/QueuePosition"},
                                    "duplicate": {"type": "boolean"},
                                },
                            },
                        },
                    },
                },
                "DirectSend": {
                    "type": "object",
                    "required": ["status", "message", "channel", "sid"],
                    "properties": {
                        "status": {"type": "string", "enum": ["ok"]},
                        "message": {"type": "string"},
                        "channel": {"type": "string", "enum": ["freeform", "template"]},
                        "sid": {"type": "string"},
                    },
                },
                "QueueMetrics": {
                    "type": "object",
                    "required": [
                        "waiting",
                        "active",
                        "completed",
                        "failed",
                        "delayed",
                        "tenantConcurrency",
                        "maxConcurrencyPerTenant",
                    ],
                    "properties": {
                        "waiting": {"type": "integer", "minimum": 0},
                        "active": {"type": "integer", "minimum": 0},
                        "completed": {"type": "integer", "minimum": 0},
                        "failed": {"type": "integer", "minimum": 0},
                        "delayed": {"type": "integer", "minimum": 0},
                        "tenantConcurrency": {
                            "type": "object",
                            "additionalProperties": {"type": "integer", "minimum": 0},
                        },
                        "maxConcurrencyPerTenant": {"type": "integer", "minimum": 1},
                        "pausedTenants": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "Job": {
                    "type": "object",
                    "required": ["id", "tenantId", "conversationId", "state", "attempts"],
                    "properties": {
                        "id": {"type": "integer", "format": "int64"},
                        "tenantId": {"type": "string"},
                        "conversationId": {"type": "string"},
                        "state": {
                            "type": "string",
                            "enum": ["waiting", "delayed", "active", "completed", "failed"],
                        },
                        "attempts": {"type": "integer"},
                        "maxAttempts": {"type": "integer"},
                        "priority": {"type": "integer"},
                        "messageType": {"type": "string", "nullable": True},
                        "phoneNumber": {"type": "string"},
                        "channel": {"type": "string", "nullable": True},
                        "contentSid": {"type": "string", "nullable": True},
                        "lastErrorCode": {"type": "string", "nullable": True},
                        "lastErrorMessage": {"type": "string", "nullable": True},
                        "providerSid": {"type": "string", "nullable": True},
                        "providerStatus": {"type": "string", "nullable": True},
                        "createdAt": {"type": "string", "format": "date-time"},
                        "runAt": {"type": "string", "format": "date-time"},
                        "startedAt": {"type": "string", "format": "date-time", "nullable": True},
                        "finishedAt": {
                            "type": "string",
                            "format": "date-time",
                            "nullable": True,
                        },
                    },
                },
                "Canceled": {
                    "type": "object",
                    "required": ["jobId", "status"],
                    "properties": {
                        "jobId": {"type": "integer"},
                        "status": {"type": "string", "enum": ["canceled"]},
                    },
                },
                "Deleted": {
                    "type": "object",
                    "required": ["deleted"],
                    "properties": {"deleted": {"type": "integer", "minimum": 0}},
                },
                "StatusCallbackResult": {
                    "type": "object",
                    "required": ["status", "updated", "held"],
                    "properties": {
                        "status": {"type": "string"},
                        "updated": {"type": "integer", "minimum": 0},
                        "held": {
                            "type": "boolean",
                            "description": "no message carries this SID yet; the status "
                            "is applied once its send's completion has committed",
                        },
                    },
                },
                "Status": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {"status": {"type": "string"}},
                },
                "Ready": {
                    "type": "object",
                    "required": ["status"],
                    "properties": {
                        "status": {"type": "string"},
                        "database": {"type": "string"},
                        "migration": {"type": "string"},
                    },
                },
            },
        },
    }
