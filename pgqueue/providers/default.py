"""The provider a worker (and the API's direct sends) use unless given another:
PGQUEUE_PROVIDER picks the sandbox for demos, Twilio otherwise."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool

from pgqueue.config import Settings
from pgqueue.providers import Provider
from pgqueue.providers.sandbox import SandboxProvider
from pgqueue.providers.twilio import TwilioProvider


def default_provider(settings: Settings, pool: AsyncConnectionPool[Any]) -> Provider:
    if settings.provider == "sandbox":
        return SandboxProvider(
            pool,
            latency=settings.sandbox_latency_s,
            failure_rate=settings.sandbox_failure_rate,
            invalid_numbers=settings.sandbox_invalid_numbers,
        )
    return TwilioProvider(settings)
