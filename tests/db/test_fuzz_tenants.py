"""Two tenants under fuzzing: no 5xx, and nothing one tenant sends reads or moves the other's.

* A stateful schemathesis run over the whole API (its links are inferred from the
  OpenAPI document: send -> job -> cancel/retry), each step sent with t0's or t1's token,
  so job ids made by one tenant are followed with the other's token. Checks: no 5xx,
  the OpenAPI conformance checks of test_schemathesis.py, and a cross-tenant check
  (anything but 404 for another tenant's job, or another tenant's job in an answer,
  fails); after
  the run every job in the database belongs to the tenant whose token created it.
* A Hypothesis fuzzer over request parsing: JSON values, raw bytes, content types,
  Authorization / Idempotency-Key / Content-Length values and query strings, mostly
  with t0's token. Every answer is < 500, every 4xx is a JSON `{"error": ...}`; t1's
  job (and its conversation, which t0's fuzzed conversationIds aim at) is untouched.

Both print how many requests they made (`pytest -s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, quote_from_bytes

import httpx
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle
from schemathesis.checks import load_all_checks
from schemathesis.generation.feedback import NO_FEEDBACK
from schemathesis.generation.modes import GenerationMode
from schemathesis.generation.stateful.state_machine import StepInput, StepOutput, normalize_name
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.stateful import _step_case_strategy, is_root_allowed, transition

from pgqueue.admin import hash_token
from pgqueue.config import Settings
from pgqueue.db import make_pool
from pgqueue.http import create_app
from tests.support.helpers import headers_made_invalid

load_all_checks()
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

ADMIN = "admin-token-for-tenant-fuzzing-0123"
TOKENS = {
    "t0": "pgq_fuzz_tenant_t0_token_0123456789abcdef",
    "t1": "pgq_fuzz_tenant_t1_token_0123456789abcdef",
}
TENANT_OF_TOKEN = {token: tenant for tenant, token in TOKENS.items()}
OTHER = {"t0": "t1", "t1": "t0"}
SEND = "POST /api/whatsapp/send"
BATCH = "POST /api/whatsapp/send/batch"
T1_PHONE = "+14155550177"
T1_CONVERSATION = "t1-conversation"
T1_IDEMPOTENCY = "t1-idempotency-key"

CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.unsupported_method,
]


def _add_tenants(db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for n, (tenant, token) in enumerate(TOKENS.items()):
            conn.execute(
                "INSERT INTO pgqueue.tenants (id, name, account_sid, auth_token, whatsapp_from) "
                "VALUES (%s, %s, %s, %s, %s)",
                (tenant, tenant, "AC" + str(n) * 32, f"secret-{tenant}", f"+1415555010{n}"),
            )
            conn.execute(
                "INSERT INTO pgqueue.api_tokens (tenant_id, token_hash, prefix) "
                "VALUES (%s, %s, %s)",
                (tenant, hash_token(token), token[:12]),
            )


def _app(db_url: str) -> Any:
    # Not opened here: the app's lifespan opens (and closes) the pool on its own loop.
    pool = make_pool(db_url, min_size=1, max_size=4)
    # Fuzzed tokens fail authentication all the time: no 429 lockout of the test client.
    return create_app(
        Settings(admin_token=ADMIN, auth_failures_per_minute=10**9), pool, db_timeout_s=5.0
    )


def _db_owners(db_url: str) -> dict[int, str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT id, tenant_id, conversation FROM pgqueue.jobs "
            "UNION ALL SELECT id, tenant_id, conversation FROM pgqueue.job_history"
        ).fetchall()
    owners: dict[int, str] = {}
    for job_id, tenant, conversation in rows:
        assert conversation.startswith(f"{tenant}:"), (job_id, tenant, conversation)
        assert owners.setdefault(job_id, tenant) == tenant, f"job {job_id} under two tenants"
    return owners


# -- 1. stateful schemathesis, two tenants --------------------------------------------


@dataclass
class Ledger:
    owner: dict[int, str] = field(default_factory=dict)  # job id -> tenant whose token made it
    steps: int = 0
    scenarios: int = 0
    canceled: set[int] = field(default_factory=set)  # canceled jobs are deleted
    probes: int = 0  # requests on a job id with the other tenant's token
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


def _caller(response: Any) -> str | None:
    header = response.request.headers.get("Authorization") or ""
    return TENANT_OF_TOKEN.get(header.removeprefix("Bearer "))


def _job_ids(body: Any) -> list[int]:
    if not isinstance(body, dict):
        return []
    items = body.get("jobs") if isinstance(body.get("jobs"), list) else [body]
    return [i["jobId"] for i in items if isinstance(i, dict) and isinstance(i.get("jobId"), int)]


def _cross_tenant_check(ledger: Ledger) -> Any:
    def no_cross_tenant_access(ctx: Any, response: Any, case: Any) -> None:
        caller = _caller(response)
        label = case.operation.label
        status = response.status_code
        try:
            body = response.json()
        except Exception:
            body = None
        problem = None
        if label in (SEND, BATCH) and status == 202:
            for job_id in _job_ids(body):
                # setdefault: checks may run again while Hypothesis shrinks.
                owner = ledger.owner.setdefault(job_id, str(caller))
                if owner != caller:
                    problem = f"{caller}'s send answered {owner}'s job {job_id}"
        if "{job_id}" in case.operation.path:
            raw = str((case.path_parameters or {}).get("job_id", ""))
            owner = ledger.owner.get(int(raw)) if raw.isdigit() and len(raw) < 20 else None
            if owner is not None and caller is not None and owner != caller:
                ledger.probes += 1
                if status != 404:  # "not found", as for a job that does not exist
                    problem = f"{caller}'s token got {status} for {owner}'s job {raw}: {body}"
            if owner is not None and case.method.upper() == "DELETE" and status == 200:
                ledger.canceled.add(int(raw))
        if isinstance(body, dict) and body.get("tenantId", caller) != caller:
            problem = f"{caller}'s token was shown a job of {body.get('tenantId')}: {body}"
        if problem is not None:
            ledger.failures.append(problem)
            raise AssertionError(problem)

    return no_cross_tenant_access


def _deliverable(message: dict[str, Any], n: int) -> dict[str, Any]:
    message = {**message, "phoneNumber": f"+1415555{n % 10:04d}"}
    if not isinstance(message.get("text"), str) or not message["text"].strip():
        message = {**message, "text": "hi", "contentSid": None}
    return message


def _two_tenant_machine(schema: Any, ledger: Ledger) -> Any:
    base = schema.as_state_machine()
    # The inferred dependency graph takes conversationId / contentSid for references to
    # resources nothing produces, so the sends are not chosen as roots (only a retry of
    # a random job id is). Make them roots, the way schemathesis builds its own.
    extra: dict[str, Any] = {}
    labels = set()
    for path in ("/api/whatsapp/send", "/api/whatsapp/send/batch"):
        operation = schema[path]["POST"]
        modes = schema.config.generation_for(operation=operation, phase="stateful").modes
        name = normalize_name(f"RANDOM -> {operation.label}")
        extra[name] = transition(
            name=name,
            target=Bundle("catch_all"),
            precondition=is_root_allowed(operation.label),
            input=_step_case_strategy(operation, modes, feedback=NO_FEEDBACK).map(
                StepInput.initial
            ),
        )
        labels.add(operation.label)
    check = _cross_tenant_check(ledger)

    class TwoTenants(base):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            ledger.scenarios += 1
            self.calls = 0
            self.tenant_of_case: dict[str, str] = {}

        def step(self, input: StepInput) -> StepOutput:
            self.calls += 1
            ledger.steps += 1
            if input.transition is None:
                tenant = ("t0", "t1")[self.calls % 2]
            else:
                # Every other linked step swaps tokens: t1 follows t0's job ids and back.
                parent = self.tenant_of_case.get(input.transition.parent_id, "t0")
                tenant = parent if self.calls % 2 else OTHER[parent]
            self.tenant_of_case[input.case.id] = tenant
            case = input.case
            mode = case.meta.generation.mode if case.meta is not None else None
            if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and self.calls % 3:
                # Random strings are rarely phone numbers: most sends should be queued.
                if case.operation.label == SEND:
                    case.body = _deliverable(case.body, self.calls)
                elif case.operation.label == BATCH and isinstance(case.body.get("messages"), list):
                    items = case.body["messages"]
                    case.body = {
                        **case.body,
                        "messages": [
                            _deliverable(m, self.calls + i) if isinstance(m, dict) else m
                            for i, m in enumerate(items)
                        ],
                    }
            return super().step(input)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            token = TOKENS[self.tenant_of_case.get(case.id, "t0")]
            return {"headers": {"Authorization": f"Bearer {token}"}}

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            ledger.statuses[f"{case.operation.label} {response.status_code}"] += 1
            checks = [*CHECKS, check]
            if headers_made_invalid(case):
                # get_call_kwargs puts a valid token on every request, which undoes a
                # header made invalid on purpose: the request is no longer negative.
                checks.remove(openapi_checks.negative_data_rejection)
            case.validate_response(
                response,
                checks=checks,
                headers=kwargs.get("headers"),
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    for name, rule in extra.items():
        setattr(TwoTenants, name, rule)
    TwoTenants.root_rules = base.root_rules | frozenset(extra)
    TwoTenants._root_labels = base._root_labels | frozenset(labels)
    return TwoTenants


@pytest.fixture
def two_tenant_schema(db_url: str) -> Iterator[Any]:
    _add_tenants(db_url)
    try:
        schema = schemathesis.openapi.from_asgi("/openapi.json", _app(db_url))
        # The feed's answers list the jobs every earlier example made (the database is not
        # reset between examples), and links drawn from them make the machine's rule
        # choices depend on that history, which Hypothesis refuses (FlakyStrategyDefinition).
        # A tenant's feed is its own: tests/db/test_events.py checks that instead.
        yield schema.exclude(path_regex="^/api/(events|webhook)")
    finally:
        shutdown_lifespans()


def test_stateful_two_tenants_never_cross(two_tenant_schema: Any, db_url: str) -> None:
    ledger = Ledger()
    machine = _two_tenant_machine(two_tenant_schema, ledger)
    machine.run(
        settings=settings(
            max_examples=40,
            stateful_step_count=10,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
    )
    owners = _db_owners(db_url)
    print(
        f"\nstateful: {ledger.scenarios} scenarios, {ledger.steps} requests, "
        f"{len(ledger.owner)} jobs created ({len(ledger.canceled)} canceled), "
        f"{ledger.probes} cross-tenant job requests; "
        f"statuses: {dict(sorted(ledger.statuses.items()))}"
    )
    assert not ledger.failures
    assert owners == {j: t for j, t in ledger.owner.items() if j not in ledger.canceled}
    created = Counter(ledger.owner.values())
    # The run is only worth something if both tenants made jobs the other then asked for.
    assert created["t0"] and created["t1"], created
    assert ledger.probes >= 10, ledger.probes


# -- 2. hypothesis fuzzer over request parsing -----------------------------------------

FIELDS = [
    "phoneNumber",
    "text",
    "contentSid",
    "contentVariables",
    "fromNumber",
    "conversationId",
    "priority",
    "sendAt",
    "idempotencyKey",
    "messageType",
]
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates and NUL too
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | ANY_TEXT
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
# Aimed at t1: t0 naming t1's conversation, number or idempotency key in every form.
AIMED_AT_T1 = [
    T1_CONVERSATION,
    f"t1:{T1_CONVERSATION}",
    f"t1:{T1_PHONE}",
    T1_PHONE,
    "t1",
    "t1:",
    ":",
    f"t0:t1:{T1_CONVERSATION}",
    f"../t1:{T1_CONVERSATION}",
    T1_IDEMPOTENCY,
]
aimed_at_t1 = st.sampled_from(AIMED_AT_T1)
plausible: dict[str, st.SearchStrategy[Any]] = {
    "phoneNumber": st.sampled_from(
        [T1_PHONE, "+14155550123", "whatsapp:+14155550124", "+1", "", "+999999999999999999"]
    ),
    "text": st.sampled_from(["hi", "", " ", "x" * 1601]) | st.text(max_size=20),
    "contentSid": st.sampled_from(["HX" + "0" * 32, "HX" + "g" * 32, "HX"]),
    "contentVariables": st.dictionaries(ANY_TEXT, json_values, max_size=3),
    "fromNumber": st.sampled_from(["+14155550100", "+14155550101", "whatsapp:+1"]),
    "conversationId": aimed_at_t1 | ANY_TEXT,
    "priority": st.integers(-200, 200) | st.sampled_from([2**15, -(2**63), 2**64]),
    "sendAt": st.sampled_from(
        [
            "2030-01-01T00:00:00Z",
            "2000-01-01T00:00:00+00:00",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59Z",
            "2026-02-30T00:00:00Z",
            "2026-01-01T00:00:00+99:99",
            "2026-01-01T00:00:00.123456789z",
        ]
    )
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat()),
    "idempotencyKey": aimed_at_t1 | ANY_TEXT,
    "messageType": st.sampled_from(["marketing", "Marketing", "", "a" * 100]) | ANY_TEXT,
}

# Strings the database cannot store or that are long: each must be a 422, not a 500.
NASTY = ["\x00", "a\x00b", "\ud800", "x\udfff", "\U0001f600", " ", "x" * 1601, "\u202e", "%00"]
nasty_or_text = st.sampled_from(NASTY) | st.text(min_size=1, max_size=20)
good: dict[str, st.SearchStrategy[Any]] = {
    "text": nasty_or_text,
    "conversationId": aimed_at_t1 | nasty_or_text,
    "idempotencyKey": aimed_at_t1 | nasty_or_text,
    "fromNumber": st.sampled_from(["+14155550100", "a\x00"]),
    "priority": st.integers(-100, 100),
    "messageType": st.just("marketing"),
    "contentVariables": st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2),
}


@st.composite
def messages(draw: st.DrawFn) -> Any:
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(json_values)
    if shape <= 5:  # a good message, often aimed at t1's conversation: mostly queued
        body = {"phoneNumber": draw(st.sampled_from(["+14155550123", T1_PHONE])), "text": "hi"}
        for name in draw(st.lists(st.sampled_from(list(good)), unique=True, max_size=3)):
            body[name] = draw(good[name])
        if draw(st.booleans()):
            body["conversationId"] = draw(aimed_at_t1)
        return body
    body = {}
    for name in draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=len(FIELDS))):
        body[name] = draw(plausible[name] | json_values)
    if draw(st.booleans()):
        body.setdefault("phoneNumber", "+14155550123")
        body.setdefault("text", "hi")
    if draw(st.integers(0, 4)) == 0:
        body.update(draw(st.dictionaries(ANY_TEXT, json_values, min_size=1, max_size=2)))
    return body


def _dumps(value: Any) -> bytes:
    # ensure_ascii: lone surrogates become \ud800 escapes; NaN/Infinity stay as written.
    return json.dumps(value).encode()


T0_AUTH = f"Bearer {TOKENS['t0']}".encode()
header_bytes = st.binary(max_size=40) | st.text(string.printable, max_size=40).map(str.encode)
authorizations = st.sampled_from(
    [
        f"bearer   {TOKENS['t0']}  ".encode(),
        f"Bearer {ADMIN}".encode(),
        f"Basic {TOKENS['t0']}".encode(),
        f"Bearer {TOKENS['t0']}x".encode(),
        b"Bearer pgq_" + b"a" * 300,
        b"Bearer ",
        b"Bearer \xff\xfe",
        b"",
        None,
    ]
) | header_bytes.map(lambda b: b"Bearer " + b)
content_types = (
    st.sampled_from(
        [
            b"application/json",
            b"application/json; charset=utf-8",
            b"APPLICATION/JSON",
            b"application/problem+json",
            b"text/plain",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=x",
            b";",
            b"",
            None,
        ]
    )
    | header_bytes
)
query_keys = st.sampled_from(["state", "olderThan", "tenant"]) | ANY_TEXT
query_values = (
    st.sampled_from(
        ["failed", "completed", "", "t0", "t1", "7d", "0s", "-1d", "99999999999w", "2026-01-01"]
    )
    | ANY_TEXT
)


def _query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(
        quote(k.encode("utf-8", "surrogatepass")) + "=" + quote(v.encode("utf-8", "surrogatepass"))
        for k, v in pairs
    )


@st.composite
def requests(draw: st.DrawFn, t1_job: int) -> tuple[str, str, dict[bytes, bytes], bytes]:
    kind = draw(st.sampled_from(["send", "send", "send", "batch", "batch", "clean", "list", "job"]))
    headers: dict[bytes, bytes] = {}
    # Mostly t0's own token, so that parsing past authentication is what gets fuzzed.
    auth = T0_AUTH if draw(st.integers(0, 9)) < 7 else draw(authorizations)
    if auth is not None:
        headers[b"authorization"] = auth
    body = b""
    if kind in ("send", "batch"):
        path = "/api/whatsapp/send" if kind == "send" else "/api/whatsapp/send/batch"
        shape = draw(st.integers(0, 9))
        if shape == 0:
            body = draw(st.binary(max_size=200))
        elif kind == "send" or shape == 1:
            body = _dumps(draw(messages()))
        else:
            batch: Any = {"messages": draw(st.lists(messages(), max_size=4))}
            if shape == 2:
                batch = draw(json_values | st.just({"messages": []}) | st.just({"messages": {}}))
            body = _dumps(batch)
        if draw(st.integers(0, 7)) == 0:  # a broken body: cut short, or behind junk
            body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=4))
        content_type = b"application/json" if draw(st.integers(0, 3)) else draw(content_types)
        if content_type is not None:
            headers[b"content-type"] = content_type
        if draw(st.integers(0, 3)) == 0:
            headers[b"idempotency-key"] = draw(
                st.sampled_from([T1_IDEMPOTENCY.encode(), b"k"]) | header_bytes
            )
        if draw(st.integers(0, 9)) == 0:
            headers[b"content-length"] = draw(
                st.sampled_from([b"-1", b"abc", b"1e3", b"99999999999999999999", b"0", b" 5"])
            )
        return "POST", path, headers, body
    if kind == "job":
        segment = draw(
            st.just(str(t1_job))
            | st.sampled_from([f"{t1_job:020d}", f"+{t1_job}", f"{t1_job}.0", "0", str(2**63)])
            | st.text(max_size=12)
        )
        # Never the admin token here: the admin may cancel t1's job, which is no leak.
        if auth == f"Bearer {ADMIN}".encode():
            headers[b"authorization"] = T0_AUTH
        method, suffix = draw(st.sampled_from([("GET", ""), ("DELETE", ""), ("POST", "/retry")]))
        return method, f"/api/jobs/{quote(segment, safe='')}{suffix}", headers, body
    pairs = draw(st.lists(st.tuples(query_keys, query_values), max_size=4))
    if kind == "clean":
        method, path = "DELETE", "/api/jobs"
    else:
        method, path = draw(st.sampled_from([("GET", "/api/jobs"), ("GET", "/api/queue/metrics")]))
    query = _query(pairs)
    if draw(st.integers(0, 5)) == 0:  # percent-escaped bytes that are not UTF-8
        query += "&" + quote_from_bytes(draw(st.binary(max_size=8))) + "=%ff%fe"
    return method, f"{path}?{query}" if query else path, headers, body


class SyncClient:
    """httpx.ASGITransport driven from a sync test (Hypothesis' @given is sync), the app
    and its lifespan on one private event loop."""

    def __init__(self, runner: asyncio.Runner, client: httpx.AsyncClient) -> None:
        self.runner = runner
        self.client = client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.runner.run(self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@contextlib.contextmanager
def _sync_client(app: Any) -> Iterator[SyncClient]:
    with asyncio.Runner() as runner:
        stack = contextlib.AsyncExitStack()
        runner.run(stack.enter_async_context(app.router.lifespan_context(app)))
        client = runner.run(
            stack.enter_async_context(
                httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://testserver"
                )
            )
        )
        try:
            yield SyncClient(runner, client)
        finally:
            runner.run(stack.aclose())


def test_fuzzed_requests_never_fail_or_cross_tenants(db_url: str) -> None:
    _add_tenants(db_url)
    statuses: Counter[int] = Counter()
    aimed = [0]  # t0's queued messages that named t1's conversation, number or key
    with _sync_client(_app(db_url)) as client:
        t1 = {"Authorization": f"Bearer {TOKENS['t1']}"}
        first = client.post(
            "/api/whatsapp/send",
            json={
                "phoneNumber": T1_PHONE,
                "text": "t1's own",
                "conversationId": T1_CONVERSATION,
                "idempotencyKey": T1_IDEMPOTENCY,
            },
            headers=t1,
        )
        assert first.status_code == 202, first.text
        t1_job = first.json()["jobId"]
        assert first.json()["queuePosition"]["ahead"] == 0
        before = client.get(f"/api/jobs/{t1_job}", headers=t1).json()

        @given(request=requests(t1_job))
        @settings(
            max_examples=500,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def run(request: tuple[str, str, dict[bytes, bytes], bytes]) -> None:
            method, url, headers, body = request
            response = client.request(method, url, headers=headers, content=body)
            statuses[response.status_code] += 1
            if response.status_code == 202 and any(
                json.dumps(v).encode() in body for v in AIMED_AT_T1
            ):
                aimed[0] += 1
            where = f"{method} {url} {headers!r} {body[:200]!r}"
            assert response.status_code < 500, f"{response.status_code} for {where}"
            if response.status_code >= 400:
                assert response.headers["content-type"].startswith("application/json"), where
                assert "error" in response.json(), where
            path = url.split("?", 1)[0]
            if path in (f"/api/jobs/{t1_job}", f"/api/jobs/{t1_job}/retry"):
                # t1's job, asked for with t0's (or a fuzzed) token, is never found.
                assert response.status_code in (401, 404, 405), where
                if headers.get(b"authorization") == T0_AUTH:
                    assert response.status_code in (404, 405), where
            if 200 <= response.status_code < 300:
                shown = response.json()
                assert not isinstance(shown, dict) or shown.get("tenantId", "t0") == "t0", where
                assert t1_job not in _job_ids(shown), f"t1's job answered to {where}"

        run()

        after = client.get(f"/api/jobs/{t1_job}", headers=t1).json()
        assert after == before
        assert after["state"] == "waiting" and after["tenantId"] == "t1"
        second = client.post(
            "/api/whatsapp/send",
            json={"phoneNumber": T1_PHONE, "text": "again", "conversationId": T1_CONVERSATION},
            headers=t1,
        )
        # Only t1's own first job is ahead in t1's conversation.
        assert second.status_code == 202 and second.json()["queuePosition"]["ahead"] == 1
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT tenant_id, conversation, id, is_head FROM pgqueue.jobs "
            "WHERE tenant_id = 't1' OR conversation LIKE 't1:%' ORDER BY seq"
        ).fetchall()
    owners = _db_owners(db_url)
    assert rows == [
        ("t1", f"t1:{T1_CONVERSATION}", t1_job, True),
        ("t1", f"t1:{T1_CONVERSATION}", second.json()["jobId"], False),
    ]
    assert Counter(owners.values())["t1"] == 2
    print(
        f"\nfuzz: {statuses.total()} requests, {Counter(owners.values())['t0']} jobs queued "
        f"by t0 ({aimed[0]} of them aimed at t1's conversation or key); "
        f"statuses: {dict(sorted(statuses.items()))}"
    )
    assert statuses[202] >= 10 and aimed[0] >= 5, (statuses, aimed)
