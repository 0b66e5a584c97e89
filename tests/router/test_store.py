"""Group commit on a real database: batched, each write fails alone, every acknowledged write is there."""

import asyncio

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from policies import Arm
from router.db import create_db_engine, migrate
from router.engine import DecisionRecord
from router.errors import Conflict, NotFound
from router.store import (
    Batched,
    Finish,
    GroupWriter,
    NewDecision,
    NewFeedback,
    add_decisions,
    finish_decision,
    load_decision,
    record_feedback,
)
from router.tables import DecisionRow, Reward


def _decision(i: int) -> NewDecision:
    arms = [Arm("a", 1.0, 2.0, 1e-5), Arm("b", 2.0, 4.0, 2e-5)]
    record = DecisionRecord(f"d{i}", "random", "a", 0.5, 1, arms, [], 0.0, 1.0, shadow={"random": {"a": 0.5, "b": 0.5}})
    return NewDecision(record, "route", None, "auto", "q", 1.0, i + 1, "test", np.full(4, i, dtype=np.float32))


def _reward(decision_id: str, reward: float) -> Batched:
    return Batched(record_feedback, NewFeedback(decision_id, None, reward=reward))


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request):
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    engine = create_db_engine(url)
    migrate(engine)
    yield engine
    engine.dispose()


async def test_concurrent_writes_share_commits_and_fail_alone(engine):
    writer = GroupWriter(engine)
    commits = 0
    original = writer._commit

    def counting(jobs):
        nonlocal commits
        commits += 1
        return original(jobs)

    writer._commit = counting
    await asyncio.gather(*(writer.submit(Batched(add_decisions, _decision(i))) for i in range(200)))
    learned = []
    results = await asyncio.gather(
        *(writer.submit(_reward(f"d{i}", 0.5), learned.append) for i in range(200)),
        writer.submit(_reward("d0", 0.9)),  # conflicts with the 0.5 above
        writer.submit(lambda s: load_decision(s, "missing")),
        return_exceptions=True,
    )
    await writer.close()
    assert all(not isinstance(r, Exception) for r in results[:200])
    assert isinstance(results[200], Conflict) and isinstance(results[201], NotFound)
    assert len(learned) == 200, "the after-commit hook ran once per acknowledged write"
    assert commits < 100, f"{commits} commits for 402 writes: no grouping"
    with Session(engine) as session:
        assert session.execute(select(func.count()).select_from(Reward)).scalar_one() == 200
        assert session.execute(select(Reward.reward).where(Reward.decision_id == "d0")).scalar_one() == 0.5


async def test_a_decision_goes_in_as_a_record_and_comes_out_with_the_answering_backend(engine):
    writer = GroupWriter(engine)
    await writer.submit(Batched(add_decisions, _decision(7)))
    stored, vector = await writer.submit(lambda s: load_decision(s, "d7"))
    assert stored.record.chosen == "a" and stored.record.backend is None and not stored.record.failed_over
    assert vector.tolist() == [7.0] * 4
    assert stored.cost_for_learning == pytest.approx(1e-5), "no answer yet: the predicted cost"
    failures = [{"backend": "a", "status": 503, "reason": "down"}]
    await writer.submit(lambda s: finish_decision(s, "d7", Finish("ok", failures, backend="b", cost_usd=3e-5, latency_ms=5.0)))
    stored, _ = await writer.submit(lambda s: load_decision(s, "d7"))
    assert (stored.record.chosen, stored.record.backend, stored.record.failed_over) == ("a", "b", True)
    assert stored.cost_for_learning == pytest.approx(3e-5) and stored.latency_ms == 5.0
    # chose a at 0.5, answered by b (0.5 logged): reached by either choice
    assert stored.record.learning_propensity == pytest.approx(1.0)
    await writer.close()


