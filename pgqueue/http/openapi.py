"""The OpenAPI document of the routes (GET /openapi.json)."""

from __future__ import annotations

from typing import Any

import msgspec

from pgqueue.http.models import SCHEMAS

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


def schemas() -> dict[str, Any]:
    """components/schemas: JSON Schema (2020-12, as OpenAPI 3.1 has it) of each model."""
    _, components = msgspec.json.schema_components(
        list(SCHEMAS.values()), ref_template="#/components/schemas/{name}"
    )
    return {name: _without_null_defaults(components[name]) for name in SCHEMAS}


def _without_null_defaults(schema: Any) -> Any:
    # An optional field says `default: null`; client generators (openapi-typescript)
    # take a default to mean "always present" and would make every such field required.
    if isinstance(schema, dict):
        return {
            k: _without_null_defaults(v)
            for k, v in schema.items()
            if not (k == "default" and v is None)
        }
    if isinstance(schema, list):
        return [_without_null_defaults(v) for v in schema]
    return schema


def openapi_spec() -> dict[str, Any]:
    """The API as OpenAPI 3.1: every route, request body and error answer; the bodies' schemas
    generated from the models (models.py)."""
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
        "openapi": "3.1.0",
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
            "/api/events": {
                "get": {
                    "summary": "The tenant's delivery events after a cursor, oldest first "
                    "(gapless; a message's events in the order they happened); with "
                    "`wait`, waits up to that many seconds for the first",
                    "security": tenant_auth,
                    "parameters": [
                        {
                            "name": "after",
                            "in": "query",
                            "required": False,
                            "description": "a nextCursor this feed returned; none or empty: "
                            "the start",
                            "schema": {"type": "string", "pattern": "^([0-9]+-[0-9]+)?$"},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        {
                            "name": "wait",
                            "in": "query",
                            "required": False,
                            "description": "long poll: seconds to wait for an event (0-30)",
                            "schema": {"type": "number", "minimum": 0, "maximum": 30},
                        },
                        tenant_query,
                    ],
                    "responses": {
                        "200": _json_ok("Events and the cursor to read on from", "EventPage"),
                        "401": _E401,
                        "403": _E403,
                        "422": _E422_QUERY,
                        "503": _E503,
                    },
                }
            },
            "/api/webhook/test": {
                "post": {
                    "summary": "Post a signed test request to the tenant's webhook URL now",
                    "security": tenant_auth,
                    "parameters": [tenant_query],
                    "responses": {
                        "200": _json_ok("How the endpoint answered", "WebhookTest"),
                        "401": _E401,
                        "403": _E403,
                        "409": _err("The tenant has no webhook URL", "no_webhook"),
                        "422": _E422_QUERY,
                        "503": _E503,
                    },
                }
            },
            "/api/webhook/dead-letters": {
                "get": {
                    "summary": "Batches of events the tenant's endpoint kept refusing",
                    "security": tenant_auth,
                    "parameters": [
                        {
                            "name": "limit",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 1, "maximum": 500},
                        },
                        tenant_query,
                    ],
                    "responses": {
                        "200": _json_ok("Newest first", "WebhookDeadLetters"),
                        "401": _E401,
                        "403": _E403,
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
                            "description": "OpenAPI 3.1",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
    }
