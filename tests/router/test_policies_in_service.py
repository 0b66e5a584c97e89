"""All policies behind the service's service: restart restores them, shadows are evaluated, budget holds."""

import json
from pathlib import Path

import pytest

from policies import Arm, Context, registry
from router.config import load_config
from router.service import RouterService
from tests.conftest import backend_table, chat_request, free_port, route, write_config

ALL = registry.names()
PROMPTS = [json.loads(line) for line in (Path(__file__).parent.parent / "data" / "two_kinds.jsonl").read_text().splitlines()]


def _service(tmp_path, url, embedder, extra=""):
    backends = backend_table("cheap", free_port(), 0.1, 0.2) + backend_table("strong", free_port(), 3.0, 15.0)
    policies = ", ".join(f'"{p}"' for p in ALL)
    config = write_config(tmp_path / "c.toml", url, backends, f"policies = [{policies}]\nsnapshot_every = 15\n{extra}")
    return RouterService(load_config(config, environ={}), embedder=embedder)


def _request(text, **extra):
    return chat_request(text, **extra)


def _reward(kind, backend):
    return 0.9 if (kind, backend) in {("math", "strong"), ("code", "cheap")} else 0.2


def _probes(embedder):
    vectors = embedder.embed([PROMPTS[0]["prompt"], PROMPTS[-1]["prompt"], "A completely different question about birds."])
    arms = (Arm("cheap", 0.1, 0.2, 1e-5), Arm("strong", 3.0, 15.0, 4e-4))
    return [Context(embedding=v, prompt_tokens=60, arms=arms) for v in vectors]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request):
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


async def test_restart_restores_every_policy_from_snapshot_and_log(tmp_path, database_url, embedder):
    first = _service(tmp_path, database_url, embedder)
    for i, row in enumerate(PROMPTS[::3]):
        info = await route(first, _request(row["prompt"], router={"policy": ALL[i % len(ALL)]}))
        if i % 4 == 3:
            await first.feedback(info.decision_id, None, preference=("strong", "cheap"))
        else:
            await first.feedback(info.decision_id, None, reward=_reward(row["kind"], info.backend))
    for task in list(first._background):
        await task
    assert first.store.latest_snapshots(), "a periodic snapshot was written"
    probes = _probes(embedder)
    expected = {name: [p.score(c).scores for c in probes] for name, p in first.policies.items()}
    expected_shadow = first.engine.stats()["shadow"]
    first.db.dispose()  # no exit snapshot: the rewards after the last snapshot come back from the log

    second = _service(tmp_path, database_url, embedder)
    for name, policy in second.policies.items():
        restored = [policy.score(c).scores for c in probes]
        for got, want in zip(restored, expected[name]):
            assert got == pytest.approx(want, abs=1e-9), name
    assert second.engine.stats()["shadow"] == expected_shadow
    await second.close()


async def test_stats_show_shadow_estimates_budget_and_internals(tmp_path, sqlite_url, embedder):
    service = _service(tmp_path, sqlite_url, embedder, "[budget]\ntarget_usd_per_query = 0.0001\n")
    for row in PROMPTS[:30]:
        info = await route(service, _request(row["prompt"]))
        await service.feedback(info.decision_id, None, reward=_reward(row["kind"], info.backend))
    stats = await service.stats()
    assert set(stats["policies"]) == set(ALL)
    active = stats["policies"][stats["active_policy"]]
    assert active["shadow"]["rewards"] == 30 and active["shadow"]["matching_decisions"] == 30
    for name, entry in stats["policies"].items():
        assert entry["shadow"]["rewards"] == 30, name
        assert entry["shadow"]["matching_decisions"] <= 30
        assert entry["internals"] is not None
    assert "q_values" in stats["policies"]["qlearning"]["internals"]
    assert "ratings" in json.dumps(stats["policies"]["elo"]["internals"])
    assert stats["budget"]["target_usd_per_query"] == 0.0001 and stats["budget"]["queries"] == 30
    assert stats["budget"]["lambda"] >= 0
    await service.close()


async def test_cap_is_never_exceeded_by_any_policy(tmp_path, sqlite_url, embedder):
    service = _service(tmp_path, sqlite_url, embedder)
    prompt = "Explain photosynthesis in detail. " * 30
    for name in ALL:
        for _ in range(5):
            info = await route(service, _request(prompt, max_tokens=200, router={"policy": name, "max_cost_usd": 0.001}))
            assert info.predicted_cost_usd <= 0.001 and info.backend == "cheap", name
    await service.close()


async def test_active_policy_switch(tmp_path, sqlite_url, embedder):
    service = _service(tmp_path, sqlite_url, embedder)
    service.set_active_policy("elo")
    assert (await route(service, _request("hi"))).policy == "elo"
    await service.close()
