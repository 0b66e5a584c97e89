"""Durable writes and reads of decisions, embeddings and feedback (blocking; call from a worker thread).

The store owns the rows: decisions go in as the engine's `DecisionRecord` (with what the service knows
of the request) and come out as `StoredDecision`, so no other module builds or reads ORM objects, and
vectors are decoded in one place. Every write commits before it returns, so whatever the API
acknowledges is on disk.

On PostgreSQL the rows are also one log that several replicas apply (`log_events`): a decision, its
outcome, a reward and a preference each get a position from one sequence. Positions are assigned while
the writing transaction holds a transaction-level advisory lock (`GroupWriter` takes it before the first
logged write of a transaction and keeps it until the commit), so position order is commit order: a
reader that sees position n has seen every position below it that will ever exist, and catching up by
position loses nothing. The commit notifies the log's channel to wake the other replicas.

Money and rate limits several replicas share are rows too: `spend` (per key and period, and the pacing
target), the `spend_holds` of calls still running, and `rate_buckets`; they change only by single atomic
statements that check the limit in their WHERE clause, so concurrent replicas cannot pass it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import heapq
import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import Engine, case, delete, func, insert, select, text, update
from sqlmodel import Session

from router.budget import SpendRule
from router.db import database_error, lock_key_sql
from router.engine import DecisionRecord
from router.errors import Conflict, NotFound
from router.memory import MemoryEntry
from router.modes import VERIFY, Call
from router.tables import DecisionCall, DecisionRow, PolicySnapshot, Preference, QueryEmbedding, Reward, Spend, SpendHold

log = logging.getLogger("llm_router")

LOG_SEQUENCE = "router_log_seq"  # PostgreSQL: the one sequence of log positions (migration 0005)
_SPENT = func.coalesce(DecisionRow.cost_usd, DecisionRow.predicted_cost_usd, 0.0)  # what a decision cost: real where known, else predicted
_SPENDING = DecisionRow.status.not_in(("error", "rejected"))  # decisions that spend (a failed call costs nothing)


def is_postgres(session_or_engine: Session | Engine) -> bool:
    bind = session_or_engine.get_bind() if isinstance(session_or_engine, Session) else session_or_engine
    return bind.dialect.name == "postgresql"


def log_channel(schema: str) -> str:
    """The NOTIFY channel of the log in `schema` (channels are per database, so the schema is in the name)."""
    return "llm_router_log_" + hashlib.md5(schema.encode()).hexdigest()[:16]


def models_channel(schema: str) -> str:
    """The NOTIFY channel that says a predictor was promoted."""
    return "llm_router_models_" + hashlib.md5(schema.encode()).hexdigest()[:16]


def _next_seq(session: Session) -> Any:
    """The next log position (an SQL expression evaluated in the INSERT/UPDATE), or None on SQLite."""
    return func.nextval(LOG_SEQUENCE) if is_postgres(session) else None


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
    replica: str | None = None  # several replicas: which one decided


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
    kind: str = "chat"  # chat | route

    @property
    def cost_for_learning(self) -> float:
        """The real cost where the answer came back, else the predicted one (a routed-only decision)."""
        return self.cost_usd if self.cost_usd is not None else self.record.predicted_cost_usd


@dataclass(frozen=True, slots=True)
class DecisionSummary:
    """A logged decision as the dashboard lists it: what was asked (cut short), who decided what, how it
    ended, and the feedback it got."""

    decision_id: str
    created_at: datetime
    kind: str
    tenant: str | None
    query: str
    policy: str
    backend: str
    status: str
    mode: str
    cost_usd: float | None
    predicted_cost_usd: float | None
    latency_ms: float | None
    over_budget: bool
    error: str | None
    reward: float | None
    preference: tuple[str, str] | None


@dataclass(frozen=True, slots=True)
class StoredFeedback:
    """A reward or a preference joined with its decision and the decision's embedding."""

    feedback_id: int
    created_at: datetime
    decision: StoredDecision
    vector: np.ndarray | None
    reward: float | None = None
    preference: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One entry of the shared log, as every replica applies it, in position order.

    `decision`: a decision was made (its query joins the memory; a `/v1/route` decision also spends its
    predicted cost). `outcome`: a chat decision was answered or failed. `reward`, `preference`: feedback.
    """

    seq: int
    kind: str  # decision | outcome | reward | preference
    decision: StoredDecision
    vector: np.ndarray | None = None
    memory_id: int | None = None  # decision: the query's id in the memory
    embedder: str | None = None  # decision
    chosen: str | None = None  # decision: the policy's pick
    predicted_cost_usd: float | None = None  # decision
    at: datetime | None = None  # decision, reward, preference: when the row was written
    replica: str | None = None  # decision, reward, preference: the replica that wrote it
    completion_tokens: int | None = None  # outcome
    other_lengths: tuple[tuple[str, int], ...] = ()  # outcome of a multi-call decision: lengths of answers not delivered
    reward: float | None = None
    preference: tuple[str, str] | None = None


class HoldRefused(Exception):
    """A reservation did not fit its spend row any more (another replica took the room first)."""

    def __init__(self, scope: str) -> None:
        super().__init__(f"no room left in {scope}")
        self.scope = scope


def _stored(row: DecisionRow) -> StoredDecision:
    record = DecisionRecord.from_columns(
        row.id, row.policy, row.chosen_backend or row.backend, row.backend if row.status == "ok" else None, row.propensity,
        row.prompt_tokens_estimate,
        {"candidates": row.candidates, "neighbours": row.neighbours, "cost_weight": row.cost_weight, "cost_scale": row.cost_scale,
         "shadow": row.shadow},
    )
    record.mode = row.mode
    return StoredDecision(record, row.tenant, row.status, row.error, row.cost_usd, row.latency_ms, row.kind)


@functools.cache
def _column_defaults(table: type[Any], omit: frozenset[str]) -> dict[str, Callable[[], Any]]:
    """Each column's default as the ORM model declares it (Core inserts do not apply pydantic defaults)."""
    return {
        name: functools.partial(field.get_default, call_default_factory=True)
        for name, field in table.model_fields.items()
        if name in table.__table__.columns and name not in omit
    }