async def test_the_writer_survives_a_failing_after_commit_callback(engine):
    """Every job in the batch gets its answer, and later jobs are still written."""
    writer = GroupWriter(engine)
    await writer.submit(Batched(add_decisions, _decision(1)))

    def explode(_):
        raise RuntimeError("a learning hook failed")

    results = await asyncio.wait_for(asyncio.gather(
        writer.submit(_reward("d1", 0.5), explode),
        *(writer.submit(Batched(add_decisions, _decision(i))) for i in range(2, 6)),
        return_exceptions=True,
    ), timeout=10)
    assert not results[0].duplicate and results[0].feedback_id > 0, "the reward was committed, so it is acknowledged"
    assert all(r is None for r in results[1:])
    await asyncio.wait_for(writer.submit(Batched(add_decisions, _decision(9))), timeout=10)
    await writer.close()
    with Session(engine) as session:
        assert session.execute(select(func.count()).select_from(Reward)).scalar_one() == 1


@pytest.fixture
def pg_engine(pg_url):
    engine = create_db_engine(pg_url)
    migrate(engine)
    yield engine
    engine.dispose()


async def test_log_positions_follow_commit_order_across_writers(pg_engine):
    """Two writers (two replicas) committing at once: positions are in commit order, so a reader that
    pages through the log by position sees decision, outcome, reward in that order, and nothing twice."""
    from router.store import Store

    writers = [GroupWriter(pg_engine, shared_log=True), GroupWriter(pg_engine, shared_log=True)]
    await asyncio.gather(*(writers[i % 2].submit(Batched(add_decisions, _decision(i))) for i in range(40)))
    await asyncio.gather(
        *(writers[i % 2].submit(lambda s, i=i: finish_decision(s, f"d{i}", Finish("ok", [], backend="b", cost_usd=1e-5))) for i in range(40)),
    )
    await asyncio.gather(*(writers[(i + 1) % 2].submit(_reward(f"d{i}", 0.5)) for i in range(40)))
    for writer in writers:
        await writer.close()
    store, after, seen = Store(pg_engine), 0, []
    while True:
        events, more = store.log_events(after, limit=7)  # small pages: the cut between sources must lose nothing
        seen += events
        after = events[-1].seq if events else after
        if not more:
            break
    assert [e.seq for e in seen] == sorted({e.seq for e in seen})
    assert [e.kind for e in seen].count("decision") == 40 and [e.kind for e in seen].count("reward") == 40
    for i in range(40):
        kinds = [e.kind for e in seen if e.decision.record.decision_id == f"d{i}"]
        assert kinds == ["decision", "outcome", "reward"], kinds
    assert store.log_head() == seen[-1].seq


