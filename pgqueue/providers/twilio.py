"""Twilio through the official SDK's async client, each tenant with its own credentials.

Every request goes to `settings.twilio_api_base_url` (tests point it at a fake on
127.0.0.1) with an explicit timeout, and every failure leaves this module as one of
errors.TransientSendError, PermanentSendError or TenantSendError. No message built here
contains the tenant's auth token.

Retry-After: the SDK turns an error response into a TwilioRestException that keeps the
status, code and message but drops the response headers. The HTTP client below is the
only place that sees them, so it leaves them in a context variable that `send` reads
after the call (the SDK awaits the HTTP client directly, in the caller's task, so the
value is the one of this very request even with many sends in flight).
"""

from __future__ import annotations

import base64
import contextvars
import dataclasses
import email.utils
import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import aiohttp
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.http.response import Response
from twilio.rest import Client

# The SDK imports its Messages API lazily on the first `client.messages`, which blocks
# the event loop for ~75 ms: enough to make the first claimed jobs miss their rate slots.
from twilio.rest.api.v2010.account import message as _preload_messages  # noqa: F401

from pgqueue.config import Settings
from pgqueue.credentials import Keyring, open_for_send
from pgqueue.errors import (
    SUPPRESS_CODES,
    PermanentSendError,
    SenderLimitError,
    SendError,
    TenantSendError,
    TransientSendError,
)
from pgqueue.models import Job, Outgoing, SendResult
from pgqueue.providers import SlotMissed, note_on_wire, wait_for_slot

log = logging.getLogger("pgqueue.twilio")

Channel = Literal["freeform", "template"]

# Twilio error codes (https://www.twilio.com/docs/api/errors) that decide the class of a
# failure before its HTTP status does.
# Limits of one WhatsApp sender, with how long it rests before it sends again: the
# business's 24-hour messaging tier (63018), the sender's queue at Twilio full (21611,
# 30001). Only that tenant waits; the rest of the queue goes on.
SENDER_REST_S = {
    63018: 3600.0,  # messaging limit tier reached for the business
    21611: 60.0,  # the From number has too many messages queued at Twilio
    30001: 60.0,  # queue overflow at Twilio for this sender
}
TENANT_CODES = frozenset(
    {
        20003,  # authentication failed: the tenant's credentials are wrong
        63007,  # the From address is not a WhatsApp sender of this account
    }
)
TRANSIENT_CODES = frozenset(
    {
        20429,  # too many requests
    }
)
PERMANENT_CODES = frozenset(
    {
        21211,  # invalid To number
        21614,  # To is not a mobile number
        21610,  # recipient unsubscribed (STOP)
        21617,  # body too long
        21654,  # ContentSid required / invalid
        21656,  # ContentVariables invalid
        21658,  # template parameter invalid
        63003,  # channel could not find the To address
        63014,  # recipient blocked the business
        63016,  # outside the 24-hour window with a free-form message
        63024,  # invalid message recipient
    }
)
OUTSIDE_WINDOW = 63016

_response_headers: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "pgqueue_twilio_response_headers", default=None
)


class _SlotConnector(aiohttp.TCPConnector):
    """Looks at the send's rate slot once a connection is in hand (a new connection, TCP
    and TLS handshakes, DNS, or a wait for a free one takes time) and waits there for it.
    A slot already missed hands the connection back to the pool unused: nothing was written
    on it. (Raised from aiohttp's reuse trace instead, the error drops a kept-alive
    connection from the pool without closing it, and every missed slot then costs the next
    send a new TCP connection.) The final check is the body's (_OnSlot)."""

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        try:
            await wait_for_slot(final=False)
        except BaseException:  # a missed slot, or cancelled while waiting for it
            conn.release()
            raise
        return conn


class _OnSlot(aiohttp.BytesPayload):
    """A form body written only in its rate slot. aiohttp holds the request's headers back
    to send them with the body's first bytes, and before Python 3.12 writes the body from
    a task of its own, a trip through the event loop after the connection was handed over:
    on a busy worker, 10-40 ms. Checked here, the slot is checked in the same step as the
    write. A slot missed here closes the connection (aiohttp gives up a request whose body
    failed), which the look at the connection (_SlotConnector) keeps rare."""

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        await wait_for_slot()
        await super().write_with_length(writer, content_length)


async def _on_wire(session: Any, context: Any, params: Any) -> None:
    note_on_wire()


