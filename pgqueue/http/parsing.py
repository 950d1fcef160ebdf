"""Requests as the API reads them: bodies within their limits, JSON, messages, query
parameters and path parts; each refusal names what was wrong."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from typing import Any

import msgspec
from starlette.requests import ClientDisconnect, Request

from pgqueue import admin, jobs
from pgqueue.http.errors import HttpError
from pgqueue.http.models import message, message_in
from pgqueue.models import Message

MAX_BODY = 64 * 1024
# A full batch (1,000 messages of up to 1,600 characters) cannot fit in 64 KiB.
MAX_BATCH_BODY = 8 * 1024 * 1024
MAX_JOB_ID = 2**63 - 1
TENANT_IN_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


# -- request parsing -------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
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


async def read_json(request: Request, limit: int) -> Any:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media and media != "application/json" and not media.endswith("+json"):
        raise HttpError(415, "unsupported_media_type", "send the body as application/json")
    raw = await read_body(request, limit)
    if not raw.strip():
        raise HttpError(400, "invalid_json", "the request body is empty; send a JSON object")
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "not valid JSON"
        raise HttpError(
            400, "invalid_json", f"the request body is not valid JSON: {detail}"
        ) from None


def check_text(value: str, field: str) -> None:
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
        check_text(key, field)
        if isinstance(item, str):
            check_text(item, field)
        elif isinstance(item, float) and not math.isfinite(item):
            raise HttpError(
                422,
                "invalid_content_variables",
                f"{field} values must be strings or finite numbers",
                field=field,
            )


def message_from_json(
    body: object, tenant_id: str, *, prefix: str = "", idempotency_header: str | None = None
) -> Message:
    """A Message from one JSON object, or HttpError (422) naming the field: the model
    (models.Message) refuses unknown fields, wrong types and values out of its bounds;
    text that PostgreSQL cannot hold is refused here; values are checked by
    enqueue.validate."""
    model = message_in(body, prefix)
    for f in msgspec.structs.fields(model):
        value, field = getattr(model, f.name), prefix + f.encode_name
        if isinstance(value, str):
            check_text(value, field)
        elif isinstance(value, dict):
            _check_variables(value, field)
    if idempotency_header is not None:
        check_text(idempotency_header, "Idempotency-Key")
        if model.idempotency_key is not None and model.idempotency_key != idempotency_header:
            raise HttpError(
                422,
                "invalid_request",
                "the Idempotency-Key header and idempotencyKey differ; send one of them",
                field=prefix + "idempotencyKey",
            )
        model.idempotency_key = idempotency_header
    return message(model, tenant_id)


def known_parameters(request: Request, known: tuple[str, ...]) -> None:
    for name in request.query_params:
        if name not in known:
            hint = f"; known: {', '.join(known)}" if known else "; this route takes none"
            raise HttpError(
                422,
                "unknown_parameter",
                f"unknown query parameter {name[:60]!r}{hint}",
                field=name[:60],
            )


def number_parameter(
    request: Request, name: str, *, default: float, low: float, high: float, whole: bool = False
) -> float:
    """A numeric query parameter within [low, high], or its default when absent."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw) if whole else float(raw)
    except ValueError:
        value = math.nan
    if not low <= value <= high:
        kind = "a whole number" if whole else "a number"
        raise HttpError(
            422, "invalid_request", f"{name} must be {kind} from {low:g} to {high:g}", field=name
        )
    return value


def token_shape(token: str) -> bool:
    """Tokens are made by admin.create_token; anything else is not looked up at all."""
    return token.startswith(admin.TOKEN_PREFIX) and len(token) <= 200


def job_id_in_path(request: Request) -> int:
    raw = str(request.path_params.get("job_id", ""))
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 19 and 1 <= int(raw) <= MAX_JOB_ID):
        raise HttpError(404, "not_found", f"no job {raw[:30]!r}")
    return int(raw)


def parse_older_than(text: str, *, now: datetime | None = None) -> datetime:
    """`7d`, `12h`, `30m`, `90s`, `2w` ago, or an ISO 8601 moment with a zone."""
    return jobs.parse_older_than(text, now=now, field="olderThan")
