"""Group commit on a real database: batched, each write fails alone, every acknowledged write is there."""

import asyncio

import pytest
from sqlalchemy import func, select
from sqlmodel import Session

from router.db import create_db_engine, migrate
from router.errors import Conflict, NotFound
from router.store import GroupWriter, add_decision, add_reward, load_decision
from router.tables import Decision, Reward


def _decision(i: int) -> Decision:
    return Decision(id=f"d{i}", kind="route", requested_model="auto", query="q", prompt_tokens_estimate=1,
                    policy="random", backend="a", propensity=0.5, decision_ms=1.0)


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
    await asyncio.gather(*(writer.submit(lambda s, i=i: add_decision(s, _decision(i), None)) for i in range(200)))
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
