"""Database tables (SQLModel). The schema itself is owned by the Alembic migrations in `migrations/`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, LargeBinary, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from router.config import PREDICTOR_KINDS


def utcnow() -> datetime:
    return datetime.now(UTC)


class QueryEmbedding(SQLModel, table=True):
    """A routed query's embedding; its id is the query's id in the FAISS memory."""

    __tablename__ = "query_embeddings"

    id: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    embedder: str = Field(max_length=200, index=True)
    dim: int
    vector: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class DecisionRow(SQLModel, table=True):
    """A logged decision. `chosen_backend` is the policy's pick (its probability is `propensity`);
    `backend` is the backend that answered, another one after a failover."""

    __tablename__ = "decisions"

    id: str = Field(primary_key=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=DateTime(timezone=True))
    kind: str = Field(max_length=16, description="chat | route")
    tenant: str | None = Field(default=None, max_length=64, index=True, description="API key name; None when open.")
    requested_model: str = Field(max_length=200)
    query: str = Field(sa_column=Column(Text, nullable=False))
    prompt_tokens_estimate: int
    embedding_id: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    policy: str = Field(max_length=64, index=True)
    backend: str = Field(max_length=64, index=True)
    chosen_backend: str | None = Field(default=None, max_length=64)
    propensity: float
    scores: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    candidates: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    neighbours: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    shadow: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    cost_weight: float = 0.0
    cost_scale: float = 1.0
    predicted_cost_usd: float | None = None
    max_cost_usd: float | None = None
    over_budget: bool = False
    decision_ms: float
    status: str = Field(max_length=16, default="routed", description="routed | ok | error | rejected (the backend refused the request as the client's fault)")
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    failed_backends: list[Any] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    mode: str = Field(default="route", max_length=16, description="route | cascade | parallel | fuse | refine | s2p")
    answer: str | None = Field(default=None, sa_column=Column(Text, nullable=True), description="Delivered answer, when stored.")
    # The shared log (PostgreSQL): positions in one sequence, assigned in commit order (see router.store).
    seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True, index=True), description="Log position of the decision.")
    finish_seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True, index=True), description="Log position of its outcome.")
    replica: str | None = Field(default=None, max_length=64, description="Replica that made the decision.")


class DecisionCall(SQLModel, table=True):
    """One backend call made for a decision: several in the answer-aware modes, each with its role."""

    __tablename__ = "decision_calls"
    __table_args__ = (UniqueConstraint("decision_id", "position", name="uq_decision_call"),)

    id: int | None = Field(default=None, primary_key=True)
    decision_id: str = Field(foreign_key="decisions.id", max_length=64, index=True)
    position: int
    role: str = Field(max_length=16, description="answer | draft | candidate | verify | refine | fuse")
    backend: str = Field(max_length=64)
    status: str = Field(max_length=16, description="ok | error")
    delivered: bool = False
    score: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    answer: str | None = Field(default=None, sa_column=Column(Text, nullable=True), description="Stored only when answers are kept.")


class Reward(SQLModel, table=True):
    __tablename__ = "rewards"

    id: int | None = Field(default=None, primary_key=True)
    decision_id: str = Field(foreign_key="decisions.id", unique=True, max_length=64)
    reward: float
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True, index=True), description="Log position.")
    replica: str | None = Field(default=None, max_length=64, description="Replica that recorded it.")


class Preference(SQLModel, table=True):
    """Pairwise feedback: for the query of `decision_id`, `winner` answered better than `loser`."""

    __tablename__ = "preferences"

    id: int | None = Field(default=None, primary_key=True)
    decision_id: str = Field(foreign_key="decisions.id", unique=True, max_length=64)
    winner: str = Field(max_length=64)
    loser: str = Field(max_length=64)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True, index=True), description="Log position.")
    replica: str | None = Field(default=None, max_length=64, description="Replica that recorded it.")


class PolicySnapshot(SQLModel, table=True):
    """A policy's serialised state; rewards logged after `last_reward_id` are replayed on top of it."""

    __tablename__ = "policy_snapshots"

    id: int | None = Field(default=None, primary_key=True)
    policy: str = Field(max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    last_reward_id: int = 0
    last_preference_id: int = 0
    last_seq: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True), description="Log position it includes (PostgreSQL).")
    state: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))


class ImportedOutcome(SQLModel, table=True):
    """One model's recorded result on one prompt, imported from a file in the shared data format.

    History for the predictors: unlike logged decisions, it holds every model's outcome per prompt.
    """

    __tablename__ = "imported_outcomes"
    __table_args__ = (UniqueConstraint("source", "prompt_id", "model", name="uq_imported_outcome"),)

    id: int | None = Field(default=None, primary_key=True)
    source: str = Field(max_length=200, description="File name it came from.")
    prompt_id: str = Field(max_length=200)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    dataset: str | None = Field(default=None, max_length=200)
    model: str = Field(max_length=200, index=True)
    quality: float
    output_tokens: int | None = None
    cost_usd: float | None = None
    answer: str | None = Field(default=None, sa_column=Column(Text, nullable=True), description="The model's answer text, if the file had one.")
    imported_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))


class TrainingRun(SQLModel, table=True):
    """One predictor training job: what it saw, how it scored, and whether it replaced the model in use."""

    __tablename__ = "training_runs"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16, index=True, description=" | ".join(PREDICTOR_KINDS))
    trigger: str = Field(max_length=16, description="schedule | cli | replay")
    started_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True))
    duration_s: float | None = None
    status: str = Field(max_length=16, description="ok | failed | skipped")
    samples_train: int = 0
    samples_validation: int = 0
    validation_loss: float | None = None
    current_validation_loss: float | None = Field(default=None, description="The model in use, on the same split.")
    baseline_loss: float | None = None
    promoted: bool = False
    version: str | None = Field(default=None, max_length=64)
    error: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    details: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class Spend(SQLModel, table=True):
    """Money held in the database (several replicas): one row per key and budget period (`key:<name>`), and
    one for the pacing target (`pacing`). `reserved_usd` is the sum of the holds of calls still running."""

    __tablename__ = "spend"

    scope: str = Field(primary_key=True, max_length=80)
    period_start: datetime = Field(primary_key=True, sa_type=DateTime(timezone=True))
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    settled: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"), description="Answers counted.")
    balance_usd: float = Field(default=0.0, description="Hourly pacing target: unspent budget at balance_at.")
    balance_at: float | None = Field(default=None, description="Unix seconds (the database's clock).")


class SpendHold(SQLModel, table=True):
    """A running call's reservation against a spend row, released once: settled with the real cost, or
    released when its replica restarts or after `cluster.orphan_after_s`."""

    __tablename__ = "spend_holds"

    decision_id: str = Field(primary_key=True, max_length=64)
    scope: str = Field(primary_key=True, max_length=80)
    period_start: datetime = Field(sa_type=DateTime(timezone=True))
    usd: float
    replica: str | None = Field(default=None, max_length=64, index=True)
    created_at: datetime = Field(default_factory=utcnow, sa_type=DateTime(timezone=True), index=True)


class RateBucket(SQLModel, table=True):
    """A key's token bucket shared by every replica (`requests_per_minute`, `burst`)."""

    __tablename__ = "rate_buckets"

    name: str = Field(primary_key=True, max_length=64)
    tokens: float
    updated_at: float = Field(description="Unix seconds (the database's clock).")
