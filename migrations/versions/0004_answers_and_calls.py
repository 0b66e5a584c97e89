"""Answer-aware modes: each backend call of a decision, the delivered answer (when configured), and
answers in imported history (for the answer scorer).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("mode", sa.String(16), nullable=False, server_default="route"))
        batch.add_column(sa.Column("answer", sa.Text(), nullable=True))
    with op.batch_alter_table("imported_outcomes") as batch:
        batch.add_column(sa.Column("answer", sa.Text(), nullable=True))
    op.create_table(
        "decision_calls",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("decision_id", sa.String(64), sa.ForeignKey("decisions.id"), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("delivered", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.UniqueConstraint("decision_id", "position", name="uq_decision_call"),
    )
    op.create_index("ix_decision_calls_decision_id", "decision_calls", ["decision_id"])


def downgrade() -> None:
    op.drop_index("ix_decision_calls_decision_id", "decision_calls")
    op.drop_table("decision_calls")
    with op.batch_alter_table("imported_outcomes") as batch:
        batch.drop_column("answer")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("answer")
        batch.drop_column("mode")
