"""Plan history (an account's plan changes with the time each takes effect) and credits (charges
may be negative: a correction of a period's rounded total, docs/PRICING.md)."""

from __future__ import annotations

from alembic import op

revision = "0004_plan_history_and_credits"
down_revision = "0003_compute_user_type"


def upgrade() -> None:
    op.execute("""
    -- accounts.plan is the plan an account has had since ever; each row here replaces it from
    -- effective_from on (until the next row). A NULL plan: no plan (the default book, no tier).
    CREATE TABLE plan_changes (
        account_id      text NOT NULL REFERENCES accounts (account_id),
        plan            text REFERENCES plans (name),
        effective_from  timestamptz NOT NULL
            CHECK (effective_from = date_trunc('second', effective_from)),
        recorded_at     timestamptz NOT NULL DEFAULT now(),
        actor           text NOT NULL DEFAULT 'operator',
        PRIMARY KEY (account_id, effective_from)
    );
    -- A charge corrects its period's rounded total: it may be a credit (negative), and so may the
    -- platform fee split off it.
    ALTER TABLE charges DROP CONSTRAINT charges_amount_base_units_check;
    ALTER TABLE charges DROP CONSTRAINT charges_platform_fee_base_units_check;
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE plan_changes;
    ALTER TABLE charges ADD CONSTRAINT charges_amount_base_units_check CHECK (amount_base_units >= 0);
    ALTER TABLE charges ADD CONSTRAINT charges_platform_fee_base_units_check
        CHECK (platform_fee_base_units >= 0);
    """)
