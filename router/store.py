"""Durable writes and reads of decisions, embeddings and feedback (blocking; call from a worker thread).

The store owns the rows: decisions go in as the engine's `DecisionRecord` (with what the service knows
of the request) and come out as `StoredDecision`, so no other module builds or reads ORM objects, and
vectors are decoded in one place. Every write commits before it returns, so whatever the API
acknowledges is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, delete, func, select, update
from sqlmodel import Session

from router.engine import DecisionRecord
from router.errors import Conflict, NotFound
from router.memory import MemoryEntry
from router.modes import Call
from router.tables import DecisionCall, DecisionRow, PolicySnapshot, Preference, QueryEmbedding, Reward

log = logging.getLogger("llm_router")


@dataclass(frozen=True, slots=True)
class NewDecision:
    """A decision to log: the engine's record and what the service knows of the request."""

    record: DecisionRecord
    kind: str  # chat | route
    tenant: str | None
    requested_model: str
    query: str
    decision_ms: float
    memory_id: int  # the query's id in the FAISS memory and in query_embeddings
    embedder: str
    vector: np.ndarray


@dataclass(frozen=True, slots=True)
class Finish:
    """How a chat decision ended: answered (`ok`, delivered by `backend`) or not (`error`). `calls`: every
    backend call of an answer-aware mode; `answer`: the delivered text, only when answers are kept."""

    status: str
    failed_backends: list[dict[str, Any]]
    backend: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    answer: str | None = None
    calls: tuple[Call, ...] = ()


@dataclass(frozen=True, slots=True)
class StoredDecision:
    """A logged decision as the service learns from it."""

    record: DecisionRecord
    tenant: str | None
    status: str  # routed | ok | error
    error: str | None
    cost_usd: float | None
    latency_ms: float | None

    @property
    def cost_for_learning(self) -> float:
        """The real cost where the answer came back, else the predicted one (a routed-only decision)."""
        return self.cost_usd if self.cost_usd is not None else self.record.predicted_cost_usd


@dataclass(frozen=True, slots=True)
class StoredFeedback:
    """A reward or a preference joined with its decision and the decision's embedding."""

    feedback_id: int
    created_at: datetime
    decision: StoredDecision
    vector: np.ndarray | None
    reward: float | None = None
    preference: tuple[str, str] | None = None


def _stored(row: DecisionRow) -> StoredDecision:
    record = DecisionRecord.from_columns(
        row.id, row.policy, row.chosen_backend or row.backend, row.backend if row.status == "ok" else None, row.propensity,
        row.prompt_tokens_estimate,
        {"candidates": row.candidates, "neighbours": row.neighbours, "cost_weight": row.cost_weight, "cost_scale": row.cost_scale,
         "shadow": row.shadow},
    )
    record.mode = row.mode
    return StoredDecision(record, row.tenant, row.status, row.error, row.cost_usd, row.latency_ms)


def add_decision(session: Session, new: NewDecision) -> None:
    record = new.record
    session.add(QueryEmbedding(id=new.memory_id, embedder=new.embedder, dim=len(new.vector), vector=new.vector.astype(np.float32).tobytes()))
    session.flush()
    session.add(DecisionRow(
        id=record.decision_id, kind=new.kind, tenant=new.tenant, requested_model=new.requested_model, query=new.query,
        prompt_tokens_estimate=record.prompt_tokens, embedding_id=new.memory_id, policy=record.policy,
        backend=record.chosen, chosen_backend=record.chosen, propensity=record.propensity, scores=record.scores,
        predicted_cost_usd=record.predicted_cost_usd, max_cost_usd=record.max_cost_usd, over_budget=record.over_budget,
        decision_ms=new.decision_ms, mode=record.mode, **record.columns(),
    ))
    session.flush()


def finish_decision(session: Session, decision_id: str, finish: Finish) -> None:
    row = session.get(DecisionRow, decision_id)
    if row is None:
        raise NotFound(f"unknown decision_id {decision_id!r}")
    for name in finish.__slots__:
        value = getattr(finish, name)
        if name != "calls" and (value is not None or name != "backend"):
            setattr(row, name, value)
    for call in finish.calls:
        session.add(DecisionCall(
            decision_id=decision_id, position=call.position, role=call.role, backend=call.backend, status=call.status,
            delivered=call.delivered, score=call.score, prompt_tokens=call.prompt_tokens, completion_tokens=call.completion_tokens,
            cost_usd=call.cost_usd, latency_ms=call.latency_ms, error=call.error, answer=call.answer,
        ))
    session.flush()


def purge_answers(session: Session, before: datetime) -> int:
    """Erase the answer texts of decisions made before `before` (the retention period); returns how many."""
    old = select(DecisionRow.id).where(DecisionRow.created_at < before)
    session.execute(update(DecisionCall).where(DecisionCall.decision_id.in_(old), DecisionCall.answer.is_not(None)).values(answer=None))
    result = session.execute(update(DecisionRow).where(DecisionRow.created_at < before, DecisionRow.answer.is_not(None)).values(answer=None))
    return int(result.rowcount or 0)


