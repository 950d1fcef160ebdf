"""Property-based run of the whole API against its own /openapi.json (schemathesis).

Valid and invalid requests for every operation, through the ASGI app on a real
PostgreSQL: no 5xx, every status code documented, every body matching its schema,
every schema-invalid request refused. Bounded to ~25 examples per operation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import load_all_checks
from schemathesis.generation.modes import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans

from pgqueue.admin import hash_token
from pgqueue.config import Settings
from pgqueue.db import make_pool
from pgqueue.http import create_app, openapi_spec
from tests.support.helpers import headers_made_invalid

ADMIN = "admin-token-for-schemathesis-0123"
TOKEN = "pgq_schemathesis_tenant_token_0123456789"

load_all_checks()
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi import checks as openapi_checks  # noqa: E402

CHECKS = [
    not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_headers_conformance,
    openapi_checks.response_schema_conformance,
    openapi_checks.negative_data_rejection,
    openapi_checks.unsupported_method,
]


@pytest.fixture
def api_schema(db_url: str) -> Iterator[Any]:
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgqueue.tenants (id, name, account_sid, auth_token, whatsapp_from) "
            "VALUES ('t0', 't0', %s, 'secret-token-t0', '+14155550100')",
            ("AC" + "0" * 32,),
        )
        conn.execute(
            "INSERT INTO pgqueue.api_tokens (tenant_id, token_hash, prefix) VALUES ('t0', %s, %s)",
            (hash_token(TOKEN), TOKEN[:12]),
        )
    # Not opened here: schemathesis runs the app on its own event loop, and the app's
    # lifespan opens (and closes) the pool there.
    pool = make_pool(db_url, min_size=1, max_size=4)
    app = create_app(Settings(admin_token=ADMIN), pool, db_timeout_s=2.0)
    try:
        yield schemathesis.openapi.from_asgi("/openapi.json", app)
    finally:
        shutdown_lifespans()


OPERATIONS = [
    (path, method.upper())
    for path, methods in openapi_spec()["paths"].items()
    for method in methods
]


def shorten_long_poll(case: Any) -> None:
    """A valid `wait` of the events feed holds the answer up to 30 s, longer than
    schemathesis waits for one (and Hypothesis replays a failing example dozens of times):
    keep it valid but short. The long poll itself is tests/db/test_events.py's."""
    query = case.query if isinstance(case.query, dict) else None
    wait = query.get("wait") if query else None
    with contextlib.suppress(TypeError, ValueError):
        if query is not None and wait is not None and 0 <= float(wait) <= 30:
            query["wait"] = min(float(wait), 0.2)


# Schemathesis' own pytest plugin does not run under pytest 9 (it reads a private
# attribute pytest removed), so each operation is driven through Hypothesis directly.
@pytest.mark.parametrize(("path", "method"), OPERATIONS, ids=[f"{m} {p}" for p, m in OPERATIONS])
def test_the_api_keeps_its_openapi_promises(api_schema: Any, path: str, method: str) -> None:
    operation = api_schema[path][method]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            shorten_long_poll(case)
            checks = list(CHECKS)
            if headers_made_invalid(case):
                # The valid token put on every request undoes a header made invalid on
                # purpose (one left out, say): the request is no longer negative.
                checks.remove(openapi_checks.negative_data_rejection)
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=checks)

        try:
            run()
        except Unsatisfiable:
            # Nothing to make invalid: an operation without parameters or body.
            assert mode is GenerationMode.NEGATIVE, f"no valid request for {method} {path}"
