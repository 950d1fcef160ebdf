"""Fixtures of the reliability suite. Most scenarios run on the session's server (a fresh
migrated database per test, `db_url`); the database-restart scenario gets a PostgreSQL of
its own, since it must never restart a server it did not start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.harness import PrivateServer


@pytest.fixture
def private_server(tmp_path: Path) -> Iterator[PrivateServer]:
    # Not under tmp_path: pytest's basetemp paths can be too long for a unix socket.
    server = PrivateServer()
    try:
        yield server
    finally:
        server.cleanup()