def load_decision(session: Session, decision_id: str) -> tuple[StoredDecision, np.ndarray | None]:
    row = session.execute(
        select(DecisionRow, QueryEmbedding.vector)
        .outerjoin(QueryEmbedding, QueryEmbedding.id == DecisionRow.embedding_id)
        .where(DecisionRow.id == decision_id)
    ).first()
    if row is None:
        raise NotFound(f"unknown decision_id {decision_id!r}")
    return _stored(row[0]), _vector(row[1])


def add_reward(session: Session, decision_id: str, reward: float) -> tuple[int, bool]:
    """Insert the reward once; the same value again is a no-op (True), another value is a conflict."""
    existing = session.execute(select(Reward).where(Reward.decision_id == decision_id)).scalars().first()
    if existing is None:
        row = Reward(decision_id=decision_id, reward=reward)
        session.add(row)
        session.flush()
        return int(row.id), False  # type: ignore[arg-type]
    if abs(existing.reward - reward) > 1e-12:
        raise Conflict(f"decision {decision_id} already has reward {existing.reward}; rewards are recorded once")
    return int(existing.id), True  # type: ignore[arg-type]


def add_preference(session: Session, decision_id: str, winner: str, loser: str) -> tuple[int, bool]:
    """Insert the preference once; the same pair again is a no-op (True), another pair is a conflict."""
    existing = session.execute(select(Preference).where(Preference.decision_id == decision_id)).scalars().first()
    if existing is None:
        row = Preference(decision_id=decision_id, winner=winner, loser=loser)
        session.add(row)
        session.flush()
        return int(row.id), False  # type: ignore[arg-type]
    if (existing.winner, existing.loser) != (winner, loser):
        raise Conflict(f"decision {decision_id} already has a preference {existing.winner} > {existing.loser}")
    return int(existing.id), True  # type: ignore[arg-type]


def write_snapshot(session: Session, states: dict[str, dict[str, Any]], last_reward_id: int, last_preference_id: int, keep: int = 3) -> None:
    """One row per policy (and one for the router), then drop all but the newest `keep` of each."""
    for name, state in states.items():
        session.add(PolicySnapshot(policy=name, state=state, last_reward_id=last_reward_id, last_preference_id=last_preference_id))
    session.flush()
    for name in states:
        stale = session.execute(
            select(PolicySnapshot.id).where(PolicySnapshot.policy == name).order_by(PolicySnapshot.id.desc()).offset(keep)
        ).scalars().all()
        if stale:
            session.execute(delete(PolicySnapshot).where(PolicySnapshot.id.in_(stale)))


@dataclass
class _Job:
    work: Callable[[Session], Any]
    after: Callable[[Any], None] | None
    future: asyncio.Future[Any]


class GroupWriter:
    """Durable writes with group commit: the writes that arrive while a commit runs share the next one.

    Each write runs in its own savepoint, so one that fails (unknown id, conflict) fails alone. A caller
    is answered only after the transaction holding its write has committed, and its `after` callback
    (e.g. learning from the reward) runs on the event loop right after that commit, before any other
    coroutine, so state derived from the log never lags what the log acknowledged.
    """

    def __init__(self, engine: Engine, max_batch: int = 512) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, work: Callable[[Session], Any], after: Callable[[Any], None] | None = None) -> Any:
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(work, after, future))  # type: ignore[union-attr]
        return await asyncio.shield(future)

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        while True:
            jobs = [await queue.get()]
            while not queue.empty() and len(jobs) < self.max_batch:
                jobs.append(queue.get_nowait())
            try:
                outcomes = await asyncio.to_thread(self._commit, jobs)
            except Exception as exc:  # the commit itself failed: nobody in it is acknowledged
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, (ok, value) in zip(jobs, outcomes):
                if ok and job.after is not None:
                    try:
                        job.after(value)
                    except Exception:  # committed all the same: the caller is answered, the writer goes on
                        log.exception("after-commit callback failed")
                if not job.future.done():
                    (job.future.set_result if ok else job.future.set_exception)(value)

    def _commit(self, jobs: list[_Job]) -> list[tuple[bool, Any]]:
        outcomes: list[tuple[bool, Any]] = []
        with Session(self.engine, expire_on_commit=False) as session:
            for job in jobs:
                try:
                    with session.begin_nested():
                        outcomes.append((True, job.work(session)))
                except Exception as exc:  # noqa: BLE001 - delivered to that job's caller
                    outcomes.append((False, exc))
            session.commit()
        return outcomes

    async def close(self) -> None:
        """Finish what was submitted, then stop."""
        if self._task is None:
            return
        while self._queue is not None and not self._queue.empty():
            await asyncio.sleep(0.005)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None


