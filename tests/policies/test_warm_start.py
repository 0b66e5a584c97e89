"""`Policy.warm_start`: imported history (every backend's outcome per prompt) seeds what the bandits know."""

import json

import numpy as np
import pytest

from policies import Arm, Context, HistoryPrompt, PolicyError, registry

WARM = ["thompson", "qlearning", "gradient", "vw", "elo", "auto", "forc", "hybrid", "mf"]  # forc, hybrid, mf: their fallback


def _vector(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).normal(size=16).astype(np.float32)
    return vector / np.linalg.norm(vector)


def _history(n: int = 60, qualities=None) -> list[HistoryPrompt]:
    qualities = qualities or {"cheap": 0.2, "strong": 0.9}
    return [HistoryPrompt(_vector(s), 20, dict(qualities), {"cheap": 1e-6, "strong": 2e-6}) for s in range(n)]


def _context(seed: int) -> Context:
    return Context(embedding=_vector(seed), prompt_tokens=20, arms=(Arm("cheap", 1, 1, 1e-6), Arm("strong", 1, 1, 2e-6)))


@pytest.mark.parametrize("name", WARM)
def test_a_warm_policy_prefers_the_backend_the_history_says_is_better_from_the_first_query(name):
    cold = registry.create(name, seed=0)
    warm = registry.create(name, seed=0)
    assert warm.warm_start(_history()) == 60
    first = [_context(1000 + s) for s in range(50)]
    warm_share = sum(warm.choose(c).arm == "strong" for c in first) / len(first)
    cold_share = sum(cold.choose(c).arm == "strong" for c in first) / len(first)
    assert warm_share >= 0.9 and warm_share > cold_share - 0.05
    stats = json.loads(json.dumps(warm.stats()))
    assert stats["warm_start_prompts"] == 60
    assert stats["arms"].get("strong", {}).get("feedback", 0) == 0  # history is not live feedback


@pytest.mark.parametrize("name", ["random", "fixed"])
def test_policies_without_a_warm_start_ignore_history(name):
    policy = registry.create(name, seed=0)
    before = json.dumps(policy.snapshot(), sort_keys=True)
    assert policy.warm_start(_history()) == 0
    assert json.dumps(policy.snapshot(), sort_keys=True) == before


@pytest.mark.parametrize("name", ["thompson", "elo", "qlearning"])
def test_history_outside_the_unit_interval_is_rejected_and_changes_nothing(name):
    policy = registry.create(name, seed=0)
    before = json.dumps(policy.snapshot(), sort_keys=True)
    with pytest.raises(PolicyError):
        policy.warm_start(_history(5) + [HistoryPrompt(_vector(9), 20, {"cheap": 1.5})])
    assert json.dumps(policy.snapshot(), sort_keys=True) == before


def test_warm_start_survives_a_snapshot():
    policy = registry.create("thompson", seed=0, clusters=4)
    policy.warm_start(_history())
    restored = registry.create("thompson", seed=0, clusters=4)
    restored.restore(json.loads(json.dumps(policy.snapshot())))
    assert restored.stats()["warm_start_prompts"] == 60
    assert restored.score(_context(5)).scores == policy.score(_context(5)).scores


def test_elo_warm_start_plays_every_pair_of_each_prompt():
    policy = registry.create("elo")
    policy.warm_start(_history(1, {"a": 1.0, "b": 0.0, "c": 0.5}))
    ratings = policy.stats()["internals"]["global_ratings"]
    assert ratings["a"] > ratings["c"] > ratings["b"]
    assert policy.stats()["internals"]["comparisons"] == 3


def test_thompson_with_clusters_learns_each_region_from_history():
    """Per-cluster priors: two kinds of query with opposite best backends."""
    policy = registry.create("thompson", seed=0, clusters=2, prior_strength=4)
    near_a, near_b = _vector(1), -_vector(1)
    history = [HistoryPrompt(near_a + 0.01 * _vector(s), 20, {"cheap": 0.9, "strong": 0.1}) for s in range(40)]
    history += [HistoryPrompt(near_b + 0.01 * _vector(s), 20, {"cheap": 0.1, "strong": 0.9}) for s in range(40)]
    policy.warm_start(history)
    arms = (Arm("cheap", 1, 1, 1e-6), Arm("strong", 1, 1, 2e-6))
    assert policy.score(Context(near_a, 20, arms)).probabilities["cheap"] > 0.9
    assert policy.score(Context(near_b, 20, arms)).probabilities["strong"] > 0.9
