"""Errors as the API answers them: JSON `{"error": code, "message": ...}` with the right
status, 503 + Retry-After for a database that cannot be reached, never a traceback."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import psycopg
from starlette.responses import JSONResponse

from pgqueue.enqueue import (
    BatchValidationError,
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

log = logging.getLogger("pgqueue.api")
RETRY_AFTER_S = 5


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


def error_json(
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


def unavailable(message: str, retry_after: float = RETRY_AFTER_S) -> JSONResponse:
    return error_json(
        503,
        "database_unavailable",
        message,
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def error_response(exc: BaseException) -> JSONResponse:
    """The client's view of a failure. Messages of our own errors are written for
    clients; anything else is logged here and answered without its details."""
    if isinstance(exc, HttpError):
        return error_json(
            exc.status, exc.code, exc.message, field=exc.field, headers=exc.headers, extra=exc.extra
        )
    if isinstance(exc, BatchValidationError):
        field = f"messages[{exc.index}]" + (f".{exc.field}" if exc.field else "")
        return error_json(422, exc.code, exc.message, field=field, extra={"index": exc.index})
    if isinstance(exc, ValidationError):
        status = (
            409 if exc.code in ("not_failed", "not_cancelable", "idempotency_conflict") else 422
        )
        return error_json(status, exc.code, exc.message, field=exc.field)
    if isinstance(exc, NotFoundError):
        return error_json(404, "not_found", exc.message)
    if isinstance(exc, PermanentSendError):
        return error_json(
            422, "send_failed", exc.message, extra={"providerCode": exc.provider_code}
        )
    if isinstance(exc, TenantSendError):
        return error_json(
            502, "provider_rejected_tenant", exc.message, extra={"providerCode": exc.provider_code}
        )
    if isinstance(exc, TransientSendError):
        return error_json(
            503,
            "provider_unavailable",
            exc.message,
            headers={"Retry-After": str(max(1, math.ceil(exc.retry_after or RETRY_AFTER_S)))},
            extra={"providerCode": exc.provider_code},
        )
    if isinstance(exc, DatabaseUnavailableError):
        return unavailable(exc.message)
    if isinstance(exc, RequestTimeoutError):
        # The rest of the body is not waited for, so the connection cannot be reused.
        return error_json(408, exc.code, exc.message, headers={"Connection": "close"})
    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.InvalidSchemaName):
        log.error("the database is not migrated: %s", exc)
        return error_json(
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
        return unavailable("the database is unavailable; retry later")
    if isinstance(exc, TimeoutError):
        log.warning("request timed out")
        return unavailable("the request timed out; retry later")
    if isinstance(exc, PgQueueError):
        return error_json(400, exc.code, exc.message)
    log.error("unhandled error in the API", exc_info=exc)
    return error_json(500, "internal_error", "internal error; the server log has the details")
