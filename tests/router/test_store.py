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
from router.store import Finish, GroupWriter, NewDecision, add_decision, add_reward, finish_decision, load_decision
from router.tables import Reward


def _decision(i: int) -> NewDecision:
    arms = [Arm("a", 1.0, 2.0, 1e-5), Arm("b", 2.0, 4.0, 2e-5)]
    record = DecisionRecord(f"d{i}", "random", "a", 0.5, 1, arms, [], 0.0, 1.0, shadow={"random": {"a": 0.5, "b": 0.5}})
    return NewDecision(record, "route", None, "auto", "q", 1.0, i + 1, "test", np.full(4, i, dtype=np.float32))


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
    await asyncio.gather(*(writer.submit(lambda s, i=i: add_decision(s, _decision(i))) for i in range(200)))
    learned = []
    results = await asyncio.gather(
        *(writer.submit(lambda s, i=i: add_reward(s, f"d{i}", 0.5), learned.append) for i in range(200)),
        writer.submit(lambda s: add_reward(s, "d0", 0.9)),  # conflicts with the 0.5 above
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
    await writer.submit(lambda s: add_decision(s, _decision(7)))
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
    await writer.submit(lambda s: add_decision(s, _decision(1)))

    def explode(_):
        raise RuntimeError("a learning hook failed")

    results = await asyncio.wait_for(asyncio.gather(
        writer.submit(lambda s: add_reward(s, "d1", 0.5), explode),
        *(writer.submit(lambda s, i=i: add_decision(s, _decision(i))) for i in range(2, 6)),
        return_exceptions=True,
    ), timeout=10)
    assert results[0] == (results[0][0], False), "the reward was committed, so it is acknowledged"
    assert all(r is None for r in results[1:])
    await asyncio.wait_for(writer.submit(lambda s: add_decision(s, _decision(9))), timeout=10)
    await writer.close()
    with Session(engine) as session:
        assert session.execute(select(func.count()).select_from(Reward)).scalar_one() == 1
