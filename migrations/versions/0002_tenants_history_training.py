"""Tenants on decisions, imported outcome history, predictor training runs.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("tenant", sa.String(64), nullable=True))
        batch.create_index("ix_decisions_tenant", ["tenant"])
    op.create_table(
        "imported_outcomes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("source", sa.String(200), nullable=False),
        sa.Column("prompt_id", sa.String(200), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("dataset", sa.String(200), nullable=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("quality", sa.Float(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("source", "prompt_id", "model", name="uq_imported_outcome"),
    )
    op.create_index("ix_imported_outcomes_model", "imported_outcomes", ["model"])
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("samples_train", sa.Integer(), nullable=False),
        sa.Column("samples_validation", sa.Integer(), nullable=False),
        sa.Column("validation_loss", sa.Float(), nullable=True),
        sa.Column("current_validation_loss", sa.Float(), nullable=True),
        sa.Column("baseline_loss", sa.Float(), nullable=True),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
    )
    op.create_index("ix_training_runs_kind", "training_runs", ["kind"])


def downgrade() -> None:
    op.drop_index("ix_training_runs_kind", "training_runs")
    op.drop_table("training_runs")
    op.drop_index("ix_imported_outcomes_model", "imported_outcomes")
    op.drop_table("imported_outcomes")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_index("ix_decisions_tenant")
        batch.drop_column("tenant")
