"""Plans: the user type compute sessions are priced by (free, pro, enterprise, admin)."""

from __future__ import annotations

from alembic import op

revision = "0003_compute_user_type"
down_revision = "0002_rated_at"


def upgrade() -> None:
    op.execute("ALTER TABLE plans ADD COLUMN compute_user_type text")


def downgrade() -> None:
    op.execute("ALTER TABLE plans DROP COLUMN compute_user_type")
