"""Every invalid field gets its own error code and names the field."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pgqueue.enqueue import normalize_phone, validate
from pgqueue.errors import ValidationError
from pgqueue.models import Message


def msg(**kw: Any) -> Message:
    base: dict[str, Any] = {"tenant_id": "t0", "phone_number": "+14155550123", "text": "hi"}
    base.update(kw)
    return Message(**base)


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("+14155550123", "+14155550123"),
        ("whatsapp:+14155550123", "+14155550123"),
        (" +1 (415) 555-0123 ", "+14155550123"),
        ("0044 20 7946 0958", "+442079460958"),
        ("+5511987654321", "+5511987654321"),
    ],
)
def test_phone_numbers_are_normalised(raw: str, e164: str) -> None:
    assert normalize_phone(raw) == e164


@pytest.mark.parametrize(
    "raw", ["", "4155550123", "+1", "+999999999999", "abc", "+1415555012345678"]
)
def test_bad_phone_numbers(raw: str) -> None:
    with pytest.raises(ValidationError) as e:
        validate(msg(phone_number=raw))
    assert e.value.code == "invalid_phone_number" and e.value.field == "phoneNumber"


@pytest.mark.parametrize(
    ("fields", "code", "field"),
    [
        ({"text": ""}, "invalid_text", "text"),
        ({"text": "   "}, "invalid_text", "text"),
        ({"text": "x" * 1601}, "text_too_long", "text"),
        ({"text": None}, "missing_content", "text"),
        ({"text": "a", "content_sid": "HX" + "a" * 32}, "invalid_content", "text"),
        ({"text": None, "content_sid": "MG123"}, "invalid_content_sid", "contentSid"),
        (
            {"text": None, "content_sid": "HX" + "a" * 32, "content_variables": ["x"]},
            "invalid_content_variables",
            "contentVariables",
        ),
        (
            {"text": None, "content_sid": "HX" + "a" * 32, "content_variables": {"1": {"a": 1}}},
            "invalid_content_variables",
            "contentVariables",
        ),
        ({"text": "a", "content_variables": {"1": "x"}}, "invalid_content", "contentVariables"),
        ({"priority": 101}, "invalid_priority", "priority"),
        ({"priority": -101}, "invalid_priority", "priority"),
        ({"priority": True}, "invalid_priority", "priority"),
        ({"priority": 1.5}, "invalid_priority", "priority"),
        ({"send_at": datetime(2030, 1, 1)}, "invalid_send_at", "sendAt"),
        ({"send_at": datetime.now(UTC) + timedelta(days=400)}, "invalid_send_at", "sendAt"),
        ({"idempotency_key": ""}, "invalid_request", "idempotencyKey"),
        ({"idempotency_key": "k" * 201}, "invalid_request", "idempotencyKey"),
        ({"conversation_id": ""}, "invalid_request", "conversationId"),
        ({"message_type": "Marketing!"}, "invalid_message_type", "messageType"),
        ({"from_number": "12"}, "invalid_phone_number", "fromNumber"),
        ({"text": "a\x00b"}, "invalid_text", "text"),
        ({"conversation_id": "c\x00"}, "invalid_request", "conversationId"),
        ({"idempotency_key": "\x00k"}, "invalid_request", "idempotencyKey"),
        (
            {"text": None, "content_sid": "HX" + "a" * 32, "content_variables": {"1": "\x00"}},
            "invalid_content_variables",
            "contentVariables",
        ),
    ],
)
def test_each_bad_field_has_its_error(fields: dict[str, Any], code: str, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        validate(msg(**fields))
    assert (e.value.code, e.value.field) == (code, field)
    assert e.value.message


def test_template_and_defaults() -> None:
    row = validate(
        msg(text=None, content_sid="HX" + "b" * 32, content_variables={"1": "Ana", "2": 3})
    )
    assert row.content_variables == {"1": "Ana", "2": "3"}
    assert row.conversation == "t0:+14155550123"
    assert row.body is None


def test_exactly_1600_characters_is_fine() -> None:
    assert validate(msg(text="é" * 1600)).body == "é" * 1600
