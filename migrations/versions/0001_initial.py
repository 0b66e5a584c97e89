"""Initial schema: decisions, query embeddings, rewards, preferences, policy snapshots.

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "query_embeddings",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("embedder", sa.String(200), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_query_embeddings_embedder", "query_embeddings", ["embedder"])
    op.create_table(
        "decisions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("requested_model", sa.String(200), nullable=False),
        sa.Column("query", sa.Text(), nullable=False),
        sa.Column("prompt_tokens_estimate", sa.Integer(), nullable=False),
        sa.Column("embedding_id", sa.BigInteger(), nullable=True),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("backend", sa.String(64), nullable=False),
        sa.Column("propensity", sa.Float(), nullable=False),
        sa.Column("scores", sa.JSON(), nullable=False),
        sa.Column("candidates", sa.JSON(), nullable=False),
        sa.Column("neighbours", sa.JSON(), nullable=False),
        sa.Column("shadow", sa.JSON(), nullable=False),
        sa.Column("cost_weight", sa.Float(), nullable=False),
        sa.Column("cost_scale", sa.Float(), nullable=False),
        sa.Column("predicted_cost_usd", sa.Float(), nullable=True),
        sa.Column("max_cost_usd", sa.Float(), nullable=True),
        sa.Column("over_budget", sa.Boolean(), nullable=False),
        sa.Column("decision_ms", sa.Float(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("failed_backends", sa.JSON(), nullable=False),
        sa.Column("prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("completion_tokens", sa.Integer(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("latency_ms", sa.Float(), nullable=True),
    )
    op.create_index("ix_decisions_created_at", "decisions", ["created_at"])
    op.create_index("ix_decisions_policy", "decisions", ["policy"])
    op.create_index("ix_decisions_backend", "decisions", ["backend"])
    op.create_table(
        "rewards",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.String(64), sa.ForeignKey("decisions.id"), nullable=False, unique=True),
        sa.Column("reward", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "preferences",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("decision_id", sa.String(64), sa.ForeignKey("decisions.id"), nullable=False, unique=True),
        sa.Column("winner", sa.String(64), nullable=False),
        sa.Column("loser", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "policy_snapshots",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("policy", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_reward_id", sa.Integer(), nullable=False),
        sa.Column("last_preference_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.JSON(), nullable=False),
    )
    op.create_index("ix_policy_snapshots_policy", "policy_snapshots", ["policy"])


def downgrade() -> None:
    op.drop_table("policy_snapshots")
    op.drop_table("preferences")
    op.drop_table("rewards")
    op.drop_table("decisions")
    op.drop_table("query_embeddings")
