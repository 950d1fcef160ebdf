"""api_tokens.expires_at: a token may be made to stop working at a set time

`pgqueue token create --expires-in-days N` sets it; NULL (every token made before) is a
token that works until revoked. The API refuses a token once `expires_at <= now()`.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable without a default: adding it rewrites nothing and locks the table only
    # for the catalog change.
    op.add_column(
        "api_tokens",
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        schema="pgqueue",
    )


def downgrade() -> None:
    op.drop_column("api_tokens", "expires_at", schema="pgqueue")
