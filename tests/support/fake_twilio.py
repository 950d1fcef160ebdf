"""A fake Twilio Messages API on 127.0.0.1, speaking Twilio's wire format, for tests and
benchmarks. The real SDK talks to it over loopback; nothing is mocked.

In a test (the server runs on its own event loop in a background thread)::

    with FakeTwilio(latency=0.01) as fake:
        fake.add_account("AC...", "token")
        settings = Settings(twilio_api_base_url=fake.base_url)
        fake.fail_next(1, status=429, code=20429, retry_after=2)
        ...
        assert fake.max_in_flight_by_account["AC..."] <= 5

As a process (another process reads the JSON lines)::

    python -m tests.support.fake_twilio --port 8111 --latency 0.15 --record /tmp/twilio.jsonl

With no account registered every well-formed Basic auth is accepted; once one is, only
registered (account SID, auth token) pairs are, and others get Twilio's 401 / 20003.

Status callbacks: with `callbacks=("sent", "delivered")` every accepted message that
names a StatusCallback gets those statuses posted to it, signed with the account's auth
token as Twilio signs them: the first one before the 201 answer leaves (the race the
queue must survive: a status for a SID it has not recorded yet), the others
`callback_gap_s` apart after it. Each callback's HTTP status is kept in
`callback_answers`.

Fault rules, first match wins: `fail_next` (a queue, consumed one request at a time),
then `fail_numbers` (every request to that To number), then `failure_rate`. A fault
with `hang=True` never answers (until the client gives up or the server stops).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import gc
import json
import queue
import random
import re
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any

from aiohttp import web

API_VERSION = "2010-04-01"
_E164 = re.compile(r"^\+[1-9]\d{6,14}$")

MESSAGES = {
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20500: "Internal Server Error",
    20503: "Service Unavailable",
    21211: "Invalid 'To' Phone Number",
    21603: "A 'From' phone number is required.",
    21604: "A 'To' phone number is required.",
    21610: "Attempt to send to unsubscribed recipient",
    21611: "This 'From' number has exceeded the maximum number of queued messages",
    21614: "'To' number is not a valid mobile number",
    21617: "The concatenated message body exceeds the 1600 character limit",
    21619: "A text message body or media url must be specified.",
    21656: "The ContentVariables Parameter is invalid.",
    63007: "Twilio could not find a Channel with the specified From address",
    63016: (
        "Failed to send freeform message because you are outside the allowed window. "
        "If you are using WhatsApp, please use a Message Template."
    ),
}


@dataclass(frozen=True)
class Fault:
    """One injected failure: Twilio's error body with `status`, or no answer (`hang`)."""

    status: int = 503
    code: int = 20503
    message: str | None = None
    retry_after: float | None = None
    hang: bool = False


@dataclass
class Record:
    """One request as the fake saw it. `t` is time.time() on arrival, `t_end` when it
    answered (or the client went away); `outcome` is sent | error | auth_failed | hang."""

    t: float
    account: str
    to: str | None
    from_: str | None
    body: str | None
    content_sid: str | None
    content_variables: str | None
    status_callback: str | None
    validity_period: str | None = None
    t_end: float | None = None
    outcome: str = "pending"
    status: int | None = None
    code: int | None = None
    sid: str | None = None
    # The client's TCP port: requests on one kept-alive connection share it.
    peer_port: int | None = None

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["from"] = data.pop("from_")
        return data


def _peer_port(request: web.Request) -> int | None:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return int(peer[1]) if peer else None


def _number(address: str | None) -> str | None:
    return address.removeprefix("whatsapp:") if address else address


@dataclass
class _Rule:
    fault: Fault
    remaining: int
    to: str | None


