"""One conformance test over every registered policy: the contract every policy must keep."""

import json

import numpy as np
import pytest

from policies import Arm, Context, Feedback, PolicyError, registry

NON_LEARNING = {"random"}


def _context(arms=("cheap", "strong"), seed=0):
    rng = np.random.default_rng(seed)
    vector = rng.normal(size=16).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return Context(
        embedding=vector,
        prompt_tokens=20,
        arms=tuple(Arm(name, 0.1 * (i + 1), 0.2 * (i + 1), 1e-6 * (i + 1)) for i, name in enumerate(arms)),
    )


@pytest.fixture(params=registry.names())
def policy(request):
    return registry.create(request.param, seed=3)


def test_choice_is_a_candidate_with_a_valid_propensity(policy):
    for seed in range(50):
        context = _context(seed=seed)
        choice = policy.choose(context)
        assert choice.arm in context.arm_names
        assert 0.0 < choice.propensity <= 1.0
        assert set(choice.scores) == set(context.arm_names)


def test_no_candidates_is_an_error(policy):
    with pytest.raises(PolicyError):
        policy.choose(Context(embedding=np.zeros(16, np.float32), prompt_tokens=1, arms=()))


@pytest.mark.parametrize("reward", [-0.1, 1.5, float("nan")])
def test_reward_outside_unit_interval_is_rejected_and_changes_nothing(policy, reward):
    before = json.dumps(policy.snapshot(), sort_keys=True)
    with pytest.raises(PolicyError):
        policy.learn(Feedback(_context(), "cheap", reward, 0.5))
    assert json.dumps(policy.snapshot(), sort_keys=True) == before


@pytest.mark.parametrize("name", [n for n in registry.names() if n not in NON_LEARNING])
def test_learns_which_backend_is_better(name):
    policy = registry.create(name, seed=3)
    picks = []
    for step in range(400):
        context = _context(seed=step)
        choice = policy.choose(context)
        reward = 0.9 if choice.arm == "strong" else 0.2
        policy.learn(Feedback(context, choice.arm, reward, choice.propensity))
        picks.append(choice.arm)
    assert picks[-100:].count("strong") >= 80


def test_new_backend_at_run_time_is_accepted(policy):
    for step in range(20):
        context = _context(seed=step)
        choice = policy.choose(context)
        policy.learn(Feedback(context, choice.arm, 0.5, choice.propensity))
    wider = _context(arms=("cheap", "strong", "new"))
    assert policy.choose(wider).arm in wider.arm_names


def test_snapshot_restores_the_same_choices(policy):
    for step in range(30):
        context = _context(seed=step)
        choice = policy.choose(context)
        policy.learn(Feedback(context, choice.arm, 1.0 if choice.arm == "strong" else 0.0, choice.propensity))
    snapshot = json.loads(json.dumps(policy.snapshot()))
    restored = registry.create(policy.name, seed=99)
    restored.restore(snapshot)
    contexts = [_context(seed=100 + i) for i in range(20)]
    assert [restored.choose(c).arm for c in contexts] == [policy.choose(c).arm for c in contexts]


def test_stats_are_json_and_count_pulls(policy):
    context = _context()
    choice = policy.choose(context)
    policy.learn(Feedback(context, choice.arm, 1.0, choice.propensity))
    stats = json.loads(json.dumps(policy.stats()))
    assert stats["name"] == policy.name
    assert stats["arms"][choice.arm]["pulls"] == 1
    assert stats["arms"][choice.arm]["feedback"] == 1
    assert stats["arms"][choice.arm]["mean_reward"] == 1.0


def test_unknown_policy_name_is_rejected():
    with pytest.raises(PolicyError, match="unknown policy"):
        registry.create("nope")


def test_bad_option_is_rejected():
    with pytest.raises(PolicyError):
        registry.create("epsilon_greedy", epsilon=2.0)
