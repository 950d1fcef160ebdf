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
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
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
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgqueue import dashboard, events, jobs, migrate, queries, webhooks
from pgqueue.config import Settings
from pgqueue.credentials import CredentialError, Keyring
from pgqueue.db import make_pool, resolve_database_url, shares_sessions
from pgqueue.enqueue import (
    MAX_BATCH,
    enqueue_whatsapp_send,
    enqueue_whatsapp_send_batch,
    refusal,
    validate,
)
from pgqueue.errors import (
    PermanentSendError,
    PgQueueError,
    ValidationError,
)
from pgqueue.http.auth import (
    LOCAL_TOKEN_TTL_S,
    LOCAL_TOKENS_MAX,
    TOKEN_TTL_S,
    AuthFailures,
    Cache,
    Caller,
    Form,
    cached_token,
    client_address,
    twilio_signed,
)
from pgqueue.http.errors import RETRY_AFTER_S, HttpError, error_json, error_response
from pgqueue.http.models import (
    DirectSend,
    EnqueuedJob,
    EventPage,
    WebhookDeadLetter,
    WebhookDeadLetters,
    WebhookTest,
    json_body,
)
from pgqueue.http.models import Job as JobAnswer
from pgqueue.http.openapi import openapi_spec
from pgqueue.http.parsing import (
    MAX_BATCH_BODY,
    MAX_BODY,
    TENANT_IN_PATH,
    check_text,
    job_id_in_path,
    known_parameters,
    message_from_json,
    number_parameter,
    parse_older_than,
    read_body,
    read_json,
    token_shape,
)
from pgqueue.logs import setup_logging
from pgqueue.metrics import SnapshotCollector, queue_metrics, queue_snapshot
from pgqueue.models import Message, Outgoing
from pgqueue.providers.default import default_provider
from pgqueue.server import BodyDeadline, uvicorn_options
from pgqueue.statuses import apply_status

log = logging.getLogger("pgqueue.api")

