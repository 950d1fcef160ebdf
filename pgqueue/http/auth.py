"""Who is asking: tenant tokens (cached in this process and, optionally, in Redis),
failed authentications per client, and Twilio's signatures on status callbacks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from twilio.request_validator import RequestValidator

log = logging.getLogger("pgqueue.api")

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


def cached_token(value: str | None) -> tuple[str, float]:
    """(tenant, seconds still valid) of a cached token; ("", 0) for a miss."""
    tenant, _, until = (value or "").partition(" ")
    if not until:
        return tenant, math.inf
    try:
        return tenant, float(until) - time.time()
    except ValueError:
        return "", 0.0


def client_address(request: Request) -> str:
    # uvicorn has already replaced it with X-Forwarded-For's for a trusted proxy
    # (FORWARDED_ALLOW_IPS, 127.0.0.1 by default).
    return request.client.host if request.client is not None else "unknown"


@dataclass(frozen=True)
class Caller:
    """Who is asking: a tenant, or the admin (`tenant_id` None)."""

    tenant_id: str | None


class Form(dict[str, str]):
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


def twilio_signed(auth_token: str, url: str, form: Form, signature: str) -> bool:
    return bool(RequestValidator(auth_token).validate(url, form, signature))