class Store:
    """Reads (every write goes through `GroupWriter`, so SQLite has a single writer)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def memory_rows(self, embedder: str, batch: int = 5000) -> Iterator[tuple[np.ndarray, np.ndarray, list[MemoryEntry]]]:
        """(memory ids, vectors, entries) of every stored query, in batches."""
        query = (
            select(
                QueryEmbedding.id, QueryEmbedding.vector, DecisionRow.id, DecisionRow.backend, Reward.reward,
                Preference.winner, Preference.loser, DecisionRow.completion_tokens,
            )
            .join(DecisionRow, DecisionRow.embedding_id == QueryEmbedding.id)
            .outerjoin(Reward, Reward.decision_id == DecisionRow.id)
            .outerjoin(Preference, Preference.decision_id == DecisionRow.id)
            .where(QueryEmbedding.embedder == embedder)
            .order_by(QueryEmbedding.id)
        )
        with self.engine.connect() as connection:
            result = connection.execution_options(yield_per=batch).execute(query)
            for partition in result.partitions(batch):
                ids = np.array([row[0] for row in partition], dtype=np.int64)
                vectors = np.stack([_vector(row[1]) for row in partition])
                entries = [
                    MemoryEntry(decision_id, backend, reward, (winner, loser) if winner else None, tokens)
                    for _, _, decision_id, backend, reward, winner, loser, tokens in partition
                ]
                yield ids, vectors, entries

    def feedback_since(self, after_reward_id: int = 0, after_preference_id: int = 0) -> Iterator[StoredFeedback]:
        """Rewards and preferences after the given ids, in the order they were acknowledged."""
        rewards = (
            select(Reward.id, Reward.created_at, Reward.reward, DecisionRow, QueryEmbedding.vector)
            .join(DecisionRow, DecisionRow.id == Reward.decision_id)
            .outerjoin(QueryEmbedding, QueryEmbedding.id == DecisionRow.embedding_id)
            .where(Reward.id > after_reward_id)
            .order_by(Reward.id)
        )
        preferences = (
            select(Preference.id, Preference.created_at, Preference.winner, Preference.loser, DecisionRow, QueryEmbedding.vector)
            .join(DecisionRow, DecisionRow.id == Preference.decision_id)
            .outerjoin(QueryEmbedding, QueryEmbedding.id == DecisionRow.embedding_id)
            .where(Preference.id > after_preference_id)
            .order_by(Preference.id)
        )
        with Session(self.engine) as session:
            scalar = (
                StoredFeedback(int(i), created, _stored(d), _vector(v), reward=float(r))
                for i, created, r, d, v in session.execute(rewards).yield_per(1000)
            )
            pairwise = (
                StoredFeedback(int(i), created, _stored(d), _vector(v), preference=(w, loser))
                for i, created, w, loser, d, v in session.execute(preferences).all()
            )
            yield from heapq.merge(scalar, pairwise, key=lambda f: (f.created_at, f.preference is not None, f.feedback_id))

    def tenant_spend(self, tenant: str, since: datetime) -> float:
        """What a tenant's decisions since `since` cost: the real cost where known, else the predicted one."""
        with Session(self.engine) as session:
            total = session.execute(
                select(func.sum(func.coalesce(DecisionRow.cost_usd, DecisionRow.predicted_cost_usd, 0.0)))
                .where(DecisionRow.tenant == tenant, DecisionRow.created_at >= since, DecisionRow.status != "error")
            ).scalar()
        return float(total or 0.0)

    def latest_snapshots(self) -> dict[str, PolicySnapshot]:
        with Session(self.engine) as session:
            latest = select(PolicySnapshot.policy, func.max(PolicySnapshot.id).label("id")).group_by(PolicySnapshot.policy).subquery()
            rows = session.execute(select(PolicySnapshot).join(latest, PolicySnapshot.id == latest.c.id)).scalars().all()
            for row in rows:
                session.expunge(row)
            return {row.policy: row for row in rows}

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Durable tallies from the log: per backend, and per policy and backend (who made the decision).

        Each entry: decisions, answers, errors, spend, mean cost and latency, rewards and their mean.
        """
        with Session(self.engine) as session:
            decisions = session.execute(
                select(
                    DecisionRow.policy,
                    DecisionRow.backend,
                    func.count(),
                    func.count().filter(DecisionRow.status == "ok"),
                    func.count().filter(DecisionRow.status == "error"),
                    func.coalesce(func.sum(DecisionRow.cost_usd), 0.0),
                    func.count(DecisionRow.cost_usd),
                    func.coalesce(func.sum(DecisionRow.latency_ms), 0.0),
                    func.count(DecisionRow.latency_ms),
                ).group_by(DecisionRow.policy, DecisionRow.backend)
            ).all()
            rewards = {
                (policy, backend): (count, total)
                for policy, backend, count, total in session.execute(
                    select(DecisionRow.policy, DecisionRow.backend, func.count(Reward.id), func.sum(Reward.reward))
                    .join(Reward, Reward.decision_id == DecisionRow.id)
                    .group_by(DecisionRow.policy, DecisionRow.backend)
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
