"""Names for the SQL pieces the statements repeated

- pgqueue.lock_key(queue, conversation): the bigint key of a conversation's advisory
  lock (claims take it, the rescuer and retake_locks look for it);
- pgqueue.channel(queue): the NOTIFY/LISTEN channel of a queue's workers;
- pgqueue.counter_shard(): which of the 16 rows of a tenant's in-flight counter a
  session adds to (spread by backend, so concurrent writers rarely meet on one row);
- pgqueue.failed_rank() and pgqueue.delivered_rank(): the ranks of
  pgqueue.provider_status_rank that end a message in failure and that record a delivery.

Each is a one-line SQL function the planner inlines (IMMUTABLE or STABLE, no SET), so
the statements cost what they cost before.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

FUNCTIONS = {
    "lock_key(queue text, conversation text)": (
        "bigint",
        "IMMUTABLE",
        "SELECT hashtextextended(queue || chr(31) || conversation, 0)",
    ),
    "channel(queue text)": ("text", "IMMUTABLE", "SELECT 'pgqueue_' || queue"),
    "counter_shard()": ("integer", "STABLE", "SELECT pg_backend_pid() % 16"),
    "failed_rank()": ("integer", "IMMUTABLE", "SELECT 9"),
    "delivered_rank()": ("integer", "IMMUTABLE", "SELECT 5"),
}


def upgrade() -> None:
    for signature, (returns, volatility, body) in FUNCTIONS.items():
        op.execute(
            f"CREATE FUNCTION pgqueue.{signature} RETURNS {returns} "
            f"LANGUAGE sql {volatility} PARALLEL SAFE AS $$ {body} $$"
        )


def downgrade() -> None:
    for signature in FUNCTIONS:
        name, args = signature.split("(", 1)
        types = ", ".join(a.split()[-1] for a in args.rstrip(")").split(",") if a.strip())
        op.execute(f"DROP FUNCTION pgqueue.{name}({types})")
