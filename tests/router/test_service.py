"""The service on the real embedder and a real database, without generation (no backend is called)."""

import asyncio
import json

import pytest

from policies import registry
from router.config import load_config
from router.errors import BadRequest, Conflict, NotFound
from router.service import RouterService
from tests.conftest import backend_table, chat_request, free_port, route, write_config

MATH = [
    "What is 17 times 23?",
    "Solve for x: 3x + 5 = 20.",
    "Compute the derivative of x^3 + 2x.",
    "What is the square root of 144?",
]
POETRY = [
    "Write a short poem about the autumn sea.",
    "Compose a haiku about falling snow.",
    "Write a sonnet about lost love.",
    "A limerick about a cat who loves jazz, please.",
]


def _request(text: str, **extra):
    return chat_request(text, **extra)


def _service(tmp_path, url, embedder, **extra_config) -> RouterService:
    backends = backend_table("cheap", free_port(), 0.1, 0.2) + backend_table("strong", free_port(), 3.0, 15.0)
    extra = "\n".join(f"{k} = {v!r}" for k, v in extra_config.items())
    return RouterService(load_config(write_config(tmp_path / "c.toml", url, backends, extra), environ={}), embedder=embedder)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


async def test_restart_keeps_memory_and_learning(tmp_path, database_url, embedder):
    first = _service(tmp_path, database_url, embedder)
    decisions = {}
    for text in MATH + POETRY:
        info = await route(first, _request(text))
        decisions[text] = info
        await first.feedback(info.decision_id, None, reward=1.0 if text in MATH else 0.0)
    before = first.memory.search(await first.embed("What is 12 times 12?"), 3)
    q_values = first.policies["qlearning"].stats()["internals"]["q_values"]
    await first.close()

    second = _service(tmp_path, database_url, embedder)
    assert len(second.memory) == len(MATH) + len(POETRY)
    after = second.memory.search(await second.embed("What is 12 times 12?"), 3)
    assert [n.decision_id for n in after] == [n.decision_id for n in before]
    assert all(n.reward == 1.0 for n in after), "the nearest queries are the rewarded math ones"
    assert {n.decision_id for n in after} <= {decisions[t].decision_id for t in MATH}
    assert second.policies["qlearning"].stats()["internals"]["q_values"] == q_values
    await second.close()


async def test_neighbours_reach_the_policy_context(tmp_path, sqlite_url, embedder):
    service = _service(tmp_path, sqlite_url, embedder)
    for text in POETRY:
        await route(service, _request(text))
    neighbours = service.memory.search(await service.embed("Write a poem about the moon."), 2)
    assert len(neighbours) == 2 and all(n.similarity > 0.2 for n in neighbours)
    await service.close()


async def test_cap_is_respected_and_over_budget_takes_the_cheapest(tmp_path, sqlite_url, embedder):
    service = _service(tmp_path, sqlite_url, embedder)
    prompt = "Explain photosynthesis. " * 40
    for _ in range(10):
        info = await route(service, _request(prompt, max_tokens=100, router={"max_cost_usd": 0.0005}))
        assert info.backend == "cheap" and not info.over_budget
        assert info.predicted_cost_usd <= 0.0005
    info = await route(service, _request(prompt, max_tokens=100, router={"max_cost_usd": 1e-9}))
    assert info.backend == "cheap" and info.over_budget
    await service.close()


async def test_bad_feedback_is_rejected_and_changes_nothing(tmp_path, sqlite_url, embedder):
    service = _service(tmp_path, sqlite_url, embedder, policies=registry.names())
    info = await route(service, _request("hello there"))

    def state():
        return {name: json.dumps(p.snapshot(), sort_keys=True) for name, p in service.policies.items()}

    before = state()
    with pytest.raises(NotFound):
        await service.feedback("dec_missing", None, reward=0.5)
    with pytest.raises(BadRequest):
        await service.feedback(info.decision_id, None, preference=("cheap", "nope"))
    assert state() == before
    first = await service.feedback(info.decision_id, None, reward=0.25)
    again = await service.feedback(info.decision_id, None, reward=0.25)
    assert not first.duplicate and again.duplicate
    learned = state()
    assert all(learned[name] != before[name] for name in ("qlearning", "gradient", "vw", "elo"))
    with pytest.raises(Conflict):
        await service.feedback(info.decision_id, None, reward=0.75)
    assert state() == learned
    stats = await service.stats()
    assert stats["backends"][info.backend]["rewards"] == 1
    assert stats["backends"][info.backend]["mean_reward"] == 0.25
    await service.close()


async def test_unknown_policy_and_backend_are_rejected(tmp_path, sqlite_url, embedder):
    service = _service(tmp_path, sqlite_url, embedder)
    with pytest.raises(BadRequest, match="unknown policy"):
        await route(service, _request("hi", router={"policy": "nope"}))
    with pytest.raises(NotFound, match="unknown backend"):
        await route(service, _request("hi", model="gpt-9"))
    await service.close()


async def test_concurrent_decisions_are_all_logged(tmp_path, sqlite_url, embedder):
    service = _service(tmp_path, sqlite_url, embedder)
    infos = await asyncio.gather(*(route(service, _request(f"question number {i}")) for i in range(20)))
    assert len({i.decision_id for i in infos}) == 20
    stats = await service.stats()
    assert sum(b["decisions"] for b in stats["backends"].values()) == 20
    await service.close()