async def test_spend_holds_never_pass_a_limit_and_orphans_are_released(pg_engine):
    from datetime import UTC, datetime, timedelta

    from router.budget import SpendRule
    from router.store import Hold, HoldRefused, Store, release_orphans, settle_holds, take_holds
    from router.tables import DecisionRow, Spend

    store, writer = Store(pg_engine), GroupWriter(pg_engine)
    epoch = datetime.min.replace(tzinfo=UTC)
    key = SpendRule("key:team", epoch, limit_usd=3e-5)
    per_query = SpendRule("pacing", epoch, target_usd_per_query=1e-5)
    hourly = SpendRule("hourly", epoch, target_usd_per_hour=3.6, max_carryover_hours=1.0)  # $0.001 per second, starts with $0.06
    room = store.spend_headroom([key, per_query, hourly])
    assert room["key:team"] == (pytest.approx(3e-5), 0.0) and room["pacing"][0] == pytest.approx(1e-5)
    assert 0.06 <= room["hourly"][0] <= 0.07

    def decide(i: int, holds: list[Hold], replica: str = "r1"):
        def work(session):
            new = _decision(i)
            add_decisions(session, [NewDecision(new.record, "chat", "team", "auto", "q", 1.0, i + 1, "test", new.vector, replica)])
            take_holds(session, f"d{i}", holds, replica)
        return work

    results = await asyncio.gather(*(writer.submit(decide(i, [Hold(key, 1e-5)])) for i in range(6)), return_exceptions=True)
    assert sum(r is None for r in results) == 3 and all(isinstance(r, HoldRefused) for r in results if r is not None)
    taken = [i for i, r in enumerate(results) if r is None]
    done = Finish("ok", [], backend="a", cost_usd=1e-5)
    await writer.submit(lambda s: (finish_decision(s, f"d{taken[0]}", done), settle_holds(s, f"d{taken[0]}", [(key, 1e-5, True)])))
    assert store.spend_headroom([key])["key:team"][0] == pytest.approx(0.0, abs=1e-12), "spent and running fill the limit"
    # pacing per query: the cheapest goes even past the target (force); an answer raises the allowance by one target
    with pytest.raises(HoldRefused):
        await writer.submit(decide(10, [Hold(per_query, 2e-5)]))
    await writer.submit(decide(11, [Hold(per_query, 2e-5, force=True), Hold(hourly, 0.05)]))
    await writer.submit(lambda s: (finish_decision(s, "d11", done), settle_holds(s, "d11", [(per_query, 2e-5, True), (hourly, 0.05, True)])))
    room = store.spend_headroom([per_query, hourly])
    assert room["pacing"][0] == pytest.approx(1e-5 * 2 - 2e-5)
    assert 0.01 <= room["hourly"][0] <= 0.03, "the hourly balance lost what the answer cost"
    # a replica that died: its next start (or the age sweep) releases its holds and ends its unanswered decisions
    released = await writer.submit(lambda s: release_orphans(s, datetime.now(UTC) - timedelta(hours=1), "r1"))
    assert sorted(released) == sorted(f"d{i}" for i in taken[1:])
    with Session(pg_engine) as session:
        assert session.execute(select(Spend.reserved_usd).where(Spend.scope == "key:team")).scalar_one() == pytest.approx(0.0, abs=1e-12)
        row = session.get(DecisionRow, f"d{taken[1]}")
        assert row.status == "error" and row.finish_seq is not None
    await writer.close()


async def test_a_batch_of_feedback_is_judged_write_by_write(engine):
    """One commit's feedback goes in with shared statements, yet each write gets its own verdict: a repeat
    later in the same batch is a duplicate with the first one's id, another value is a conflict, an
    unknown decision is not found, and a run whose statement fails is retried write by write."""
    writer = GroupWriter(engine)
    await asyncio.gather(*(writer.submit(Batched(add_decisions, _decision(i))) for i in range(3)))
    results = await asyncio.gather(
        writer.submit(_reward("d0", 0.5)),
        writer.submit(_reward("d0", 0.5)),
        writer.submit(_reward("d0", 0.7)),
        writer.submit(_reward("nope", 0.5)),
        writer.submit(Batched(record_feedback, NewFeedback("d1", None, preference=("a", "b")))),
        writer.submit(Batched(record_feedback, NewFeedback("d1", None, preference=("b", "a")))),
        return_exceptions=True,
    )
    first, again, other, unknown, preferred, contrary = results
    assert not first.duplicate and again.duplicate and again.feedback_id == first.feedback_id
    assert isinstance(other, Conflict) and isinstance(unknown, NotFound) and isinstance(contrary, Conflict)
    assert not preferred.duplicate and preferred.decision.record.decision_id == "d1"
    # d2 twice in one run: the run's insert fails on the key, so each write is tried alone and only the repeat fails
    outcomes = await asyncio.gather(*(writer.submit(Batched(add_decisions, _decision(i))) for i in (2, 5)), return_exceptions=True)
    await writer.close()
    assert isinstance(outcomes[0], Exception) and outcomes[1] is None
    with Session(engine) as session:
        assert session.execute(select(func.count()).select_from(Reward)).scalar_one() == 1
        assert session.get(DecisionRow, "d5") is not None