METRICS_TTL_S = 1.0
# After a database failure: how long to remember it, and the wait for a connection then.
DOWN_MEMORY_S = 5.0
DOWN_TIMEOUT_S = 0.5

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
                    known_parameters(request, query)
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
        wait = self.auth_failures.retry_after(client_address(request), time.monotonic())
        if wait is not None:
            raise HttpError(
                429,
                "too_many_auth_failures",
                f"too many failed authentications from this address; retry in {math.ceil(wait)} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def _refused(self, request: Request, code: str, message: str) -> HttpError:
        """A 401 for a token that does not authenticate, counted against its client."""
        self.auth_failures.failed(client_address(request), time.monotonic())
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
        tenant, valid_s = cached_token(cached)
        if not tenant or valid_s <= 0:
            found = await self._tenant_for_token(digest) if token_shape(token) else None
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
            check_text(wanted, "tenant")
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
        body = await read_json(request, MAX_BODY)
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
                **json_body(EnqueuedJob.of(result)),
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
        body = await read_json(request, MAX_BATCH_BODY)
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
                "jobs": [json_body(EnqueuedJob.of(r)) for r in results],
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
        result = await self._provider.send_now(
            Outgoing(
                tenant_id=row.tenant_id,
                account_sid=tenant["account_sid"],
                auth_token=tenant["auth_token"],
                from_number=row.from_number or tenant["whatsapp_from"],
                to_number=row.to_number,
                body=row.body,
                content_sid=row.content_sid,
                content_variables=row.content_variables,
                fallback_content_sid=tenant["fallback_content_sid"],
                fallback_variable=tenant["fallback_variable"],
            )
        )
        return json_body(
            DirectSend(
                status="ok", message="Successfully sent", channel=result.channel, sid=result.sid
            )
        )

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
        job_id = job_id_in_path(request)
        async with self.db() as conn:
            row = await jobs.get_job(conn, job_id, tenant_id=caller.tenant_id)
        return JSONResponse(json_body(JobAnswer.of(row)))

    async def cancel_job(self, request: Request) -> Response:
        caller = await self.caller(request)
        job_id = job_id_in_path(request)
        async with self.db() as conn:
            await jobs.cancel_job(conn, job_id, queue=self.queue, tenant_id=caller.tenant_id)
        return JSONResponse({"jobId": job_id, "status": "canceled"})

    async def retry_job(self, request: Request) -> Response:
        caller = await self.caller(request)
        job_id = job_id_in_path(request)
        async with self.db() as conn:
            row = await jobs.retry_job(conn, job_id, queue=self.queue, tenant_id=caller.tenant_id)
        return JSONResponse(json_body(JobAnswer.of(row)))

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

    # -- delivery events ---------------------------------------------------------------

    async def _one_tenant(self, request: Request) -> str:
        tenant_id = self.scope(await self.caller(request), request)
        if tenant_id is None:
            raise HttpError(
                422,
                "invalid_request",
                "the admin token reads one tenant's events and webhooks: tenant=<id>",
                field="tenant",
            )
        return tenant_id

    async def events_feed(self, request: Request) -> Response:
        """The tenant's events after `after`; with `wait`, a long poll."""
        tenant_id = await self._one_tenant(request)
        after = events.parse_cursor(request.query_params.get("after"))
        limit = int(
            number_parameter(
                request, "limit", default=100, low=1, high=events.MAX_LIMIT, whole=True
            )
        )
        wait_s = number_parameter(request, "wait", default=0, low=0, high=events.MAX_WAIT_S)
        rows = await events.wait_for(
            self.db, tenant_id, after, limit=limit, wait_s=min(wait_s, self.request_timeout_s - 5.0)
        )
        page = EventPage.of([events.as_json(r) for r in rows], str(events.next_cursor(rows, after)))
        return JSONResponse(json_body(page))

    async def webhook_test(self, request: Request) -> Response:
        """Posts one signed `webhook.test` request to the tenant's URL now and says how
        the endpoint answered; the feed and the webhook cursor are left as they were."""
        tenant_id = await self._one_tenant(request)
        async with self.db() as conn:
            row = await queries.fetch_one(conn, "webhook_target", {"tenant_id": tenant_id})
        if row is None or not row["webhook_url"]:
            raise HttpError(
                409,
                "no_webhook",
                "the tenant has no webhook URL: pgqueue tenant set ID --webhook-url URL",
            )
        secret = self.keyring.open(row["webhook_secret"] or "")
        payload = {"test": True, "tenantId": tenant_id, "events": []}
        async with webhooks.session(timeout_s=10.0) as session:
            posted = await webhooks.post(session, row["webhook_url"], secret, payload)
        answer = WebhookTest(
            url=row["webhook_url"], delivered=posted.ok, status=posted.status, error=posted.error
        )
        return JSONResponse(json_body(answer))

    async def webhook_dead_letters(self, request: Request) -> Response:
        tenant_id = await self._one_tenant(request)
        limit = int(number_parameter(request, "limit", default=50, low=1, high=500, whole=True))
        async with self.db() as conn:
            rows = await queries.fetch_all(
                conn, "webhook_dead_letters", {"tenant_id": tenant_id, "limit": limit}
            )
        answer = WebhookDeadLetters(dead_letters=[WebhookDeadLetter.of(r) for r in rows])
        return JSONResponse(json_body(answer))

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
            tenant_in_path is not None and not TENANT_IN_PATH.fullmatch(str(tenant_in_path))
        ):
            raise forbidden
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/x-www-form-urlencoded":
            raise HttpError(
                415, "unsupported_media_type", "Twilio posts application/x-www-form-urlencoded"
            )
        raw = await read_body(request, MAX_BODY)

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
        form = Form(pairs)
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

    def _signed_by(self, tenant: Mapping[str, Any], url: str, form: Form, signature: str) -> bool:
        """Whether `tenant`'s auth token (the HMAC key) signed the callback. A token this
        process cannot decrypt signs nothing: Twilio's retries get 403 until the keys
        are fixed."""
        try:
            auth_token = self.keyring.open(tenant["auth_token"])
        except CredentialError as exc:
            log.error("status callback for tenant %s not checked: %s", tenant["id"], exc.message)
            return False
        return twilio_signed(auth_token, url, form, signature)

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
            return error_json(503, "not_ready", exc.message)
        try:
            async with self.db() as conn:
                row = await queries.fetch_one(conn, "api_schema_version", {})
        except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
            return error_json(
                503,
                "not_ready",
                f"the database is not migrated (code expects {head}); run `pgqueue migrate`",
            )
        except (psycopg.OperationalError, TimeoutError):
            return error_json(
                503,
                "not_ready",
                "the database is unreachable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        current = None if row is None else str(row["version_num"])
        if current != head:
            return error_json(
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
            snapshot = await queue_snapshot(conn, self.queue)
        own = generate_latest(self.registry)
        queue = generate_latest(SnapshotCollector.registry(snapshot, self.queue))
        return Response(queue + own, media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_spec())


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
            await _unprepared_through_a_transaction_pooler(pool)
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
            return error_json(exc.status_code, code, str(exc.detail), headers=exc.headers)
        return error_response(exc)

    routes = [
        api.route("/api/whatsapp/send", api.send, ["POST"]),
        api.route("/api/whatsapp/send/batch", api.send_batch, ["POST"]),
        api.route("/api/queue/metrics", api.metrics, ["GET"], query=("tenant",)),
        api.route("/api/jobs", api.clean_jobs, ["DELETE"], query=("state", "olderThan", "tenant")),
        api.route("/api/jobs/{job_id}", api.get_job, ["GET"]),
        api.route("/api/jobs/{job_id}", api.cancel_job, ["DELETE"]),
        api.route("/api/jobs/{job_id}/retry", api.retry_job, ["POST"]),
        api.route(
            "/api/events", api.events_feed, ["GET"], query=("after", "limit", "wait", "tenant")
        ),
        api.route("/api/webhook/test", api.webhook_test, ["POST"], query=("tenant",)),
        api.route(
            "/api/webhook/dead-letters",
            api.webhook_dead_letters,
            ["GET"],
            query=("limit", "tenant"),
        ),
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


async def _unprepared_through_a_transaction_pooler(pool: AsyncConnectionPool[Any]) -> None:
    """psycopg prepares a statement it runs often; through a pooler in transaction mode
    the next transaction may land on a server session that never saw it. There the
    pool's connections prepare nothing. A database that does not answer yet is taken as
    direct (the probe is not repeated)."""
    if not isinstance(pool.conninfo, str):
        return
    try:
        pooled = await asyncio.wait_for(shares_sessions(pool.conninfo), DOWN_TIMEOUT_S * 4)
    except (psycopg.Error, OSError, TimeoutError) as e:
        log.debug("no pooler check (the database does not answer yet): %s", e)
        return
    if pooled and isinstance(pool.kwargs, dict):
        pool.kwargs["prepare_threshold"] = None
        log.info("DATABASE_URL is pooled in transaction mode: the API prepares no statement")


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
