"""Charges: when the meter rated them (window close), beside when the ledger recorded them."""

from __future__ import annotations

from alembic import op

revision = "0002_rated_at"
down_revision = "0001_ledger"


def upgrade() -> None:
    op.execute("ALTER TABLE charges ADD COLUMN rated_at timestamptz")


def downgrade() -> None:
    op.execute("ALTER TABLE charges DROP COLUMN rated_at")
