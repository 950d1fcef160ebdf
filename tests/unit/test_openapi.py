"""The OpenAPI document against the app it describes: every JSON route is in it, and its
schemas are the models' (so a field added to a model shows in /openapi.json)."""

from __future__ import annotations

import msgspec
import pytest

from pgqueue.config import Settings
from pgqueue.db import make_pool
from pgqueue.http import create_app, openapi_spec
from pgqueue.http.models import SCHEMAS, Message, refusal

# The dashboard is a page for people (a signed link), not part of the JSON API.
NOT_DOCUMENTED = {"/dashboard", "/dashboard/data", "/dashboard/jobs/{job_id}/retry"}


def test_every_route_of_the_app_is_in_the_document_and_nothing_else() -> None:
    app = create_app(Settings(), make_pool("postgresql://pgqueue@/none?host=/nonexistent"))
    routes = {
        (route.path, method)
        for route in app.routes
        for method in (getattr(route, "methods", None) or ())
        if method != "HEAD" and route.path not in NOT_DOCUMENTED
    }
    documented = {
        (path, method.upper())
        for path, methods in openapi_spec()["paths"].items()
        for method in methods
    }
    assert routes == documented


def test_the_schemas_are_generated_from_the_models() -> None:
    spec = openapi_spec()
    assert spec["openapi"].startswith("3.1")
    schemas = spec["components"]["schemas"]
    assert set(schemas) == set(SCHEMAS)
    message = schemas["Message"]
    assert message["additionalProperties"] is False
    assert message["required"] == ["phoneNumber"]
    assert set(message["properties"]) == set(Message.__struct_encode_fields__)
    text = message["properties"]["text"]["anyOf"][0]
    assert text == {"type": "string", "minLength": 1, "maxLength": 1600}


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"phoneNumber": "+1", "colour": "red"}, "unknown_field", "colour"),
        ({}, "invalid_phone_number", "phoneNumber"),
        ({"phoneNumber": "+1", "priority": "high"}, "invalid_type", "priority"),
        ({"phoneNumber": "+1", "priority": True}, "invalid_type", "priority"),
        ({"phoneNumber": "+1", "priority": 101}, "invalid_priority", "priority"),
        ({"phoneNumber": "+1", "text": "x" * 1601}, "text_too_long", "text"),
        ({"phoneNumber": "+1", "text": ""}, "invalid_text", "text"),
        ({"phoneNumber": "+1", "sendAt": "2026-01-31T18:00:00"}, "invalid_send_at", "sendAt"),
        ({"phoneNumber": "+1", "contentVariables": {"1": [2]}}, "invalid_type", "contentVariables"),
    ],
)
def test_a_refused_message_names_its_field_and_rule(body: object, code: str, field: str) -> None:
    with pytest.raises(msgspec.ValidationError) as caught:
        msgspec.convert(body, Message)
    error = refusal(caught.value, prefix="messages[3].")
    assert (error.code, error.field) == (code, "messages[3]." + field)
    assert error.status == 422