def _rows(table: type[Any], values: list[dict[str, Any]], omit: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Complete column dicts for a Core executemany insert: every column but `omit` (an autoincrement id, a
    log position given as SQL), defaults filled in."""
    defaults = _column_defaults(table, omit)
    return [{name: (row[name] if name in row else default()) for name, default in defaults.items()} for row in values]


def _logged_insert(session: Session, table: type[Any]) -> tuple[Any, frozenset[str]]:
    """An insert of log rows: on PostgreSQL each row takes the next log position, in row order, under the log
    lock its transaction holds (None on SQLite, one process)."""
    statement = insert(table.__table__)
    if is_postgres(session):
        return statement.values(seq=func.nextval(LOG_SEQUENCE)), frozenset({"seq"})
    return statement, frozenset()


def add_decisions(session: Session, news: list[NewDecision]) -> list[None]:
    """Log decisions (and their query embeddings) with one executemany insert per table."""
    embeddings = [
        {"id": new.memory_id, "embedder": new.embedder, "dim": len(new.vector), "vector": new.vector.astype(np.float32).tobytes()}
        for new in news
    ]
    session.execute(insert(QueryEmbedding.__table__), embeddings)
    rows = []
    for new in news:
        record = new.record
        rows.append({
            "id": record.decision_id, "kind": new.kind, "tenant": new.tenant, "requested_model": new.requested_model,
            "query": new.query, "prompt_tokens_estimate": record.prompt_tokens, "embedding_id": new.memory_id,
            "policy": record.policy, "backend": record.chosen, "chosen_backend": record.chosen, "propensity": record.propensity,
            "scores": record.scores, "predicted_cost_usd": record.predicted_cost_usd, "max_cost_usd": record.max_cost_usd,
            "over_budget": record.over_budget, "decision_ms": new.decision_ms, "mode": record.mode, "replica": new.replica,
            **record.columns(),
        })
    statement, omit = _logged_insert(session, DecisionRow)
    session.execute(statement, _rows(DecisionRow, rows, omit))
    return [None] * len(news)


def finish_decision(session: Session, decision_id: str, finish: Finish) -> None:
    row = session.get(DecisionRow, decision_id)
    if row is None:
        raise NotFound(f"unknown decision_id {decision_id!r}")
    for name in finish.__slots__:
        value = getattr(finish, name)
        if name != "calls" and (value is not None or name != "backend"):
            setattr(row, name, value)
    if is_postgres(session):
        row.finish_seq = _next_seq(session)
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


@dataclass(frozen=True, slots=True)
class NewFeedback:
    """A reward or a preference to record (exactly one of the two), from the key `tenant`."""

    decision_id: str
    tenant: str | None
    reward: float | None = None
    preference: tuple[str, str] | None = None
    replica: str | None = None


@dataclass(frozen=True, slots=True)
class RecordedFeedback:
    """Feedback as written: its decision and embedding, its row id (a log position on one process), and
    whether it was a repeat of feedback already recorded (then nothing was written)."""

    decision: StoredDecision
    vector: np.ndarray | None
    feedback_id: int
    duplicate: bool


def record_feedback(
    session: Session, items: list[NewFeedback], refusal: Callable[[StoredDecision, NewFeedback], Exception | None] | None = None,
) -> list[RecordedFeedback | Exception]:
    """Record feedback once per decision, for a whole batch with one read of the decisions with their
    feedback (a decision has at most one reward and one preference) and one executemany insert per kind.
    Per item: the recorded feedback, or the error that refused it (nothing written for it): an unknown
    decision, `refusal`'s verdict (who may give feedback, on what), or a conflict with the feedback already
    recorded (the same value again is a duplicate)."""
    ids = list(dict.fromkeys(item.decision_id for item in items))
    found: dict[str, tuple[StoredDecision, np.ndarray | None]] = {}
    rewards: dict[str, tuple[int | None, float]] = {}
    preferences: dict[str, tuple[int | None, tuple[str, str]]] = {}
    for row, vector, reward_id, reward, preference_id, winner, loser in session.execute(
        select(DecisionRow, QueryEmbedding.vector, Reward.id, Reward.reward, Preference.id, Preference.winner, Preference.loser)
        .outerjoin(QueryEmbedding, QueryEmbedding.id == DecisionRow.embedding_id)
        .outerjoin(Reward, Reward.decision_id == DecisionRow.id)
        .outerjoin(Preference, Preference.decision_id == DecisionRow.id)
        .where(DecisionRow.id.in_(ids))
    ):
        found[row.id] = (_stored(row), _vector(vector))
        if reward_id is not None:
            rewards[row.id] = (reward_id, reward)
        if preference_id is not None:
            preferences[row.id] = (preference_id, (winner, loser))
    results: list[Any] = [None] * len(items)
    fresh: dict[str, list[int]] = {"reward": [], "preference": []}  # positions of the items to insert
    for n, item in enumerate(items):
        if item.decision_id not in found:
            results[n] = NotFound(f"unknown decision_id {item.decision_id!r}")
            continue
        decision, vector = found[item.decision_id]
        refused = refusal(decision, item) if refusal is not None else None
        if refused is not None:
            results[n] = refused
            continue
        kind, recorded, value = (
            ("reward", rewards, item.reward) if item.preference is None else ("preference", preferences, item.preference)
        )
        existing = recorded.get(item.decision_id)
        if existing is None:
            recorded[item.decision_id] = (None, value)  # an id once inserted; a repeat later in the batch is a duplicate
            fresh[kind].append(n)
            results[n] = RecordedFeedback(decision, vector, 0, False)
        elif kind == "reward" and abs(existing[1] - value) > 1e-12:
            results[n] = Conflict(f"decision {item.decision_id} already has reward {existing[1]}; rewards are recorded once")
        elif kind == "preference" and existing[1] != value:
            results[n] = Conflict(f"decision {item.decision_id} already has a preference {existing[1][0]} > {existing[1][1]}")
        else:
            results[n] = (decision, vector)  # a duplicate: its id is known once the batch's inserts are
    for kind, table, recorded in (("reward", Reward, rewards), ("preference", Preference, preferences)):
        if not fresh[kind]:
            continue
        values = [
            {"decision_id": items[n].decision_id, "replica": items[n].replica,
             **({"reward": items[n].reward} if kind == "reward" else dict(zip(("winner", "loser"), items[n].preference)))}
            for n in fresh[kind]
        ]
        statement, omit = _logged_insert(session, table)
        inserted = session.execute(
            statement.returning(table.__table__.c.id, sort_by_parameter_order=True), _rows(table, values, omit | {"id"})
        ).scalars().all()
        for n, feedback_id in zip(fresh[kind], inserted, strict=True):
            results[n] = RecordedFeedback(results[n].decision, results[n].vector, int(feedback_id), False)
            recorded[items[n].decision_id] = (int(feedback_id), recorded[items[n].decision_id][1])
    for n, result in enumerate(results):
        if isinstance(result, tuple):
            kind_ids = rewards if items[n].preference is None else preferences
            results[n] = RecordedFeedback(*result, int(kind_ids[items[n].decision_id][0]), True)  # type: ignore[arg-type]
    return results


def write_snapshot(
    session: Session, states: dict[str, dict[str, Any]], last_reward_id: int, last_preference_id: int, keep: int = 3,
    last_seq: int | None = None, exclusive: bool = False, unless_since: int | None = None,
) -> bool:
    """One row per policy (and one for the router), then drop all but the newest `keep` of each.

    `exclusive` (several replicas): only one replica writes at a time (an advisory lock; a replica that
    does not get it skips), and none writes when a snapshot at or after log position `unless_since`
    (default `last_seq`) exists: another replica took it in this interval. Returns whether it wrote.
    """
    if exclusive:
        if not session.execute(text(f"SELECT pg_try_advisory_xact_lock({lock_key_sql('snapshot')})")).scalar():
            return False
        newest = session.execute(select(func.max(PolicySnapshot.last_seq))).scalar()
        since = last_seq if unless_since is None else unless_since
        if newest is not None and since is not None and newest >= since:
            return False
    for name, state in states.items():
        session.add(PolicySnapshot(policy=name, state=state, last_reward_id=last_reward_id, last_preference_id=last_preference_id,
                                   last_seq=last_seq))
    session.flush()
    for name in states:
        stale = session.execute(
            select(PolicySnapshot.id).where(PolicySnapshot.policy == name).order_by(PolicySnapshot.id.desc()).offset(keep)
        ).scalars().all()
        if stale:
            session.execute(delete(PolicySnapshot).where(PolicySnapshot.id.in_(stale)))
    return True


_NOW = "EXTRACT(EPOCH FROM clock_timestamp())"


def _headroom_sql(rule: SpendRule) -> tuple[str, dict[str, float]]:
    """What a spend row can still take (SQL over its columns) and the parameters it needs."""
    if rule.limit_usd is not None:
        return ":limit - spent_usd - reserved_usd", {"limit": rule.limit_usd}
    if rule.target_usd_per_query:
        return ":target * (settled + 1) - spent_usd - reserved_usd", {"target": rule.target_usd_per_query}
    return _balance_sql() + " - reserved_usd", _balance_params(rule)


def _balance_sql() -> str:
    return f"LEAST(:cap, balance_usd + :rate * GREATEST(0, {_NOW} - COALESCE(balance_at, {_NOW})) / 3600.0)"


def _balance_params(rule: SpendRule) -> dict[str, float]:
    rate = rule.target_usd_per_hour or 0.0
    return {"cap": rate * rule.max_carryover_hours, "rate": rate}


def _ensure_spend_row(session: Session, rule: SpendRule) -> None:
    """The row of `rule`, created on first use from what the decisions already spent in its period."""
    from sqlalchemy.dialects.postgresql import insert

    exists = session.execute(select(Spend.scope).where(Spend.scope == rule.scope, Spend.period_start == rule.period_start)).first()
    if exists is not None:
        return
    cost = func.coalesce(DecisionRow.cost_usd, DecisionRow.predicted_cost_usd, 0.0)
    if rule.pacing:
        spent, settled = session.execute(
            select(func.coalesce(func.sum(cost), 0.0), func.count())
            .where((DecisionRow.status == "ok") | (DecisionRow.kind == "route"))
        ).one()
    else:
        tenant = rule.scope.split(":", 1)[1]
        spent, settled = session.execute(
            select(func.coalesce(func.sum(cost), 0.0), func.count())
            .where(DecisionRow.tenant == tenant, DecisionRow.created_at >= rule.period_start, DecisionRow.status.not_in(("error", "rejected")))
        ).one()
    balance = (rule.target_usd_per_hour or 0.0) / 60  # an hourly target starts with a minute's budget, as in one process
    session.execute(
        insert(Spend).values(scope=rule.scope, period_start=rule.period_start, spent_usd=float(spent), reserved_usd=0.0,
                             settled=int(settled), balance_usd=balance, balance_at=text(_NOW))
        .on_conflict_do_nothing()
    )


def spend_headroom(session: Session, rules: list[SpendRule]) -> dict[str, tuple[float, float]]:
    """scope -> (headroom, spent + running) of each rule's row, creating rows on first use."""
    room: dict[str, tuple[float, float]] = {}
    for rule in rules:
        _ensure_spend_row(session, rule)
        expression, params = _headroom_sql(rule)
        row = session.execute(
            text(f"SELECT {expression}, spent_usd + reserved_usd FROM spend WHERE scope = :scope AND period_start = :period"),
            {**params, "scope": rule.scope, "period": rule.period_start},
        ).one()
        room[rule.scope] = (float(row[0]), float(row[1]))
    return room


@dataclass(frozen=True, slots=True)
class Hold:
    """What a decision takes from a spend row in the write that logs it: `usd` must fit the row's headroom
    (a key: the worst case; pacing: the predicted cost, unless `force`: the cheapest candidate always
    goes). A chat call keeps it held until `settle_holds`; a `/v1/route` decision spends `charge_usd` now."""

    rule: SpendRule
    usd: float
    charge_usd: float | None = None
    force: bool = False


def take_holds(session: Session, decision_id: str, holds: list[Hold], replica: str | None) -> None:
    """Reserve (or charge) every hold atomically against its row; HoldRefused if one does not fit (the
    caller's savepoint then rolls back the decision and any hold taken before)."""
    for hold in holds:
        rule = hold.rule
        headroom, params = _headroom_sql(rule)
        if hold.charge_usd is None:
            changes = "reserved_usd = reserved_usd + :usd"
        else:
            changes = "spent_usd = spent_usd + :charge, settled = settled + 1"
            if rule.target_usd_per_hour:
                changes += f", balance_usd = {_balance_sql()} - :charge, balance_at = {_NOW}"
                params |= _balance_params(rule)
        taken = session.execute(
            text(f"UPDATE spend SET {changes} WHERE scope = :scope AND period_start = :period "
                 f"AND (:force OR {headroom} >= :usd - 1e-12) RETURNING spent_usd"),
            {**params, "usd": hold.usd, "charge": hold.charge_usd or 0.0, "force": hold.force, "scope": rule.scope,
             "period": rule.period_start},
        ).first()
        if taken is None:
            raise HoldRefused(rule.scope)
        if hold.charge_usd is None:
            session.add(SpendHold(decision_id=decision_id, scope=rule.scope, period_start=rule.period_start, usd=hold.usd,
                                  replica=replica))
    session.flush()


def settle_holds(session: Session, decision_id: str, charges: list[tuple[SpendRule, float, bool]]) -> None:
    """A chat decision ended: each (rule, real cost, answered) releases the decision's hold on that row (if
    still there) and adds the cost; pacing counts an answer only when there was one."""
    held = {
        scope: usd
        for scope, usd in session.execute(
            delete(SpendHold).where(SpendHold.decision_id == decision_id).returning(SpendHold.scope, SpendHold.usd)
        ).all()
    }
    for rule, cost, answered in charges:
        counted = answered or not rule.pacing
        changes = "reserved_usd = GREATEST(0, reserved_usd - :held)"
        params: dict[str, Any] = {"held": held.get(rule.scope, 0.0), "cost": cost if counted else 0.0, "scope": rule.scope,
                                  "period": rule.period_start}
        if counted:
            changes += ", spent_usd = spent_usd + :cost, settled = settled + 1"
            if rule.target_usd_per_hour:
                changes += f", balance_usd = {_balance_sql()} - :cost, balance_at = {_NOW}"
                params |= _balance_params(rule)
        session.execute(text(f"UPDATE spend SET {changes} WHERE scope = :scope AND period_start = :period"), params)


ORPHANED = "the replica that made this decision stopped before its answer was recorded"


def release_orphans(session: Session, before: datetime, replica: str | None = None) -> list[str]:
    """Holds and unanswered chat decisions left by a replica that died: those of `replica` (its previous
    run, at its start) and any older than `before`. Holds are released, the decisions end as errors
    (an outcome in the log). Returns the decisions ended."""
    mine = (SpendHold.replica == replica) if replica else False
    for scope, period, usd in session.execute(
        delete(SpendHold).where(mine | (SpendHold.created_at < before)).returning(SpendHold.scope, SpendHold.period_start, SpendHold.usd)
    ).all():
        session.execute(
            update(Spend).where(Spend.scope == scope, Spend.period_start == period)
            .values(reserved_usd=func.greatest(0.0, Spend.reserved_usd - usd))
        )
    stale = (DecisionRow.replica == replica) if replica else False
    ended = session.execute(
        update(DecisionRow)
        .where(DecisionRow.kind == "chat", DecisionRow.status == "routed", stale | (DecisionRow.created_at < before))
        .values(status="error", error=ORPHANED, finish_seq=_next_seq(session))
        .returning(DecisionRow.id)
    ).scalars().all()
    return list(ended)


def take_rate_token(engine: Engine, name: str, capacity: float, per_second: float) -> float:
    """One token from the key's bucket shared by every replica (the database's clock): 0 when taken,
    else the seconds until one is available."""
    now = _NOW
    refill = f"LEAST(:capacity, rate_buckets.tokens + ({now} - rate_buckets.updated_at) * :rate)"
    params = {"name": name, "capacity": capacity, "rate": per_second}
    with engine.begin() as connection:
        # A bucket is a rate, not a record: no need to wait for the disk (a crash forgets at most a few tokens).
        connection.execute(text("SET LOCAL synchronous_commit = off"))
        taken = connection.execute(text(
            f"INSERT INTO rate_buckets (name, tokens, updated_at) VALUES (:name, :capacity - 1, {now}) "
            f"ON CONFLICT (name) DO UPDATE SET tokens = {refill} - 1, updated_at = {now} WHERE {refill} >= 1 RETURNING tokens"
        ), params).first()
        if taken is not None:
            return 0.0
        tokens = connection.execute(text(f"SELECT {refill} FROM rate_buckets WHERE name = :name"), params).scalar()
    return max(0.001, (1.0 - float(tokens or 0.0)) / per_second)


Bulk = Callable[[Session, list[Any]], list[Any]]


@dataclass(frozen=True, slots=True)
class Batched:
    """A write done together with the other writes of the same `bulk` in its commit: `bulk(session, items)`
    writes them all (one statement per table rather than one per write) and returns each item's result,
    or the exception that refused it, having written nothing for a refused item."""

    bulk: Bulk
    item: Any


@dataclass
class _Job:
    work: Callable[[Session], Any] | Batched
    after: Callable[[Any], None] | None
    future: asyncio.Future[Any]
    logged: bool = True  # may write log rows: on PostgreSQL the transaction takes the log lock first


class GroupWriter:
    """Durable writes with group commit: the writes that arrive while a commit runs share the next one.

    Each write runs in its own savepoint, so one that fails (unknown id, conflict) fails alone; a run of
    `Batched` writes of one kind shares a savepoint and its statements (if the run fails as a whole, each
    of its writes is tried again alone). A caller
    is answered only after the transaction holding its write has committed, and its `after` callback
    (e.g. learning from the reward) runs on the event loop right after that commit, before any other
    coroutine, so state derived from the log never lags what the log acknowledged.

    With `shared_log` (several replicas on one PostgreSQL) a transaction with a `logged` write takes the
    log's advisory lock before that write (not inside its savepoint: a rolled-back savepoint would release
    it) and holds it to the commit, so log positions are in commit order across every process writing to
    the database; the commit notifies the log's channel. One process alone commits one transaction at a
    time and nobody follows its log, so it needs neither (two round trips of about ten per commit).

    A commit that fails because the database cannot be reached is reported to each caller as
    `DatabaseUnavailable` (503).
    """

    def __init__(self, engine: Engine, max_batch: int = 512, shared_log: bool = False) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.ordered = shared_log and is_postgres(engine)  # take the log lock, notify the followers
        self.on_outage: Callable[[Exception], None] | None = None  # a commit failed: the database is unreachable
        self.on_commit: Callable[[], None] | None = None  # a commit succeeded
        self._channel: str | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task[None] | None = None

    async def submit(self, work: Callable[[Session], Any] | Batched, after: Callable[[Any], None] | None = None, logged: bool = True) -> Any:
        """`logged=False` for writes that add no log rows (snapshots, purges): they do not wait for the log lock."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run())
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(work, after, future, logged))  # type: ignore[union-attr]
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
                error = database_error(exc)
                if error is not None and self.on_outage is not None:
                    self.on_outage(error)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error or exc)
                continue
            if self.on_commit is not None:
                self.on_commit()
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
            locked = False
            start = 0
            while start < len(jobs):
                run = self._run_of(jobs, start)
                if self.ordered and not locked and any(job.logged for job in run):
                    session.execute(text(f"SELECT pg_advisory_xact_lock({lock_key_sql('log')})"))
                    locked = True
                if isinstance(run[0].work, Batched):
                    outcomes.extend(self._batched(session, run[0].work.bulk, [job.work.item for job in run]))  # type: ignore[union-attr]
                else:
                    outcomes.append(self._one(session, run[0].work))  # type: ignore[arg-type]
                start += len(run)
            if locked:
                if self._channel is None:
                    self._channel = log_channel(session.execute(text("SELECT current_schema()")).scalar_one())
                session.execute(select(func.pg_notify(self._channel, "")))
            session.commit()
        return outcomes

    @staticmethod
    def _run_of(jobs: list[_Job], start: int) -> list[_Job]:
        """The job at `start`, with the `Batched` jobs of the same bulk that directly follow it."""
        work = jobs[start].work
        end = start + 1
        if isinstance(work, Batched):
            while end < len(jobs) and isinstance(jobs[end].work, Batched) and jobs[end].work.bulk is work.bulk:  # type: ignore[union-attr]
                end += 1
        return jobs[start:end]

    @staticmethod
    def _one(session: Session, work: Callable[[Session], Any]) -> tuple[bool, Any]:
        try:
            with session.begin_nested():
                return True, work(session)
        except Exception as exc:  # noqa: BLE001 - delivered to that job's caller
            if database_error(exc) is not None:  # the connection is gone: the whole transaction is
                raise
            return False, exc

    def _batched(self, session: Session, bulk: Bulk, items: list[Any]) -> list[tuple[bool, Any]]:
        ok, results = self._one(session, lambda s: bulk(s, items))
        if not ok:  # the run failed as a whole: each write alone, so only the culprit fails
            if len(items) == 1:
                return [(False, results)]
            return [outcome for item in items for outcome in self._batched(session, bulk, [item])]
        return [(not isinstance(result, Exception), result) for result in results]

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


def _shared(name: str | None) -> str | None:
    """One string object per backend name, however many rows carry it."""
    return None if name is None else sys.intern(name)


class Store:
    """Reads (every write goes through `GroupWriter`, so SQLite has a single writer)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def memory_rows(
        self, embedder: str, newest: int = 0, up_to_seq: int | None = None, batch: int = 5000,
    ) -> tuple[int, Iterator[tuple[np.ndarray, np.ndarray, list[MemoryEntry]]]]:
        """How many stored queries the memory gets (the `newest` ones, 0: all), and (memory ids, vectors,
        entries) of each, oldest first, in batches.

        `up_to_seq` (several replicas): the memory as it stood at that log position: later decisions, and
        later feedback and outcomes of earlier ones, are left out (the log replay adds them in order, as
        every other replica did)."""
        made = select(DecisionRow.created_at).join(QueryEmbedding, DecisionRow.embedding_id == QueryEmbedding.id).where(
            QueryEmbedding.embedder == embedder
        )
        if up_to_seq is not None:
            made = made.where(DecisionRow.seq <= up_to_seq)
        with self.engine.connect() as connection:
            total = connection.execute(select(func.count()).select_from(made.subquery())).scalar_one()
            since = None
            if newest and total > newest:
                since = connection.execute(made.order_by(DecisionRow.created_at.desc()).offset(newest - 1).limit(1)).scalar_one()
                total = connection.execute(select(func.count()).select_from(made.where(DecisionRow.created_at >= since).subquery())).scalar_one()
        return total, self._memory_batches(embedder, since, up_to_seq, batch)

    def _memory_batches(
        self, embedder: str, since: datetime | None, up_to_seq: int | None, batch: int,
    ) -> Iterator[tuple[np.ndarray, np.ndarray, list[MemoryEntry]]]:
        """Plain driver rows (no ORM objects, no result processing: a million of them at start), oldest first."""
        rewarded, preferred = Reward.decision_id == DecisionRow.id, Preference.decision_id == DecisionRow.id
        answered = DecisionRow.finish_seq.is_not(None) | DecisionRow.seq.is_(None)  # SQLite keeps no positions
        if up_to_seq is not None:
            rewarded, preferred = rewarded & (Reward.seq <= up_to_seq), preferred & (Preference.seq <= up_to_seq)
            answered = DecisionRow.finish_seq <= up_to_seq
        query = (
            select(
                QueryEmbedding.id, QueryEmbedding.vector, DecisionRow.id, DecisionRow.backend, Reward.reward,
                Preference.winner, Preference.loser, DecisionRow.completion_tokens, DecisionRow.chosen_backend,
                case((answered, 1), else_=0),
            )
            .join(DecisionRow, DecisionRow.embedding_id == QueryEmbedding.id)
            .outerjoin(Reward, rewarded)
            .outerjoin(Preference, preferred)
            .where(QueryEmbedding.embedder == embedder)
            .order_by(DecisionRow.created_at, DecisionRow.id)
        )
        if since is not None:
            query = query.where(DecisionRow.created_at >= since)
        if up_to_seq is not None:
            query = query.where(DecisionRow.seq <= up_to_seq)
        compiled = query.compile(self.engine, compile_kwargs={"render_postcompile": True})
        parameters = compiled.construct_params()
        raw = self.engine.raw_connection()
        try:
            cursor = raw.cursor()
            positional = compiled.positiontup
            cursor.execute(str(compiled), tuple(parameters[name] for name in positional) if positional else parameters)
            while rows := cursor.fetchmany(batch):
                ids = np.fromiter((row[0] for row in rows), dtype=np.int64, count=len(rows))
                vectors = np.frombuffer(b"".join(row[1] for row in rows), dtype=np.float32).reshape(len(rows), -1)
                entries = [  # backend names shared: the driver makes a new string per row (a million at start)
                    MemoryEntry(decision_id, _shared(backend if done else (chosen or backend)), reward,
                                (_shared(winner), _shared(loser)) if winner else None, tokens if done else None)
                    for _, _, decision_id, backend, reward, winner, loser, tokens, chosen, done in rows
                ]
                yield ids, vectors, entries
            cursor.close()
        finally:
            raw.close()

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
                select(func.sum(_SPENT)).where(DecisionRow.tenant == tenant, DecisionRow.created_at >= since, _SPENDING)
            ).scalar()
        return float(total or 0.0)

    def spend_since(self, since: datetime) -> list[tuple[datetime, str | None, float]]:
        """(time, tenant, cost) of every decision since `since` that spends, oldest first, counted as `tenant_spend` counts."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(DecisionRow.created_at, DecisionRow.tenant, _SPENT).where(DecisionRow.created_at >= since, _SPENDING)
                .order_by(DecisionRow.created_at)
            ).all()
        return [(at, tenant, float(cost)) for at, tenant, cost in rows]

    def rewards_since(self, since: datetime, limit: int) -> list[tuple[datetime, DecisionRecord, float]]:
        """The last `limit` rewards given since `since`, oldest first, each with the parts of its decision that
        off-policy estimates read (who decided, the choice, its propensity, the mode, every policy's
        probabilities; read as `_stored` reads them): the candidates and neighbours, which would cost most
        of the time to decode, are left out."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(Reward.created_at, Reward.reward, DecisionRow.id, DecisionRow.policy, DecisionRow.chosen_backend, DecisionRow.backend,
                       DecisionRow.status, DecisionRow.propensity, DecisionRow.mode, DecisionRow.shadow)
                .join(DecisionRow, DecisionRow.id == Reward.decision_id)
                .where(Reward.created_at >= since).order_by(Reward.id.desc()).limit(limit)
            ).all()
        rewarded = []
        for at, reward, decision_id, policy, chosen, backend, status, propensity, mode, shadow in reversed(rows):
            record = DecisionRecord.from_columns(
                decision_id, policy, chosen or backend, backend if status == "ok" else None, propensity, 0, {"candidates": [], "shadow": shadow}
            )
            record.mode = mode
            rewarded.append((at, record, float(reward)))
        return rewarded

    def recent_decisions(self, limit: int, query_chars: int = 200) -> list[DecisionSummary]:
        """The newest `limit` decisions, newest first, with their feedback; queries cut to `query_chars`."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(
                    DecisionRow.id, DecisionRow.created_at, DecisionRow.kind, DecisionRow.tenant, func.substr(DecisionRow.query, 1, query_chars),
                    DecisionRow.policy, DecisionRow.backend, DecisionRow.status, DecisionRow.mode, DecisionRow.cost_usd,
                    DecisionRow.predicted_cost_usd, DecisionRow.latency_ms, DecisionRow.over_budget, DecisionRow.error, Reward.reward,
                    Preference.winner, Preference.loser,
                )
                .outerjoin(Reward, Reward.decision_id == DecisionRow.id)
                .outerjoin(Preference, Preference.decision_id == DecisionRow.id)
                .order_by(DecisionRow.created_at.desc(), DecisionRow.id).limit(limit)
            ).all()
        return [DecisionSummary(*row[:14], reward=row[14], preference=(row[15], row[16]) if row[15] else None) for row in rows]

    def ping(self) -> None:
        """One round trip to the database (raises when it cannot be reached)."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def schema(self) -> str:
        """The schema the tables are in (PostgreSQL; names the log's notification channels)."""
        with self.engine.connect() as connection:
            return str(connection.execute(text("SELECT current_schema()")).scalar_one())

    def log_events(self, after: int, limit: int = 1000) -> tuple[list[LogEvent], bool]:
        """The log after position `after`, in order, and whether more follows: a prefix of what is
        committed (read in one snapshot; since positions are in commit order, no position below the last
        one returned can appear later)."""
        with Session(self.engine.execution_options(isolation_level="REPEATABLE READ")) as session:
            decisions = session.execute(
                select(DecisionRow, QueryEmbedding.vector, QueryEmbedding.embedder)
                .outerjoin(QueryEmbedding, QueryEmbedding.id == DecisionRow.embedding_id)
                .where(DecisionRow.seq > after).order_by(DecisionRow.seq).limit(limit)
            ).all()
            outcomes = session.execute(
                select(DecisionRow).where(DecisionRow.finish_seq > after).order_by(DecisionRow.finish_seq).limit(limit)
            ).scalars().all()
            multi = [row.id for row in outcomes if row.mode != "route" and row.status == "ok"]
            lengths: dict[str, list[tuple[str, int]]] = {}
            if multi:
                for decision_id, backend, tokens in session.execute(
                    select(DecisionCall.decision_id, DecisionCall.backend, DecisionCall.completion_tokens)
                    .where(DecisionCall.decision_id.in_(multi), DecisionCall.status == "ok", DecisionCall.delivered.is_(False),
                           DecisionCall.role != VERIFY, DecisionCall.completion_tokens.is_not(None))
                    .order_by(DecisionCall.decision_id, DecisionCall.position)
                ).all():
                    lengths.setdefault(decision_id, []).append((backend, int(tokens)))
            rewards = session.execute(
                select(Reward.seq, Reward.created_at, Reward.reward, DecisionRow, QueryEmbedding.vector, Reward.replica)
                .join(DecisionRow, DecisionRow.id == Reward.decision_id)
                .outerjoin(QueryEmbedding, QueryEmbedding.id == DecisionRow.embedding_id)
                .where(Reward.seq > after).order_by(Reward.seq).limit(limit)
            ).all()
            preferences = session.execute(
                select(Preference.seq, Preference.created_at, Preference.winner, Preference.loser, DecisionRow, QueryEmbedding.vector,
                       Preference.replica)
                .join(DecisionRow, DecisionRow.id == Preference.decision_id)
                .outerjoin(QueryEmbedding, QueryEmbedding.id == DecisionRow.embedding_id)
                .where(Preference.seq > after).order_by(Preference.seq).limit(limit)
            ).all()
            events = [
                LogEvent(int(row.seq), "decision", _stored(row), _vector(vector), row.embedding_id, embedder, row.chosen_backend or row.backend,
                         row.predicted_cost_usd, row.created_at, row.replica)
                for row, vector, embedder in decisions
            ]
            events += [
                LogEvent(int(row.finish_seq), "outcome", _stored(row), completion_tokens=row.completion_tokens,
                         other_lengths=tuple(lengths.get(row.id, ())))
                for row in outcomes
            ]
            events += [
                LogEvent(int(seq), "reward", _stored(d), _vector(v), at=at, replica=replica, reward=float(r))
                for seq, at, r, d, v, replica in rewards
            ]
            events += [
                LogEvent(int(seq), "preference", _stored(d), _vector(v), at=at, replica=replica, preference=(w, loser))
                for seq, at, w, loser, d, v, replica in preferences
            ]
        # A source that filled its page may have more below another source's last position: stop at the lowest such end.
        pages: dict[str, list[int]] = {}
        for event in events:
            pages.setdefault(event.kind, []).append(event.seq)
        ends = [positions[-1] for positions in pages.values() if len(positions) == limit]
        events.sort(key=lambda e: e.seq)
        if ends:
            events = [e for e in events if e.seq <= min(ends)]
        return events, bool(ends)

    def log_head(self) -> int:
        """The highest committed log position (0 when the log is empty or the database is SQLite)."""
        if not is_postgres(self.engine):
            return 0
        with Session(self.engine) as session:
            return int(session.execute(select(func.greatest(
                select(func.max(DecisionRow.seq)).scalar_subquery(), select(func.max(DecisionRow.finish_seq)).scalar_subquery(),
                select(func.max(Reward.seq)).scalar_subquery(), select(func.max(Preference.seq)).scalar_subquery(),
            ))).scalar() or 0)

    def spend_headroom(self, rules: list[SpendRule]) -> dict[str, tuple[float, float]]:
        with Session(self.engine) as session:
            room = spend_headroom(session, rules)
            session.commit()
            return room

    def spend_rows(self) -> list[dict[str, Any]]:
        """Every spend row (several replicas: money held in the database), for the stats."""
        with Session(self.engine) as session:
            return [
                {"scope": row.scope, "period_start": row.period_start.isoformat(), "spent_usd": row.spent_usd,
                 "running_usd": row.reserved_usd, "answers": row.settled}
                for row in session.execute(select(Spend).order_by(Spend.scope, Spend.period_start)).scalars()
            ]

    def newest_embedder(self) -> str | None:
        """The embedder of the newest logged query (None on an empty log)."""
        with Session(self.engine) as session:
            return session.execute(
                select(QueryEmbedding.embedder).join(DecisionRow, DecisionRow.embedding_id == QueryEmbedding.id)
                .order_by(DecisionRow.created_at.desc()).limit(1)
            ).scalar()

    def latest_snapshots(self, logged: bool = False) -> dict[str, PolicySnapshot]:
        """The newest snapshot of each policy (and of the router); `logged`: only those marked with a log
        position (several replicas restore from the log)."""
        with Session(self.engine) as session:
            latest = select(PolicySnapshot.policy, func.max(PolicySnapshot.id).label("id"))
            if logged:
                latest = latest.where(PolicySnapshot.last_seq.is_not(None))
            latest = latest.group_by(PolicySnapshot.policy).subquery()
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
