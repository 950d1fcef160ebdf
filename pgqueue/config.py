"""Settings, built once from the environment and passed in; nothing is read at import."""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pgqueue.errors import ConfigError

Provider = Literal["twilio", "sandbox"]
LogFormat = Literal["plain", "json"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {env[name]!r}")


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower() or default
    if raw not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {env[name]!r}")
    return raw


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    parsed = urlparse(raw)
    if parsed.scheme not in schemes or not (parsed.netloc or parsed.query or parsed.path):
        kinds = " or ".join(s + "://" for s in schemes)
        raise ConfigError(f"{name} must be a {kinds} URL, got {redact_url(raw)!r}")
    return raw


def _latency(env: Mapping[str, str], name: str) -> tuple[float, float]:
    """`100-300` (ms, a range) or `150` (ms, fixed)."""
    raw = env.get(name, "").strip()
    if not raw:
        return (0.1, 0.3)
    low, _, high = raw.partition("-")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise ConfigError(f"{name} must be milliseconds like 150 or 100-300, got {raw!r}") from None
    if not 0 <= lo <= hi <= 60_000:
        raise ConfigError(f"{name} must be 0 <= low <= high <= 60000 ms, got {raw!r}")
    return (lo / 1000.0, hi / 1000.0)


def _secret_keys(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated Fernet keys (32 url-safe base64 bytes each); the first encrypts."""
    keys = tuple(k.strip() for k in env.get(name, "").split(",") if k.strip())
    for i, key in enumerate(keys, start=1):
        try:
            ok = len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32
        except (UnicodeEncodeError, binascii.Error, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"{name}: key {i} is not a Fernet key (32 url-safe base64 bytes; make one "
                "with `python -c 'from cryptography.fernet import Fernet; "
                "print(Fernet.generate_key().decode())'`)"
            )
    return keys


def redact_url(url: str) -> str:
    """Hide a password in a URL before it reaches a message."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    # The workers' own URL, where DATABASE_URL goes through a transaction pooler: their
    # session advisory locks and LISTEN need a direct or session-pooled connection.
    worker_database_url: str | None = None
    queue_enabled: bool = True
    queue_name: str = "whatsapp-send"
    redis_url: str | None = None
    retry_attempts: int = 3
    backoff_delay_ms: int = 2000
    twilio_api_base_url: str = "https://api.twilio.com"
    provider: Provider = "twilio"
    admin_token: str | None = None
    # Signs dashboard links when set; otherwise their key is derived from admin_token, so
    # changing either one revokes every link out there.
    dashboard_key: str | None = None
    # When set, GET /metrics asks for it (or the admin token) as a bearer token: its
    # gauges name every tenant and its volume.
    metrics_token: str | None = None
    home: Path = Path(".pgqueue")
    log_format: LogFormat = "plain"
    # A message's first characters on its job log lines: customer text, so off by default.
    log_preview: bool = False
    public_base_url: str | None = None
    send_timeout_s: float = 15.0
    sandbox_latency_s: tuple[float, float] = (0.1, 0.3)
    sandbox_failure_rate: float = 0.0
    sandbox_invalid_numbers: frozenset[str] = frozenset()
    # Fernet keys for the tenants' Twilio auth tokens at rest (pgqueue/credentials.py):
    # the first encrypts, every one decrypts. Empty: new tokens are stored in plain text.
    secret_keys: tuple[str, ...] = field(default=(), repr=False)
    # The HTTP server (pgqueue/server.py): the request line and headers of one request
    # must fit in http_max_header_bytes (else 431) and arrive within http_header_timeout_s
    # of the connection opening or the previous response (else 408 and closed); a body
    # must arrive within http_body_timeout_s of its headers (else 408).
    http_max_header_bytes: int = 32 * 1024
    http_header_timeout_s: float = 10.0
    http_body_timeout_s: float = 15.0
    http_keep_alive_s: int = 5
    http_max_connections: int = 1000
    # Failed authentications one client address may make per minute before every request
    # of its gets 429 (kept in each API process's memory).
    auth_failures_per_minute: int = 20

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        queue_name = env.get("WHATSAPP_SEND_QUEUE_NAME", "").strip() or "whatsapp-send"
        # The queue's NOTIFY channel is `pgqueue_<name>`, and channel names stop at 63 bytes.
        if len(queue_name.encode()) > 50:
            raise ConfigError("WHATSAPP_SEND_QUEUE_NAME must be at most 50 bytes")
        twilio = _url(env, "TWILIO_API_BASE_URL", ("http", "https")) or "https://api.twilio.com"
        admin_token = env.get("PGQUEUE_ADMIN_TOKEN", "").strip() or None
        if admin_token is not None and len(admin_token) < 16:
            raise ConfigError("PGQUEUE_ADMIN_TOKEN must be at least 16 characters")
        dashboard_key = env.get("PGQUEUE_DASHBOARD_KEY", "").strip() or None
        if dashboard_key is not None and len(dashboard_key) < 32:
            raise ConfigError(
                "PGQUEUE_DASHBOARD_KEY must be at least 32 characters (openssl rand -hex 32)"
            )
        metrics_token = env.get("PGQUEUE_METRICS_TOKEN", "").strip() or None
        if metrics_token is not None and len(metrics_token) < 16:
            raise ConfigError("PGQUEUE_METRICS_TOKEN must be at least 16 characters")
        provider = _choice(env, "PGQUEUE_PROVIDER", "twilio", ("twilio", "sandbox"))
        log_format = _choice(env, "PGQUEUE_LOG_FORMAT", "plain", ("plain", "json"))
        return cls(
            database_url=_url(env, "DATABASE_URL", ("postgresql", "postgres")),
            worker_database_url=_url(
                env, "PGQUEUE_WORKER_DATABASE_URL", ("postgresql", "postgres")
            ),
            queue_enabled=_bool(env, "WHATSAPP_SEND_QUEUE_ENABLED", True),
            queue_name=queue_name,
            redis_url=_url(env, "REDIS_URL", ("redis", "rediss", "unix")),
            retry_attempts=_int(env, "QUEUE_RETRY_ATTEMPTS", 3, minimum=0, maximum=100),
            backoff_delay_ms=_int(
                env, "QUEUE_BACKOFF_DELAY", 2000, minimum=0, maximum=24 * 3600 * 1000
            ),
            twilio_api_base_url=twilio.rstrip("/"),
            provider=provider,  # type: ignore[arg-type]
            admin_token=admin_token,
            dashboard_key=dashboard_key,
            metrics_token=metrics_token,
            home=Path(env.get("PGQUEUE_HOME", "").strip() or ".pgqueue"),
            log_format=log_format,  # type: ignore[arg-type]
            log_preview=_bool(env, "PGQUEUE_LOG_PREVIEW", False),
            public_base_url=_url(env, "PGQUEUE_PUBLIC_URL", ("http", "https")),
            send_timeout_s=float(_int(env, "PGQUEUE_SEND_TIMEOUT", 15, minimum=1, maximum=300)),
            sandbox_latency_s=_latency(env, "PGQUEUE_SANDBOX_LATENCY_MS"),
            sandbox_failure_rate=_int(
                env, "PGQUEUE_SANDBOX_FAILURE_PERCENT", 0, minimum=0, maximum=100
            )
            / 100.0,
            sandbox_invalid_numbers=frozenset(
                n.strip()
                for n in env.get("PGQUEUE_SANDBOX_INVALID_NUMBERS", "").split(",")
                if n.strip()
            ),
            secret_keys=_secret_keys(env, "PGQUEUE_SECRET_KEYS"),
            http_max_header_bytes=_int(
                env, "PGQUEUE_HTTP_MAX_HEADER_BYTES", 32 * 1024, minimum=1024, maximum=1024 * 1024
            ),
            http_header_timeout_s=float(
                _int(env, "PGQUEUE_HTTP_HEADER_TIMEOUT", 10, minimum=1, maximum=600)
            ),
            http_body_timeout_s=float(
                _int(env, "PGQUEUE_HTTP_BODY_TIMEOUT", 15, minimum=1, maximum=600)
            ),
            http_keep_alive_s=_int(
                env, "PGQUEUE_HTTP_KEEP_ALIVE_TIMEOUT", 5, minimum=1, maximum=3600
            ),
            http_max_connections=_int(
                env, "PGQUEUE_HTTP_MAX_CONNECTIONS", 1000, minimum=1, maximum=1_000_000
            ),
            auth_failures_per_minute=_int(
                env, "PGQUEUE_AUTH_FAILURES_PER_MINUTE", 20, minimum=1, maximum=1_000_000
            ),
        )

    @property
    def max_attempts(self) -> int:
        return 1 + self.retry_attempts
