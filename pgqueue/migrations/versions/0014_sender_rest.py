"""A tenant's sender can rest: tenants.paused_until

Twilio's 63018 (the business's messaging tier reached) and 21611 / 30001 (the sender's
queue at Twilio full) concern one WhatsApp sender: claims pass its tenant over until
paused_until, and it goes on by itself afterwards (queries.sql rest_tenant). The queue
and other tenants are not slowed.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


# pgqueue.apply_roles (migration 0011) grants the worker role UPDATE on the tenant
# columns it writes; it now writes paused_until too.
WORKER_COLUMNS = ("pause_reason, updated_at", "pause_reason, paused_until, updated_at")


def _regrant(old: str, new: str) -> None:
    op.execute(
        f"""
        DO $$
        DECLARE body text := pg_get_functiondef('pgqueue.apply_roles(boolean)'::regprocedure);
        BEGIN
            IF position('{old}' IN body) = 0 THEN
                RAISE EXCEPTION 'pgqueue.apply_roles does not grant %', '{old}';
            END IF;
            EXECUTE replace(body, '{old}', '{new}');
        END $$
        """
    )
    op.execute("SELECT pgqueue.apply_roles(false)")


def upgrade() -> None:
    op.add_column(
        "tenants", sa.Column("paused_until", sa.TIMESTAMP(timezone=True)), schema="pgqueue"
    )
    _regrant(*WORKER_COLUMNS)


def downgrade() -> None:
    _regrant(*reversed(WORKER_COLUMNS))
    op.drop_column("tenants", "paused_until", schema="pgqueue")
