"""Durable writes and reads of decisions, embeddings and feedback (blocking; call from a worker thread).

Every write commits before it returns, so whatever the API acknowledges is on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from router.errors import Conflict, NotFound
from router.tables import Decision, Preference, QueryEmbedding, Reward


@dataclass(frozen=True, slots=True)
class StoredFeedback:
    """A reward joined with its decision and the decision's embedding, for teaching policies."""

    reward_id: int
    decision: Decision
    vector: np.ndarray | None
    reward: float


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def insert_decision(self, decision: Decision, embedding: QueryEmbedding | None) -> None:
        with Session(self.engine) as session:
            if embedding is not None:
                session.add(embedding)
                session.flush()
            session.add(decision)
            session.commit()

    def finish_decision(self, decision_id: str, **fields: Any) -> None:
        with Session(self.engine) as session:
            decision = session.get(Decision, decision_id)
            if decision is None:
                raise NotFound(f"unknown decision_id {decision_id!r}")
            for name, value in fields.items():
                setattr(decision, name, value)
            session.add(decision)
            session.commit()

    def decision_with_vector(self, decision_id: str) -> tuple[Decision, np.ndarray | None]:
        with Session(self.engine) as session:
            row = session.execute(
                select(Decision, QueryEmbedding.vector)
                .outerjoin(QueryEmbedding, QueryEmbedding.id == Decision.embedding_id)
                .where(Decision.id == decision_id)
            ).first()
            if row is None:
                raise NotFound(f"unknown decision_id {decision_id!r}")
            session.expunge(row[0])
            return row[0], _vector(row[1])

    def record_reward(self, decision_id: str, reward: float) -> tuple[int, bool]:
        """Insert the reward once; the same value again is a no-op, another value is a conflict."""
        with Session(self.engine) as session:
            existing = session.execute(select(Reward).where(Reward.decision_id == decision_id)).scalars().first()
            if existing is None:
                row = Reward(decision_id=decision_id, reward=reward)
                session.add(row)
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
                    return self.record_reward(decision_id, reward)
                return int(row.id), False  # type: ignore[arg-type]
            if abs(existing.reward - reward) > 1e-12:
                raise Conflict(
                    f"decision {decision_id} already has reward {existing.reward}; rewards are recorded once"
                )
            return int(existing.id), True  # type: ignore[arg-type]

    def record_preference(self, decision_id: str, winner: str, loser: str) -> bool:
        """Insert the preference once; returns True when it was already recorded with the same pair."""
        with Session(self.engine) as session:
            existing = session.execute(select(Preference).where(Preference.decision_id == decision_id)).scalars().first()
            if existing is None:
                session.add(Preference(decision_id=decision_id, winner=winner, loser=loser))
                try:
                    session.commit()
                except IntegrityError:
                    session.rollback()
                    return self.record_preference(decision_id, winner, loser)
                return False
            if (existing.winner, existing.loser) != (winner, loser):
                raise Conflict(f"decision {decision_id} already has a preference {existing.winner} > {existing.loser}")
            return True

    def memory_rows(self, embedder: str, batch: int = 5000) -> Iterator[list[tuple[int, bytes, str, str, float | None]]]:
        """(memory id, vector, decision id, backend, reward) of every stored query, in batches."""
        query = (
            select(QueryEmbedding.id, QueryEmbedding.vector, Decision.id, Decision.backend, Reward.reward)
            .join(Decision, Decision.embedding_id == QueryEmbedding.id)
            .outerjoin(Reward, Reward.decision_id == Decision.id)
            .where(QueryEmbedding.embedder == embedder)
            .order_by(QueryEmbedding.id)
        )
        with self.engine.connect() as connection:
            result = connection.execution_options(yield_per=batch).execute(query)
            for partition in result.partitions(batch):
                yield [tuple(row) for row in partition]  # type: ignore[misc]

    def feedback_since(self, after_reward_id: int = 0) -> Iterator[StoredFeedback]:
        """Rewards in the order they were acknowledged, with what a policy needs to learn from them."""
        query = (
            select(Reward.id, Reward.reward, Decision, QueryEmbedding.vector)
            .join(Decision, Decision.id == Reward.decision_id)
            .outerjoin(QueryEmbedding, QueryEmbedding.id == Decision.embedding_id)
            .where(Reward.id > after_reward_id)
            .order_by(Reward.id)
        )
        with Session(self.engine) as session:
            for reward_id, reward, decision, vector in session.execute(query).yield_per(1000):
                yield StoredFeedback(int(reward_id), decision, _vector(vector), float(reward))

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Durable tallies from the log: per backend, and per policy and backend (who made the decision).

        Each entry: decisions, answers, errors, spend, mean cost and latency, rewards and their mean.
        """
        with Session(self.engine) as session:
            decisions = session.execute(
                select(
                    Decision.policy,
                    Decision.backend,
                    func.count(),
                    func.count().filter(Decision.status == "ok"),
                    func.count().filter(Decision.status == "error"),
                    func.coalesce(func.sum(Decision.cost_usd), 0.0),
                    func.count(Decision.cost_usd),
                    func.coalesce(func.sum(Decision.latency_ms), 0.0),
                    func.count(Decision.latency_ms),
                ).group_by(Decision.policy, Decision.backend)
            ).all()
            rewards = {
                (policy, backend): (count, total)
                for policy, backend, count, total in session.execute(
                    select(Decision.policy, Decision.backend, func.count(Reward.id), func.sum(Reward.reward))
                    .join(Reward, Reward.decision_id == Decision.id)
                    .group_by(Decision.policy, Decision.backend)
                ).all()
            }
        by_backend: dict[str, _Tally] = {}
        by_policy: dict[str, dict[str, _Tally]] = {}
        for policy, backend, *counts in decisions:
            tally = _Tally(*counts, *rewards.get((policy, backend), (0, 0.0)))
            by_backend.setdefault(backend, _Tally()).add(tally)
            by_policy.setdefault(policy, {})[backend] = tally
        return {
            "backends": {backend: t.view() for backend, t in by_backend.items()},
            "policies": {policy: {b: t.view() for b, t in backends.items()} for policy, backends in by_policy.items()},
        }


@dataclass
class _Tally:
    decisions: int = 0
    answered: int = 0
    errors: int = 0
    cost_sum: float = 0.0
    cost_count: int = 0
    latency_sum: float = 0.0
    latency_count: int = 0
    reward_count: int = 0
    reward_sum: float = 0.0

    def add(self, other: _Tally) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def view(self) -> dict[str, Any]:
        return {
            "decisions": self.decisions,
            "answered": self.answered,
            "errors": self.errors,
            "total_cost_usd": float(self.cost_sum),
            "mean_cost_usd": self.cost_sum / self.cost_count if self.cost_count else None,
            "mean_latency_ms": self.latency_sum / self.latency_count if self.latency_count else None,
            "rewards": self.reward_count,
            "mean_reward": float(self.reward_sum) / self.reward_count if self.reward_count else None,
        }


def _vector(blob: bytes | None) -> np.ndarray | None:
    return None if blob is None else np.frombuffer(blob, dtype=np.float32)