class _RecordWriter:
    """Appends the JSON lines from a thread of their own. A write to a file can block
    for tens of ms while the kernel flushes dirty pages (the database's checkpoints and
    WAL share the disk); in the event loop, that would stall the stamping of arrivals
    and make requests look bunched. A soak run saw 81 arrivals in 999 ms: a 73.6 ms
    silence of the fake, in which the workers' logs show three sends of three workers
    reaching their slots, then five arrivals within 2.7 ms."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fake-twilio-records")
        self._thread.start()

    def write(self, line: str) -> None:
        self._lines.put(line)

    def close(self) -> None:
        self._lines.put(None)
        self._thread.join()
        self._file.close()

    def _run(self) -> None:
        while (line := self._lines.get()) is not None:
            self._file.write(line)
            # Flushed per line: a benchmark in another process tails this file.
            self._file.flush()


class FakeTwilio:
    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency: float | tuple[float, float] = 0.0,
        failure_rate: float = 0.0,
        failure: Fault | None = None,
        seed: int | None = None,
        record_path: str | Path | None = None,
        keep_records: bool = True,
        hang_s: float = 600.0,
        callbacks: tuple[str, ...] = (),
        callback_gap_s: float = 0.05,
    ) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.failure_rate = failure_rate
        self.failure = failure or Fault(status=503, code=20503)
        self.hang_s = hang_s
        self.accounts: dict[str, str] = {}
        self.fail_numbers: dict[str, Fault] = {}
        self.keep_records = keep_records
        self.record_path = Path(record_path) if record_path else None
        self.callbacks = callbacks
        self.callback_gap_s = callback_gap_s
        self.callback_answers: list[int] = []
        self._callback_tasks: set[asyncio.Task[None]] = set()

        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._reset_counters()

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._records: _RecordWriter | None = None

    def _reset_counters(self) -> None:
        self.requests: list[Record] = []
        self.counts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.in_flight_by_account: dict[str, int] = {}
        self.max_in_flight_by_account: dict[str, int] = {}
        self.in_flight_by_to: dict[str, int] = {}
        self.max_in_flight_by_to: dict[str, int] = {}

    # -- configuration (callable from any thread) -----------------------------------

    def add_account(self, account_sid: str, auth_token: str) -> None:
        self.accounts[account_sid] = auth_token

    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 503,
        code: int = 20503,
        message: str | None = None,
        retry_after: float | None = None,
        to: str | None = None,
        hang: bool = False,
    ) -> None:
        """The next `n` requests (to `to` only, if given) fail with this error."""
        fault = Fault(status=status, code=code, message=message, retry_after=retry_after, hang=hang)
        with self._lock:
            self._rules.append(_Rule(fault, n, _number(to)))

    def hang_next(self, n: int = 1, *, to: str | None = None) -> None:
        self.fail_next(n, to=to, hang=True)

    def fail_number(self, number: str, *, status: int = 400, code: int = 21211) -> None:
        self.fail_numbers[_number(number) or number] = Fault(status=status, code=code)

    def reset(self) -> None:
        """Forget records, counters and fault rules; accounts and settings stay."""
        with self._lock:
            self._rules.clear()
            self.fail_numbers.clear()
            self._reset_counters()

    # -- what happened --------------------------------------------------------------

    def records(self) -> list[Record]:
        with self._lock:
            return list(self.requests)

    def sent(self) -> list[Record]:
        return [r for r in self.records() if r.outcome == "sent"]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "counts": dict(self.counts),
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "max_in_flight_by_account": dict(self.max_in_flight_by_account),
                "max_in_flight_by_to": dict(self.max_in_flight_by_to),
            }

    async def wait_for(self, n: int, *, outcome: str | None = None, timeout: float = 10.0) -> None:
        """Wait (without blocking the caller's loop) until `n` requests have finished."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                done = sum(
                    1
                    for r in self.requests
                    if r.t_end is not None and (outcome is None or r.outcome == outcome)
                )
            if done >= n:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"fake Twilio saw {done} of {n} requests in {timeout}s")
            await asyncio.sleep(0.01)

    # -- lifecycle ------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeTwilio:
        """Serve from a background thread with its own event loop; returns when listening."""
        ready = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.shutdown())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fake-twilio", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop = self._thread = None

    def __enter__(self) -> FakeTwilio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def serve(self) -> None:
        """Start listening on the running loop (the standalone process calls this)."""
        self._closing = asyncio.Event()
        if self.record_path is not None:
            self._records = _RecordWriter(self.record_path)
        app = web.Application()
        app.router.add_post(r"/{version}/Accounts/{account}/Messages.json", self._messages)
        app.router.add_get("/_fake/stats", self._stats)
        app.router.add_post("/_fake/fail_next", self._fail_next)
        app.router.add_post("/_fake/config", self._config)
        app.router.add_post("/_fake/reset", self._reset)
        # handler_cancellation: a client that gives up (timeout) ends the handler, so a
        # hung request stops counting as in flight, as it would at Twilio's edge.
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=2048, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def shutdown(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._records is not None:
            self._records.close()
            self._records = None

    # -- the Messages API -----------------------------------------------------------

    def _authorized(self, request: web.Request, account: str) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if user != account:
            return False
        if not self.accounts:
            return bool(password)
        return self.accounts.get(user) == password

    def _pick_fault(self, to: str | None) -> Fault | None:
        number = _number(to)
        with self._lock:
            for rule in self._rules:
                if rule.to is None or rule.to == number:
                    rule.remaining -= 1
                    if rule.remaining <= 0:
                        self._rules.remove(rule)
                    return rule.fault
            fault = self.fail_numbers.get(number or "")
            if fault is not None:
                return fault
            if self.failure_rate and self._rng.random() < self.failure_rate:
                return self.failure
            return None

    def _delay(self) -> float:
        if isinstance(self.latency, tuple):
            with self._lock:
                return self._rng.uniform(*self.latency)
        return float(self.latency)

    def _enter(self, rec: Record) -> None:
        to = rec.to or ""
        with self._lock:
            if self.keep_records:
                self.requests.append(rec)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            n = self.in_flight_by_account.get(rec.account, 0) + 1
            self.in_flight_by_account[rec.account] = n
            if n > self.max_in_flight_by_account.get(rec.account, 0):
                self.max_in_flight_by_account[rec.account] = n
            n = self.in_flight_by_to.get(to, 0) + 1
            self.in_flight_by_to[to] = n
            if n > self.max_in_flight_by_to.get(to, 0):
                self.max_in_flight_by_to[to] = n

    def _leave(self, rec: Record) -> None:
        rec.t_end = time.time()
        to = rec.to or ""
        with self._lock:
            # .get: a reset() while this request ran has emptied the maps.
            self.in_flight -= 1
            self.in_flight_by_account[rec.account] = (
                self.in_flight_by_account.get(rec.account, 1) - 1
            )
            self.in_flight_by_to[to] = self.in_flight_by_to.get(to, 1) - 1
            self.counts[rec.outcome] = self.counts.get(rec.outcome, 0) + 1
        if self._records is not None:
            self._records.write(json.dumps(rec.as_json()) + "\n")

    def _error(
        self,
        rec: Record,
        status: int,
        code: int,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        rec.outcome = "auth_failed" if code == 20003 else "error"
        rec.status, rec.code = status, code
        body = {
            "code": code,
            "message": message or MESSAGES.get(code, "Error"),
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
        return web.json_response(body, status=status, headers=headers)

    async def _messages(self, request: web.Request) -> web.Response:
        arrived = time.time()
        account = request.match_info["account"]
        form = await request.post()

        def field(name: str) -> str | None:
            value = form.get(name)
            return value if isinstance(value, str) else None

        rec = Record(
            t=arrived,
            account=account,
            to=field("To"),
            from_=field("From"),
            body=field("Body"),
            content_sid=field("ContentSid"),
            content_variables=field("ContentVariables"),
            status_callback=field("StatusCallback"),
            validity_period=field("ValidityPeriod"),
            peer_port=_peer_port(request),
        )
        self._enter(rec)
        try:
            return await self._answer(request, rec)
        except asyncio.CancelledError:
            rec.outcome = "hang"
            raise
        finally:
            self._leave(rec)

    async def _answer(self, request: web.Request, rec: Record) -> web.Response:
        if request.match_info["version"] != API_VERSION:
            return self._error(rec, 404, 20404)
        if not self._authorized(request, rec.account):
            return self._error(
                rec, 401, 20003, headers={"WWW-Authenticate": 'Basic realm="Twilio API"'}
            )
        fault = self._pick_fault(rec.to)
        delay = self._delay()
        if delay > 0:
            await asyncio.sleep(delay)
        if fault is not None and fault.hang:
            rec.outcome = "hang"
            assert self._closing is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.hang_s)
            return self._error(rec, 503, 20503)
        if fault is not None:
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            return self._error(rec, fault.status, fault.code, fault.message, headers)
        invalid = self._validate(rec)
        if invalid is not None:
            return self._error(rec, 400, invalid)
        response = self._created(rec)
        if self.callbacks and rec.status_callback and rec.sid:
            first, *later = self.callbacks
            await self._call_back(rec, first)
            task = asyncio.create_task(self._call_back_later(rec, later))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)
        return response

    async def _call_back_later(self, rec: Record, statuses: list[str]) -> None:
        for status in statuses:
            await asyncio.sleep(self.callback_gap_s)
            await self._call_back(rec, status)

    async def _call_back(self, rec: Record, status: str) -> None:
        from aiohttp import ClientError, ClientSession, ClientTimeout
        from twilio.request_validator import RequestValidator

        assert rec.status_callback is not None and rec.sid is not None
        form = {
            "AccountSid": rec.account,
            "ApiVersion": API_VERSION,
            "From": rec.from_ or "",
            "MessageSid": rec.sid,
            "MessageStatus": status,
            "SmsSid": rec.sid,
            "SmsStatus": status,
            "To": rec.to or "",
        }
        token = self.accounts.get(rec.account, "")
        signature = RequestValidator(token).compute_signature(rec.status_callback, form)
        try:
            async with (
                ClientSession(timeout=ClientTimeout(total=10)) as session,
                session.post(
                    rec.status_callback, data=form, headers={"X-Twilio-Signature": signature}
                ) as answer,
            ):
                code = answer.status
        except (ClientError, TimeoutError):
            code = 0
        with self._lock:
            self.callback_answers.append(code)

    @staticmethod
    def _validate(rec: Record) -> int | None:
        if not rec.to:
            return 21604
        if not rec.from_:
            return 21603
        if not _E164.match(_number(rec.to) or ""):
            return 21211
        if not rec.body and not rec.content_sid:
            return 21619
        if rec.body and len(rec.body) > 1600:
            return 21617
        if rec.content_variables is not None:
            try:
                if not isinstance(json.loads(rec.content_variables), dict):
                    return 21656
            except ValueError:
                return 21656
        return None

    def _created(self, rec: Record) -> web.Response:
        sid = "SM" + uuid.uuid4().hex
        rec.outcome, rec.status, rec.sid = "sent", 201, sid
        now = formatdate(usegmt=True)
        uri = f"/{API_VERSION}/Accounts/{rec.account}/Messages/{sid}"
        body = {
            "account_sid": rec.account,
            "api_version": API_VERSION,
            "body": rec.body or "",
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": rec.from_,
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": None,
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": rec.to,
            "uri": f"{uri}.json",
        }
        return web.json_response(body, status=201)

    # -- control API, for a fake running in another process --------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _fail_next(self, request: web.Request) -> web.Response:
        spec = await request.json()
        self.fail_next(
            int(spec.get("n", 1)),
            status=int(spec.get("status", 503)),
            code=int(spec.get("code", 20503)),
            message=spec.get("message"),
            retry_after=spec.get("retry_after"),
            to=spec.get("to"),
            hang=bool(spec.get("hang", False)),
        )
        return web.json_response({"ok": True})

    async def _config(self, request: web.Request) -> web.Response:
        spec = await request.json()
        if "latency" in spec:
            self.latency = _latency(spec["latency"])
        if "failure_rate" in spec:
            self.failure_rate = float(spec["failure_rate"])
        return web.json_response({"ok": True})

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


def _latency(raw: object) -> float | tuple[float, float]:
    """`0.15`, `"0.1:0.3"` / `"0.1-0.3"` (a uniform range) or `[0.1, 0.3]`."""
    if isinstance(raw, list | tuple):
        low, high = raw
        return (float(low), float(high))
    text = str(raw)
    for sep in (":", "-", ","):
        if sep in text:
            low, high = text.split(sep, 1)
            return (float(low), float(high))
    return float(text)


def _account(raw: str) -> tuple[str, str]:
    sid, sep, token = raw.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected ACCOUNT_SID:AUTH_TOKEN")
    return sid, token


async def _main(args: argparse.Namespace) -> None:
    fake = FakeTwilio(
        host=args.host,
        port=args.port,
        latency=args.latency,
        failure_rate=args.failure_rate,
        failure=Fault(status=args.failure_status, code=args.failure_code),
        seed=args.seed,
        record_path=args.record,
        # A benchmark can send millions; the JSON lines file is the record.
        keep_records=False,
    )
    for sid, token in args.account:
        fake.add_account(sid, token)
    await fake.serve()
    # The process stamps arrivals: keep the collector's pauses short. What exists once it
    # listens (aiohttp, the app) is never garbage; only the requests' objects are scanned.
    gc.collect()
    gc.freeze()
    print(f"fake_twilio listening on {fake.base_url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await fake.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Twilio Messages API on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    parser.add_argument("--latency", type=_latency, default=0.0, help="seconds, or LOW:HIGH")
    parser.add_argument("--failure-rate", type=float, default=0.0)
    parser.add_argument("--failure-status", type=int, default=503)
    parser.add_argument("--failure-code", type=int, default=20503)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--record", default=None, help="append one JSON line per request")
    parser.add_argument(
        "--account",
        type=_account,
        action="append",
        default=[],
        help="ACCOUNT_SID:AUTH_TOKEN (repeatable); none means any credentials pass",
    )
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
