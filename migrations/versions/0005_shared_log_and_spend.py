"""Several replicas on one PostgreSQL: log positions on decisions, outcomes, rewards and preferences (one
sequence, assigned in commit order), the log position a snapshot includes, the replica that wrote a
decision, a reward or a preference, and money and rate limits held in the database (spend rows, holds of running calls, token
buckets).

On PostgreSQL the rows already logged get positions in the order the router has always replayed them
(by time; a decision before its outcome), so a database that served one process can serve several.
SQLite keeps the columns empty: it serves one process.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SEQUENCE = "router_log_seq"


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    with op.batch_alter_table("decisions") as batch:
        batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("finish_seq", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("replica", sa.String(64), nullable=True))
    for table in ("rewards", "preferences"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
            batch.add_column(sa.Column("replica", sa.String(64), nullable=True))
    with op.batch_alter_table("policy_snapshots") as batch:
        batch.add_column(sa.Column("last_seq", sa.BigInteger(), nullable=True))
    op.create_table(
        "spend",
        sa.Column("scope", sa.String(80), primary_key=True),
        sa.Column("period_start", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("spent_usd", sa.Float(), nullable=False, server_default="0"),
        sa.Column("reserved_usd", sa.Float(), nullable=False, server_default="0"),
        sa.Column("settled", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("balance_usd", sa.Float(), nullable=False, server_default="0"),
        sa.Column("balance_at", sa.Float(), nullable=True),
    )
    op.create_table(
        "spend_holds",
        sa.Column("decision_id", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(80), primary_key=True),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("usd", sa.Float(), nullable=False),
        sa.Column("replica", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_spend_holds_replica", "spend_holds", ["replica"])
    op.create_index("ix_spend_holds_created_at", "spend_holds", ["created_at"])
    op.create_table(
        "rate_buckets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    if postgres:
        op.execute(f"CREATE SEQUENCE {SEQUENCE}")
        # Rows logged before: positions in the order restarts have always replayed them.
        op.execute(f"""
            WITH events AS (
                SELECT 'd' AS kind, id AS ref, created_at AS at, 0 AS rank FROM decisions
                UNION ALL SELECT 'f', id, created_at, 1 FROM decisions WHERE kind = 'chat' AND status <> 'routed'
                UNION ALL SELECT 'r', CAST(id AS TEXT), created_at, 2 FROM rewards
                UNION ALL SELECT 'p', CAST(id AS TEXT), created_at, 3 FROM preferences
            ), numbered AS (
                SELECT kind, ref, row_number() OVER (ORDER BY at, rank, ref) AS position FROM events
            ), d AS (
                UPDATE decisions SET seq = n.position FROM numbered n WHERE n.kind = 'd' AND n.ref = decisions.id
            ), f AS (
                UPDATE decisions SET finish_seq = n.position FROM numbered n WHERE n.kind = 'f' AND n.ref = decisions.id
            ), r AS (
                UPDATE rewards SET seq = n.position FROM numbered n WHERE n.kind = 'r' AND n.ref = CAST(rewards.id AS TEXT)
            ), p AS (
                UPDATE preferences SET seq = n.position FROM numbered n WHERE n.kind = 'p' AND n.ref = CAST(preferences.id AS TEXT)
            )
            SELECT setval('{SEQUENCE}', GREATEST((SELECT count(*) FROM numbered), 1))
        """)
    if postgres:  # chat decisions not answered yet (few at any time): what a replica that died leaves behind
        op.create_index("ix_decisions_unanswered", "decisions", ["replica", "created_at"],
                        postgresql_where=sa.text("status = 'routed' AND kind = 'chat'"))
    op.create_index("ix_decisions_seq", "decisions", ["seq"])
    op.create_index("ix_decisions_finish_seq", "decisions", ["finish_seq"])
    op.create_index("ix_rewards_seq", "rewards", ["seq"])
    op.create_index("ix_preferences_seq", "preferences", ["seq"])


def downgrade() -> None:
    for index, table in (("ix_preferences_seq", "preferences"), ("ix_rewards_seq", "rewards"), ("ix_decisions_finish_seq", "decisions"),
                         ("ix_decisions_seq", "decisions")):
        op.drop_index(index, table)
    if op.get_bind().dialect.name == "postgresql":
        op.drop_index("ix_decisions_unanswered", "decisions")
    op.drop_table("rate_buckets")
    op.drop_index("ix_spend_holds_created_at", "spend_holds")
    op.drop_index("ix_spend_holds_replica", "spend_holds")
    op.drop_table("spend_holds")
    op.drop_table("spend")
    with op.batch_alter_table("policy_snapshots") as batch:
        batch.drop_column("last_seq")
    for table in ("preferences", "rewards"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("replica")
            batch.drop_column("seq")
    with op.batch_alter_table("decisions") as batch:
        batch.drop_column("replica")
        batch.drop_column("finish_seq")
        batch.drop_column("seq")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP SEQUENCE IF EXISTS {SEQUENCE}")