class _Transport(AsyncTwilioHttpClient):  # type: ignore[misc]
    """The SDK's aiohttp client, pointed at one base URL and with a real timeout.

    The stock client passes the SDK's `timeout=None` straight to aiohttp, where an explicit
    None means no timeout at all (its own `timeout` attribute is never read), and it reads
    responses outside a context manager, so a failed body read can leave a connection
    unreleased. A worker must neither hang on a send nor leak connections.
    """

    def __init__(self, base_url: str, timeout_s: float) -> None:
        super().__init__(pool_connections=False, timeout=timeout_s, logger=log)
        parts = urlsplit(base_url)
        self._scheme = parts.scheme
        self._netloc = parts.netloc
        self._prefix = parts.path.rstrip("/")
        slot_check = aiohttp.TraceConfig()
        slot_check.on_request_chunk_sent.append(_on_wire)
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            # One queue talks to one host; the default limit of 100 connections is more
            # than the global concurrency and keeps keep-alive reuse high.
            connector=_SlotConnector(limit=100, ttl_dns_cache=300),
            trace_configs=[slot_check],
        )

    def route(self, url: str) -> str:
        """Same path and query on our base URL: Twilio's product hosts and any region or
        edge host the SDK chose all collapse onto `twilio_api_base_url`."""
        parts = urlsplit(url)
        return urlunsplit((self._scheme, self._netloc, self._prefix + parts.path, parts.query, ""))

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, Any] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,
        allow_redirects: bool = False,
    ) -> Response:
        target = self.route(url)
        headers = dict(headers or {})
        if auth is not None:
            # aiohttp 3.14 deprecates BasicAuth objects (a warning is an error in our
            # tests) and older versions lack encode_basic_auth; the header is simple.
            pair = f"{auth[0]}:{auth[1]}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        body = None
        if data is not None:
            body = _OnSlot(
                urlencode(data, doseq=True).encode(),
                content_type="application/x-www-form-urlencoded",
            )
        started = time.monotonic()
        try:
            async with self.session.request(
                method.upper(),
                target,
                params=params,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout or self.timeout),
                allow_redirects=allow_redirects,
            ) as response:
                text = await response.text()
        except aiohttp.ClientConnectionError as e:
            if isinstance(e.__cause__, SlotMissed):
                raise SlotMissed from None
            raise
        _response_headers.set(response.headers)
        # One debug line instead of the SDK's six INFO lines per request; never the auth.
        log.debug(
            "twilio %s %s -> %d in %.0f ms",
            method.upper(),
            target,
            response.status,
            (time.monotonic() - started) * 1000,
        )
        return Response(response.status, text, response.headers)

    async def close(self) -> None:
        await self.session.close()


# Twilio's bounds for ValidityPeriod, in seconds.
VALIDITY_MIN_S, VALIDITY_MAX_S = 1, 36_000


def validity_period(expires_at: datetime, now: float) -> int:
    """The seconds left until `expires_at`, within the bounds Twilio takes; a deadline
    further out than 10 hours is Twilio's longest, 36,000 s."""
    left = int(expires_at.timestamp() - now)
    return max(VALIDITY_MIN_S, min(VALIDITY_MAX_S, left))


