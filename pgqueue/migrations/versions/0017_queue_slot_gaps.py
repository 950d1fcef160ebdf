"""The queue's rate slots fill the gaps between those already handed out

pgqueue.pace gave every claim's slots after the queue's last one (rate_tat), so a
sender with a rate of its own whose slot was near now waited behind the later slots an
earlier claim had given other senders (up to the lookahead): a third of what the 50/s
senders of bench/senders.py lost. Any set of slots a spacing apart holds the queue's rate
(G4) exactly as a sequence does, so a claim may now give a slot between two booked ones:

- queues.rate_booked: the slots handed out that are still to come, in order;
- queues.rate_floor: no slot before it (a provider's 429; rate_tat is pushed too);
- pgqueue.pace_free: pace's starts, each at the earliest moment a spacing away from
  every booked slot and every slot given before it in the same call.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

TZ = sa.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.add_column(
        "queues",
        sa.Column(
            "rate_booked",
            postgresql.ARRAY(TZ),
            nullable=False,
            server_default=sa.text("'{}'::timestamptz[]"),
        ),
        schema="pgqueue",
    )
    op.add_column("queues", sa.Column("rate_floor", TZ), schema="pgqueue")
    op.execute(
        """
        CREATE FUNCTION pgqueue.pace_free(first_start timestamptz, spacing float8,
                                          booked timestamptz[], prev integer[],
                                          tenant_base timestamptz[],
                                          tenant_spacing float8[])
        RETURNS timestamptz[]
        LANGUAGE plpgsql IMMUTABLE AS $$
        -- The start of each job, in the order given: the earliest moment from
        -- `first_start` on that is at least `spacing` away from every slot of `booked`
        -- (in order) and from the starts given before it here (the queue's rate: any two
        -- starts a spacing apart, so no window holds more than its rate), and, for a job
        -- whose tenant has a rate of its own, not before its tenant's base or one
        -- `tenant_spacing` after that tenant's previous job (`prev`, its position here).
        DECLARE
            starts timestamptz[] := '{}';
            taken timestamptz[] := coalesce(booked, '{}');
            gap interval := make_interval(secs => spacing);
            x timestamptz;
            n integer;
            pos integer;
        BEGIN
            FOR i IN 1 .. coalesce(cardinality(tenant_base), 0) LOOP
                x := greatest(first_start,
                              CASE WHEN prev[i] IS NULL THEN tenant_base[i]
                                   ELSE starts[prev[i]]
                                        + make_interval(secs => tenant_spacing[i]) END);
                n := coalesce(cardinality(taken), 0);
                pos := n + 1;
                FOR k IN 1 .. n LOOP
                    CONTINUE WHEN taken[k] <= x - gap;
                    IF taken[k] < x + gap THEN
                        x := taken[k] + gap;  -- past it; the later ones follow in order
                        CONTINUE;
                    END IF;
                    pos := k;
                    EXIT;
                END LOOP;
                starts[i] := x;
                taken := taken[1:pos - 1] || x || taken[pos:n];
            END LOOP;
            RETURN starts;
        END $$
        """
    )


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION pgqueue.pace_free(timestamptz, float8, timestamptz[], integer[], "
        "timestamptz[], float8[])"
    )
    op.drop_column("queues", "rate_floor", schema="pgqueue")
    op.drop_column("queues", "rate_booked", schema="pgqueue")
