"""Providers end to end: the real Twilio SDK over loopback against tests/support/fake_twilio.py
(no mocks), and the sandbox provider against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pgqueue.config import Settings
from pgqueue.errors import (
    PermanentSendError,
    SenderLimitError,
    TenantSendError,
    TransientSendError,
)
from pgqueue.models import Job, Outgoing
from pgqueue.providers.sandbox import SandboxProvider
from pgqueue.providers.twilio import TwilioProvider
from tests.support.fake_twilio import FakeTwilio

ACCOUNT = "AC" + "1" * 32
TOKEN = "tok_" + "s3cr3t" * 5
OTHER_ACCOUNT = "AC" + "2" * 32
OTHER_TOKEN = "tok_" + "0th3r" * 6
TO = "+14155550100"
FROM = "+14155550000"
TEMPLATE = "HX" + "a" * 32
FALLBACK = "HX" + "b" * 32
REPO = Path(__file__).resolve().parents[2]


def make_job(**overrides: Any) -> Job:
    now = datetime.now(UTC)
    fields: dict[str, Any] = {
        "id": 1,
        "queue": "whatsapp-send",
        "tenant_id": "resto-1",
        "conversation": f"resto-1:{TO}",
        "priority": 0,
        "to_number": TO,
        "from_number": None,
        "body": "Your table is ready",
        "content_sid": None,
        "content_variables": None,
        "message_type": None,
        "attempts": 1,
        "max_attempts": 4,
        "claim_token": uuid.uuid4(),
        "start_at": now,
        "start_delay": 0.0,
        "created_at": now,
        "lock_key": 1,
        "locked": True,
        "account_sid": ACCOUNT,
        "whatsapp_from": FROM,
        "auth_token": TOKEN,
    }
    fields.update(overrides)
    return Job(**fields)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeTwilio]:
    with FakeTwilio() as fake:
        yield fake


@pytest.fixture
def fake(fake_server: FakeTwilio) -> FakeTwilio:
    fake_server.reset()
    fake_server.latency = 0.0
    fake_server.failure_rate = 0.0
    fake_server.accounts.clear()
    fake_server.add_account(ACCOUNT, TOKEN)
    fake_server.add_account(OTHER_ACCOUNT, OTHER_TOKEN)
    return fake_server


def settings_for(fake: FakeTwilio, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "twilio_api_base_url": fake.base_url,
        "public_base_url": "https://queue.example.com",
        "send_timeout_s": 5.0,
    }
    return Settings(**(fields | overrides))


@pytest.fixture
async def provider(fake: FakeTwilio) -> AsyncIterator[TwilioProvider]:
    p = TwilioProvider(settings_for(fake))
    try:
        yield p
    finally:
        await p.aclose()


# -- success --------------------------------------------------------------------------


async def test_freeform_send_returns_the_sid_and_sends_twilio_fields(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    result = await provider.send(make_job())

    assert result.sid.startswith("SM") and len(result.sid) == 34
    assert (result.status, result.channel) == ("queued", "freeform")
    [rec] = fake.records()
    assert rec.sid == result.sid
    assert rec.account == ACCOUNT
    assert (rec.to, rec.from_) == (f"whatsapp:{TO}", f"whatsapp:{FROM}")
    assert rec.body == "Your table is ready"
    assert rec.content_sid is None
    assert rec.status_callback == "https://queue.example.com/api/twilio/status/resto-1"


async def test_no_status_callback_without_a_public_url(fake: FakeTwilio) -> None:
    provider = TwilioProvider(Settings(twilio_api_base_url=fake.base_url))
    try:
        await provider.send(make_job())
    finally:
        await provider.aclose()
    assert fake.records()[0].status_callback is None


async def test_message_from_number_overrides_the_tenant_sender(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    await provider.send(make_job(from_number="+14155559999"))
    assert fake.records()[0].from_ == "whatsapp:+14155559999"


async def test_template_send_posts_content_sid_and_variables_json(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    job = make_job(body=None, content_sid=TEMPLATE, content_variables={"1": "Ana", "2": "8pm"})

    result = await provider.send(job)

    assert result.channel == "template"
    [rec] = fake.records()
    assert rec.content_sid == TEMPLATE
    assert rec.body is None
    assert rec.content_variables is not None
    assert json.loads(rec.content_variables) == {"1": "Ana", "2": "8pm"}


async def test_each_tenant_uses_its_own_credentials_and_one_client(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    await provider.send(make_job())
    await provider.send(make_job())
    await provider.send(
        make_job(tenant_id="resto-2", account_sid=OTHER_ACCOUNT, auth_token=OTHER_TOKEN)
    )

    assert [r.account for r in fake.records()] == [ACCOUNT, ACCOUNT, OTHER_ACCOUNT]
    assert all(r.outcome == "sent" for r in fake.records())
    assert len(provider._clients) == 2


async def test_a_send_without_a_job_goes_out_like_a_job_s(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    result = await provider.send_now(
        Outgoing(
            tenant_id="resto-1",
            account_sid=ACCOUNT,
            auth_token=TOKEN,
            from_number=FROM,
            to_number=TO,
            body="hi",
            content_sid=None,
            content_variables=None,
            fallback_content_sid=None,
            fallback_variable=None,
        )
    )
    (record,) = fake.records()
    assert (result.sid, result.channel) == (record.sid, "freeform")
    assert (record.account, record.body) == (ACCOUNT, "hi")


async def test_twilio_region_and_edge_in_the_environment_do_not_move_requests(
    fake: FakeTwilio, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TWILIO_REGION", "ie1")
    monkeypatch.setenv("TWILIO_EDGE", "dublin")
    provider = TwilioProvider(settings_for(fake))
    try:
        result = await provider.send(make_job())
        [client] = provider._clients.values()
        assert (client.region, client.edge) == (None, None)
    finally:
        await provider.aclose()
    assert fake.records()[0].sid == result.sid


# -- failures -------------------------------------------------------------------------


async def test_429_is_a_throttle_with_retry_after(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=429, code=20429, retry_after=2)

    with pytest.raises(TransientSendError) as info:
        await provider.send(make_job())

    err = info.value
    assert err.throttle is True
    assert err.retry_after == pytest.approx(2.0)
    assert (err.provider_code, err.http_status) == ("20429", 429)
    assert err.ambiguous is False


async def test_500_is_transient_without_throttle(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=500, code=20500)

    with pytest.raises(TransientSendError) as info:
        await provider.send(make_job())

    assert info.value.throttle is False
    assert info.value.retry_after is None
    assert info.value.http_status == 500


async def test_21611_queue_full_rests_the_sender(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=400, code=21611)
    with pytest.raises(SenderLimitError) as info:
        await provider.send(make_job())
    assert (info.value.provider_code, info.value.rest_s) == ("21611", 60.0)


async def test_invalid_number_is_permanent(provider: TwilioProvider, fake: FakeTwilio) -> None:
    fake.fail_number(TO, status=400, code=21211)

    with pytest.raises(PermanentSendError) as info:
        await provider.send(make_job())

    assert (info.value.provider_code, info.value.http_status) == ("21211", 400)
    assert info.value.suppress is False
    assert "Invalid 'To' Phone Number" in info.value.message


async def test_fake_validates_to_like_twilio(provider: TwilioProvider, fake: FakeTwilio) -> None:
    with pytest.raises(PermanentSendError) as info:
        await provider.send(make_job(to_number="12345"))
    assert info.value.provider_code == "21211"


async def test_unsubscribed_is_permanent_and_suppresses(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=400, code=21610)
    with pytest.raises(PermanentSendError) as info:
        await provider.send(make_job())
    assert info.value.suppress is True


async def test_bad_credentials_are_a_tenant_error(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    with pytest.raises(TenantSendError) as info:
        await provider.send(make_job(auth_token="wrong-" + TOKEN))

    assert (info.value.provider_code, info.value.http_status) == ("20003", 401)
    assert fake.records()[0].outcome == "auth_failed"
    assert "wrong-" not in info.value.message


async def test_sender_not_on_whatsapp_is_a_tenant_error(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=400, code=63007)
    with pytest.raises(TenantSendError) as info:
        await provider.send(make_job())
    assert info.value.provider_code == "63007"


async def test_a_hang_beyond_the_timeout_is_transient_and_ambiguous(fake: FakeTwilio) -> None:
    fake.hang_next(1)
    provider = TwilioProvider(settings_for(fake, send_timeout_s=0.3))
    started = time.monotonic()
    try:
        with pytest.raises(TransientSendError) as info:
            await provider.send(make_job())
        elapsed = time.monotonic() - started
        # The client closed the connection, so the fake's handler ends too.
        await fake.wait_for(1, timeout=5)
        # The same client still works after a timeout.
        assert (await provider.send(make_job())).sid
    finally:
        await provider.aclose()

    assert info.value.ambiguous is True
    assert 0.25 <= elapsed < 2.0
    assert fake.records()[0].outcome == "hang"
    assert fake.stats()["in_flight"] == 0


async def test_connection_refused_is_transient_and_not_ambiguous() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = TwilioProvider(Settings(twilio_api_base_url=f"http://127.0.0.1:{port}"))
    try:
        with pytest.raises(TransientSendError) as info:
            await provider.send(make_job())
    finally:
        await provider.aclose()
    assert info.value.ambiguous is False


async def test_outside_the_window_resends_as_the_fallback_template(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=400, code=63016)
    job = make_job(fallback_content_sid=FALLBACK, fallback_variable="msg")

    result = await provider.send(job)

    assert result.channel == "template"
    first, second = fake.records()
    assert (first.outcome, first.code, first.body) == ("error", 63016, "Your table is ready")
    assert second.outcome == "sent" and second.sid == result.sid
    assert second.content_sid == FALLBACK
    assert second.body is None
    assert json.loads(second.content_variables or "") == {"msg": "Your table is ready"}


async def test_fallback_variable_defaults_to_1(provider: TwilioProvider, fake: FakeTwilio) -> None:
    fake.fail_next(1, status=400, code=63016)
    await provider.send(make_job(fallback_content_sid=FALLBACK))
    assert json.loads(fake.records()[1].content_variables or "") == {"1": "Your table is ready"}


async def test_outside_the_window_without_fallback_is_permanent(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    fake.fail_next(1, status=400, code=63016)
    with pytest.raises(PermanentSendError) as info:
        await provider.send(make_job())
    assert info.value.provider_code == "63016"
    assert len(fake.records()) == 1


async def test_the_auth_token_never_reaches_errors_or_logs(
    fake: FakeTwilio, caplog: pytest.LogCaptureFixture
) -> None:
    # The fake echoes its error message; make it echo the token, as a hostile or buggy
    # upstream could, and check every path still hides it.
    fake.fail_next(1, status=400, code=21211, message=f"bad request for {TOKEN}")
    fake.fail_next(1, status=500, code=20500)
    fake.fail_next(1, status=429, code=20429, retry_after=1)
    fake.hang_next(1)
    provider = TwilioProvider(settings_for(fake, send_timeout_s=0.3))
    errors: list[BaseException] = []
    caplog.set_level(logging.DEBUG)
    try:
        for job in [make_job()] * 4 + [make_job(auth_token=TOKEN + "x")]:
            try:
                await provider.send(job)
            except Exception as exc:
                errors.append(exc)
        await provider.send(make_job())
    finally:
        await provider.aclose()

    assert len(errors) == 5
    assert "***" in str(errors[0])
    for err in errors:
        assert TOKEN not in str(err)
        assert TOKEN not in repr(err)
        assert TOKEN not in repr(vars(err))
        # A logged traceback must not show the SDK's original error either.
        assert err.__suppress_context__
        assert TOKEN not in "".join(traceback.format_exception(err))
    assert caplog.records, "expected the provider's debug lines"
    assert TOKEN not in caplog.text


async def test_concurrent_sends_are_tracked_by_the_fake(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    fake.latency = 0.1
    jobs = [make_job(to_number=f"+1415555{i:04d}") for i in range(5)]
    jobs.append(make_job(account_sid=OTHER_ACCOUNT, auth_token=OTHER_TOKEN))

    await asyncio.gather(*(provider.send(j) for j in jobs))

    stats = fake.stats()
    assert stats["max_in_flight"] == 6
    assert stats["max_in_flight_by_account"] == {ACCOUNT: 5, OTHER_ACCOUNT: 1}
    assert stats["max_in_flight_by_to"][f"whatsapp:{TO}"] == 1
    assert stats["counts"] == {"sent": 6}
    assert all(r.t_end is not None and r.t_end - r.t >= 0.09 for r in fake.records())


async def test_fake_twilio_runs_as_a_process_and_records_json_lines(tmp_path: Path) -> None:
    record = tmp_path / "twilio.jsonl"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.fake_twilio",
            "--port",
            "0",
            "--latency",
            "0.01:0.02",
            "--record",
            str(record),
            "--account",
            f"{ACCOUNT}:{TOKEN}",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        base_url = line.strip().rsplit(" ", 1)[-1]
        assert base_url.startswith("http://127.0.0.1:")
        provider = TwilioProvider(Settings(twilio_api_base_url=base_url))
        try:
            result = await provider.send(make_job())
            with pytest.raises(TenantSendError):
                await provider.send(make_job(auth_token="nope"))
        finally:
            await provider.aclose()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()  # type: ignore[union-attr]

    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert [x["outcome"] for x in lines] == ["sent", "auth_failed"]
    assert lines[0]["sid"] == result.sid
    assert lines[0]["to"] == f"whatsapp:{TO}"
    assert lines[0]["from"] == f"whatsapp:{FROM}"
    assert lines[0]["t"] <= lines[0]["t_end"]


# -- sandbox --------------------------------------------------------------------------


async def test_sandbox_records_the_message(pool: Any) -> None:
    sandbox = SandboxProvider(pool, latency=0.02, seed=1)
    job = make_job(id=42)

    started = time.monotonic()
    result = await sandbox.send(job)
    elapsed = time.monotonic() - started

    assert elapsed >= 0.02
    assert result.sid.startswith("SM") and len(result.sid) == 34
    assert result.channel == "freeform"
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT * FROM pgqueue.sandbox_messages")
        rows = await cur.fetchall()
    assert [
        (r["tenant_id"], r["job_id"], r["to_number"], r["body"], r["content_sid"], r["sid"])
        for r in rows
    ] == [("resto-1", 42, TO, "Your table is ready", None, result.sid)]


async def test_sandbox_template_send(pool: Any) -> None:
    sandbox = SandboxProvider(pool, latency=0)
    job = make_job(body=None, content_sid=TEMPLATE, content_variables={"1": "x"})
    assert (await sandbox.send(job)).channel == "template"


async def test_sandbox_invalid_number_is_permanent_and_not_recorded(pool: Any) -> None:
    sandbox = SandboxProvider(pool, latency=0, invalid_numbers={TO})

    with pytest.raises(PermanentSendError) as info:
        await sandbox.send(make_job())

    assert info.value.provider_code == "21211"
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM pgqueue.sandbox_messages")
        assert (await cur.fetchone())["n"] == 0


async def test_sandbox_failure_rate_is_transient_and_seeded(pool: Any) -> None:
    always = SandboxProvider(pool, latency=0, failure_rate=1.0)
    with pytest.raises(TransientSendError) as info:
        await always.send(make_job())
    assert (info.value.provider_code, info.value.http_status) == ("sandbox-503", 503)

    async def outcomes(seed: int) -> list[bool]:
        sandbox = SandboxProvider(pool, latency=0, failure_rate=0.5, seed=seed)
        out = []
        for i in range(12):
            try:
                await sandbox.send(replace(make_job(), id=i))
                out.append(True)
            except TransientSendError:
                out.append(False)
        return out

    first = await outcomes(7)
    assert first == await outcomes(7)
    assert True in first and False in first


def test_sandbox_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        SandboxProvider(None, latency=(0.3, 0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SandboxProvider(None, failure_rate=2)  # type: ignore[arg-type]


async def test_a_missed_rate_slot_sends_nothing(provider: TwilioProvider, fake: FakeTwilio) -> None:
    from pgqueue.providers import SlotMissed, slot_deadline

    with slot_deadline(time.time() - 1), pytest.raises(SlotMissed):
        await provider.send(make_job())
    assert fake.records() == []
    with slot_deadline(time.time() + 5):
        result = await provider.send(make_job())
    assert result.sid.startswith("SM")
    # Again, now over a kept-alive connection (the reuse path is checked too).
    with slot_deadline(time.time() - 1), pytest.raises(SlotMissed):
        await provider.send(make_job())
    assert len(fake.records()) == 1


async def test_a_missed_rate_slot_keeps_the_kept_alive_connection(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    """A send that misses its slot wrote nothing on its connection, so the connection goes
    back to the pool: a busy worker misses slots in runs, and a new TCP connection for
    each next send costs the CPU that made it late."""
    from pgqueue.providers import SlotMissed, slot_deadline

    await provider.send(make_job())
    for _ in range(5):
        with slot_deadline(time.time() - 1), pytest.raises(SlotMissed):
            await provider.send(make_job())
    for _ in range(3):
        with slot_deadline(time.time() + 5):
            await provider.send(make_job())
    ports = [r.peer_port for r in fake.records()]
    assert len(ports) == 4 and None not in ports
    assert len(set(ports)) == 1, f"requests came over {len(set(ports))} connections"


async def test_a_send_woken_early_waits_for_its_slot_at_the_wire(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    """The dispatcher wakes Twilio sends SLOT_LEAD_S early to build the request; the
    request itself must not reach the provider before the slot (G4), on a new connection
    or a kept-alive one."""
    from pgqueue.providers import slot_deadline

    assert provider.waits_for_slot
    for _ in range(2):
        start = time.time() + 0.2
        with slot_deadline(start + 5, start=start):
            await provider.send(make_job())
        assert fake.records()[-1].t >= start


async def test_a_send_that_leaves_long_after_its_check_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Passing the slot check does not stop the process from being held up before the
    bytes leave (a starved machine); a send that reaches the wire later than its check
    allowed is logged, once, for the harness."""
    from pgqueue.providers import note_on_wire, slot_deadline, wait_for_slot

    caplog.set_level(logging.WARNING, logger="pgqueue.providers")
    for held_s in (0.0, 0.03):
        caplog.clear()
        slot = time.time()
        with slot_deadline(slot + 0.01, start=slot):
            await wait_for_slot()
            time.sleep(held_s)  # the process held up between the check and the write
            note_on_wire()
            note_on_wire()  # a later chunk of the same request
        lines = [r.getMessage() for r in caplog.records if "went on the wire" in r.getMessage()]
        if not held_s:
            assert lines == []
            continue
        assert len(lines) == 1 and "ms after its rate slot" in lines[0]
        assert float(lines[0].split("wire ")[1].split(" ms")[0]) >= 30


async def test_the_slot_is_checked_in_the_step_that_writes_the_request(
    provider: TwilioProvider, fake: FakeTwilio
) -> None:
    """The final check sits in the body's write, not where the connection is handed over
    (aiohttp writes the body from a task of its own, a trip through the event loop later):
    a send whose slot passes between the two goes nowhere."""
    from pgqueue.providers import SlotMissed, slot_deadline

    await provider.send(make_job())  # a kept-alive connection
    loop = asyncio.get_running_loop()
    slot = time.time()
    deadline = slot + 0.02

    def starve() -> None:  # the loop busy past the deadline right after the hand-over
        time.sleep(0.04)

    with slot_deadline(deadline, start=slot), pytest.raises(SlotMissed):
        loop.call_soon(starve)
        await provider.send(make_job())
    assert len(fake.records()) == 1