def _whatsapp(number: str) -> str:
    return number if number.startswith("whatsapp:") else "whatsapp:" + number


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    raw = (headers or {}).get("Retry-After")
    if not raw:
        return None
    raw = raw.strip()
    try:
        return max(float(raw), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def map_twilio_error(
    exc: TwilioException, *, auth_token: str, headers: Mapping[str, str] | None = None
) -> SendError:
    """Our error for an SDK error; `headers` are the response's (for Retry-After)."""
    status: int | None = None
    code: int | None = None
    if isinstance(exc, TwilioRestException):
        status, code = exc.status, exc.code
        detail = str(exc.msg).removeprefix("Unable to create record: ")
    elif isinstance(exc, TwilioServiceException):
        status, code = exc.status, exc.code
        detail = exc.title + (f" - {exc.detail}" if exc.detail else "")
    else:
        detail = str(exc)
    # The SDK falls back to the HTTP status as the code when the body has none.
    if code == status:
        code = None
    label = f"Twilio error {code}" if code is not None else "Twilio error"
    where = f" (HTTP {status})" if status else ""
    message = _scrub(f"{label}{where}: {detail}", auth_token)
    provider_code = str(code) if code is not None else (str(status) if status else None)
    common: dict[str, Any] = {"provider_code": provider_code, "http_status": status}

    if code in TENANT_CODES or status == 401:
        return TenantSendError(message, **common)
    if code in SENDER_REST_S:
        # Before the 429 test: the limit is this sender's, not the queue's.
        rest = max(SENDER_REST_S[code], _retry_after(headers) or 0.0)
        return SenderLimitError(message, rest_s=rest, **common)
    if status == 429 or code == 20429:
        return TransientSendError(
            message, retry_after=_retry_after(headers), throttle=True, **common
        )
    if (status is not None and status >= 500) or code in TRANSIENT_CODES:
        return TransientSendError(message, retry_after=_retry_after(headers), **common)
    if code in PERMANENT_CODES or (status is not None and 400 <= status < 500):
        return PermanentSendError(message, suppress=code in SUPPRESS_CODES, **common)
    # No status at all: the SDK failed before or outside HTTP. Retrying is the safe side
    # of at-least-once; the retry budget bounds it.
    return TransientSendError(message, **common)


def map_transport_error(exc: BaseException, *, auth_token: str) -> TransientSendError:
    """Timeouts and connection failures. Once the request may have reached Twilio, the
    failure is ambiguous: Twilio may have accepted the message."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        kind, ambiguous = "could not connect to Twilio", False
    elif isinstance(exc, TimeoutError):
        kind, ambiguous = "no answer from Twilio in time", True
    else:
        kind, ambiguous = "connection to Twilio failed", True
    reason = _scrub(str(exc) or type(exc).__name__, auth_token)
    return TransientSendError(
        f"{kind}: {reason}", provider_code=type(exc).__name__, ambiguous=ambiguous
    )


class TwilioProvider:
    """Sends WhatsApp messages with each tenant's own Twilio account.

    One aiohttp session carries every tenant's requests (same host, shared keep-alive
    pool); each tenant gets its own SDK Client for its credentials. Create and use it
    inside one event loop.
    """

    # Requests wait for their rate slot at the wire (wait_for_slot), so the dispatcher
    # wakes sends a little early and building a request costs no lateness.
    waits_for_slot = True

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._keyring = Keyring(settings.secret_keys)
        self._transport: _Transport | None = None
        self._clients: dict[tuple[str, str], Client] = {}

    def _client(self, account_sid: str, auth_token: str) -> Client:
        key = (account_sid, auth_token)
        client = self._clients.get(key)
        if client is not None:
            return client
        if self._transport is None:
            # aiohttp sessions belong to the running loop, so they are made on first use.
            self._transport = _Transport(
                self._settings.twilio_api_base_url, self._settings.send_timeout_s
            )
        # A rotated token leaves the old client useless; drop it.
        for stale in [k for k in self._clients if k[0] == account_sid]:
            del self._clients[stale]
        client = Client(
            account_sid,
            auth_token,
            http_client=self._transport,
            environment={},
            user_agent_extensions=["pgqueue"],
        )
        # The SDK reads TWILIO_REGION / TWILIO_EDGE from os.environ even when given
        # `environment={}` (an empty mapping is falsy); either would rewrite the host.
        client.region = None
        client.edge = None
        self._clients[key] = client
        return client

    def _status_callback(self, tenant_id: str) -> str | None:
        base = self._settings.public_base_url
        if not base:
            return None
        return f"{base.rstrip('/')}/api/twilio/status/{quote(tenant_id, safe='')}"

    async def _create(
        self,
        out: Outgoing,
        *,
        body: str | None,
        content_sid: str | None,
        content_variables: dict[str, Any] | None,
    ) -> tuple[str, str]:
        client = self._client(out.account_sid, out.auth_token)
        params: dict[str, Any] = {
            "to": _whatsapp(out.to_number),
            "from_": _whatsapp(out.from_number),
        }
        if content_sid is not None:
            params["content_sid"] = content_sid
            if content_variables is not None:
                params["content_variables"] = json.dumps(content_variables)
        else:
            params["body"] = body
        callback = self._status_callback(out.tenant_id)
        if callback is not None:
            params["status_callback"] = callback
        if out.expires_at is not None:
            # Twilio drops the message too if it cannot deliver it before the deadline.
            params["validity_period"] = validity_period(out.expires_at, time.time())
        _response_headers.set(None)
        try:
            message = await client.messages.create_async(**params)
        except TwilioException as exc:
            raise map_twilio_error(
                exc, auth_token=out.auth_token, headers=_response_headers.get()
            ) from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_transport_error(exc, auth_token=out.auth_token) from None
        return str(message.sid), str(message.status or "queued")

    async def _deliver(self, out: Outgoing) -> SendResult:
        # The token arrives as stored (encrypted) and is decrypted only for this send; a
        # token this process cannot decrypt pauses the tenant (TenantSendError).
        out = dataclasses.replace(out, auth_token=open_for_send(self._keyring, out.auth_token))
        if out.content_sid is not None:
            sid, status = await self._create(
                out, body=None, content_sid=out.content_sid, content_variables=out.content_variables
            )
            return SendResult(sid=sid, status=status, channel="template")
        try:
            sid, status = await self._create(
                out, body=out.body, content_sid=None, content_variables=None
            )
        except PermanentSendError as exc:
            if exc.provider_code != str(OUTSIDE_WINDOW) or not out.fallback_content_sid:
                raise
            # Outside the 24-hour window only an approved template may be sent; the
            # tenant's fallback template carries the text in one variable.
            log.info(
                "tenant %s: outside the 24-hour window for %s, sending fallback template %s",
                out.tenant_id,
                out.to_number,
                out.fallback_content_sid,
            )
            sid, status = await self._create(
                out,
                body=None,
                content_sid=out.fallback_content_sid,
                content_variables={out.fallback_variable or "1": out.body or ""},
            )
            return SendResult(sid=sid, status=status, channel="template")
        return SendResult(sid=sid, status=status, channel="freeform")

    async def send(self, job: Job) -> SendResult:
        return await self._deliver(Outgoing.from_job(job))

    async def send_now(self, out: Outgoing) -> SendResult:
        return await self._deliver(out)

    async def aclose(self) -> None:
        transport, self._transport = self._transport, None
        self._clients.clear()
        if transport is not None:
            await transport.close()
