"""The Twilio error table, with exceptions built by the SDK itself from raw responses."""

from __future__ import annotations

import json
from email.utils import formatdate
from time import time

import aiohttp
import pytest
from twilio.base.exceptions import TwilioException
from twilio.base.version import Version
from twilio.http.response import Response

from pgqueue.errors import (
    PermanentSendError,
    SenderLimitError,
    TenantSendError,
    TransientSendError,
)
from pgqueue.providers.twilio import _retry_after, map_transport_error, map_twilio_error

TOKEN = "tok_" + "secret" * 5
URI = "/Accounts/AC123/Messages.json"


def sdk_error(status: int, body: object, headers: dict[str, str] | None = None) -> TwilioException:
    text = body if isinstance(body, str) else json.dumps(body)
    return Version.exception(
        "POST", URI, Response(status, text, headers or {}), "Unable to create record"
    )


def twilio_body(status: int, code: int, message: str = "boom") -> dict[str, object]:
    return {"code": code, "message": message, "more_info": "https://x", "status": status}


@pytest.mark.parametrize(
    ("status", "code", "kind", "suppress"),
    [
        (400, 21211, PermanentSendError, False),
        (400, 21614, PermanentSendError, False),
        (400, 21610, PermanentSendError, True),
        (400, 21617, PermanentSendError, False),
        (400, 21658, PermanentSendError, False),
        (400, 21654, PermanentSendError, False),
        (400, 21656, PermanentSendError, False),
        (400, 63016, PermanentSendError, False),
        (400, 63024, PermanentSendError, True),
        (400, 63003, PermanentSendError, False),
        (400, 63014, PermanentSendError, True),
        (404, 20404, PermanentSendError, False),
        (400, 12345, PermanentSendError, False),
        (401, 20003, TenantSendError, None),
        (400, 63007, TenantSendError, None),
        (400, 21611, SenderLimitError, None),
        (429, 63018, SenderLimitError, None),
        (429, 30001, SenderLimitError, None),
        (500, 20500, TransientSendError, None),
        (503, 20503, TransientSendError, None),
        (429, 20429, TransientSendError, None),
    ],
)
def test_code_table(status: int, code: int, kind: type, suppress: bool | None) -> None:
    err = map_twilio_error(sdk_error(status, twilio_body(status, code)), auth_token=TOKEN)

    assert type(err) is kind
    assert (err.provider_code, err.http_status) == (str(code), status)
    assert err.message == f"Twilio error {code} (HTTP {status}): boom"
    if suppress is not None:
        assert isinstance(err, PermanentSendError)
        assert err.suppress is suppress


def test_a_sender_limit_rests_the_sender_not_the_queue() -> None:
    tier = map_twilio_error(sdk_error(429, twilio_body(429, 63018)), auth_token=TOKEN)
    full = map_twilio_error(
        sdk_error(400, twilio_body(400, 21611)), auth_token=TOKEN, headers={"Retry-After": "90"}
    )
    assert isinstance(tier, SenderLimitError) and tier.rest_s == 3600.0
    assert isinstance(full, SenderLimitError) and full.rest_s == 90.0


def test_429_throttles_with_retry_after_seconds() -> None:
    exc = sdk_error(429, twilio_body(429, 20429))
    err = map_twilio_error(exc, auth_token=TOKEN, headers={"Retry-After": "3"})
    assert isinstance(err, TransientSendError)
    assert (err.throttle, err.retry_after) == (True, 3.0)


def test_a_401_without_a_twilio_body_is_still_a_tenant_error() -> None:
    err = map_twilio_error(sdk_error(401, "Unauthorized"), auth_token=TOKEN)
    assert isinstance(err, TenantSendError)
    assert err.provider_code == "401"


def test_a_gateway_error_page_is_transient() -> None:
    err = map_twilio_error(sdk_error(502, "<html>Bad Gateway</html>"), auth_token=TOKEN)
    assert isinstance(err, TransientSendError)
    assert (err.provider_code, err.http_status, err.throttle) == ("502", 502, False)


def test_rfc9457_service_errors_map_the_same_way() -> None:
    body = {"type": "https://x/21211", "title": "Invalid To", "status": 400, "code": 21211}
    err = map_twilio_error(sdk_error(400, body), auth_token=TOKEN)
    assert isinstance(err, PermanentSendError)
    assert err.provider_code == "21211"
    assert "Invalid To" in err.message


def test_an_sdk_error_without_http_is_transient() -> None:
    err = map_twilio_error(TwilioException("something odd"), auth_token=TOKEN)
    assert isinstance(err, TransientSendError)
    assert err.provider_code is None


def test_the_token_is_scrubbed_from_messages() -> None:
    exc = sdk_error(400, twilio_body(400, 21211, f"echo {TOKEN}"))
    err = map_twilio_error(exc, auth_token=TOKEN)
    assert TOKEN not in err.message
    assert "echo ***" in err.message


@pytest.mark.parametrize(
    ("exc", "ambiguous"),
    [
        (aiohttp.ConnectionTimeoutError("connect"), False),
        (TimeoutError(), True),
        (aiohttp.SocketTimeoutError("read"), True),
        (aiohttp.ServerDisconnectedError(), True),
        (aiohttp.ClientOSError(104, "reset"), True),
    ],
)
def test_transport_errors(exc: BaseException, ambiguous: bool) -> None:
    err = map_transport_error(exc, auth_token=TOKEN)
    assert err.ambiguous is ambiguous
    assert err.provider_code == type(exc).__name__


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("2", 2.0),
        ("0.5", 0.5),
        ("-4", 0.0),
        ("soon", None),
    ],
)
def test_retry_after_values(header: str | None, expected: float | None) -> None:
    headers = {} if header is None else {"Retry-After": header}
    assert _retry_after(headers) == expected


def test_retry_after_as_an_http_date() -> None:
    value = _retry_after({"Retry-After": formatdate(time() + 30, usegmt=True)})
    assert value is not None and 28 <= value <= 31
