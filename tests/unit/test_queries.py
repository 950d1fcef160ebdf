"""The statements of a dispatcher turn reach psycopg in a form it converts only once."""

from __future__ import annotations

import pytest
from psycopg import _queries

from pgqueue import queries

TURN = (
    "lock_queue",
    "complete_jobs",
    "promote_heads",
    "claim_jobs",
    "turn_end",
    "reslot",
)


@pytest.mark.parametrize("name", [n for n in TURN if n != "claim_jobs"])
def test_each_statement_of_a_turn_fits_psycopgs_conversion_cache(name: str) -> None:
    # psycopg caches the parsing of %(name)s placeholders only for statements up to this
    # length. claim_jobs, which also paces its jobs, is longer: parsing it costs the
    # worker about 30 us a turn, where pacing in a second statement cost the server 2 ms.
    limit = getattr(_queries, "MAX_CACHED_STATEMENT_LENGTH", 4096)
    assert len(queries.sql(name).encode()) <= limit, f"{name} is longer than {limit} bytes"


def test_statements_keep_no_comments_or_indentation() -> None:
    for name, text in queries.statements().items():
        for line in text.splitlines():
            assert line == line.strip(), f"{name}: indented line {line!r}"
            assert not line.startswith("--"), f"{name}: comment line {line!r}"
