"""Decisions keep the backend the policy chose apart from the one that answered (after a failover).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("chosen_backend", sa.String(64), nullable=True))
    op.execute("UPDATE decisions SET chosen_backend = backend")


def downgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("chosen_backend")
