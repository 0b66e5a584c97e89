"""`auto`: exact mixture propensities, following the member that does best (and saying why), judging
members from another policy's log, aliases, options, warm starts."""

import json
from collections import Counter

import numpy as np
import pytest

from policies import Arm, Context, Feedback, HistoryPrompt, PolicyError, registry

ARMS = ("cheap", "strong")
FIXED_PAIR = {
    "members": ["always-cheap", "always-strong"],
    "member_options": {"always-cheap": {"policy": "fixed", "backend": "cheap"},
                       "always-strong": {"policy": "fixed", "backend": "strong"}},
}


def _context(seed: int = 0, arms=ARMS) -> Context:
    vector = np.random.default_rng(seed).normal(size=16).astype(np.float32)
    return Context(embedding=vector / np.linalg.norm(vector), prompt_tokens=20,
                   arms=tuple(Arm(name, 1.0, 1.0, 1e-6) for name in arms))


def test_probabilities_are_the_mixture_of_the_members_and_the_draw_follows_them():
    policy = registry.create("auto", seed=0, **FIXED_PAIR)
    q, _ = policy.shares()
    assert q == pytest.approx([0.5, 0.5], abs=0.05)  # nothing known: each member equally likely the best
    choice = policy.choose(_context())
    members = {name: m.score(_context()).probabilities for name, m in policy.members.items()}
    assert sum(choice.probabilities.values()) == pytest.approx(1.0)
    for arm in ARMS:  # P(a) = sum_m q_m p_m(a): fixed members put all their mass on one backend each
        assert choice.probabilities[arm] == pytest.approx(sum(0.5 * p[arm] for p in members.values()), abs=0.05)
    picks = Counter(policy.choose(_context(seed=s)).arm for s in range(2000))
    assert picks["cheap"] / 2000 == pytest.approx(choice.probabilities["cheap"], abs=0.05)


def test_follows_the_member_that_earns_more_and_keeps_exploring_the_other():
    policy = registry.create("auto", seed=1, **FIXED_PAIR)
    for step in range(400):
        context = _context(seed=step)
        choice = policy.choose(context)
        reward = 0.8 if choice.arm == "strong" else 0.3
        policy.learn(Feedback(context, choice.arm, reward, choice.propensity))
    choice = policy.score(_context(seed=999))
    assert choice.probabilities["strong"] > 0.95
    assert choice.probabilities["cheap"] >= policy.exploration / 2 * 0.99  # each member keeps its share
    internals = json.loads(json.dumps(policy.stats()["internals"]))
    assert internals["following"] == "always-strong"
    strong, cheap = internals["members"]["always-strong"], internals["members"]["always-cheap"]
    # the seldom-followed member is judged on few, heavily weighted rewards: unbiased, but wide
    assert strong["estimate"] == pytest.approx(0.8, abs=0.05) and cheap["estimate"] < 0.6
    assert strong["interval_95"][0] > cheap["interval_95"][1]
    assert strong["p_best"] > 0.99 and "always-strong" in internals["why"]


def test_close_members_are_not_told_apart_on_noise():
    """Two members equally good: neither gets more than its fair share (the bound, not the noise, decides)."""
    options = {"members": ["always-cheap", "always-strong"], "member_options": FIXED_PAIR["member_options"]}
    policy = registry.create("auto", seed=2, **options)
    rng = np.random.default_rng(0)
    for step in range(300):
        context = _context(seed=step)
        choice = policy.choose(context)
        policy.learn(Feedback(context, choice.arm, float(rng.random() < 0.5), choice.propensity))
    _, best = policy.shares()
    assert max(best) < 0.97


def test_judges_members_from_another_policys_log():
    """As a shadow: the logging propensity is another policy's, each member is judged by p_m(a) / p_log(a)."""
    policy = registry.create("auto", seed=3, **FIXED_PAIR)
    rng = np.random.default_rng(0)
    for step in range(400):
        context = _context(seed=step)
        policy.score(context)  # a shadow scores every decision too
        arm = ARMS[int(rng.integers(2))]  # a uniform logger
        policy.learn(Feedback(context, arm, 0.9 if arm == "strong" else 0.1, 0.5, weight=1.0))
    mean, _ = policy.estimates()
    assert mean == pytest.approx([0.1, 0.9], abs=0.08)
    # a reward whose decision auto never scored (e.g. replayed after a restart) is judged the same way
    policy.learn(Feedback(_context(seed=10_000), "strong", 1.0, 0.5))
    assert policy.stats()["internals"]["rewards_judged"] == pytest.approx(401)


def test_judging_is_the_same_when_the_log_is_replayed_after_a_restart():
    """The estimates depend on the rewards and what the members learnt, not on the decisions' random draws."""
    live = registry.create("auto", seed=5, members=["thompson", "elo", "qlearning"])
    snapshot, replayed = None, None
    for step in range(60):
        context = _context(seed=step)
        choice = live.choose(context)
        live.learn(Feedback(context, choice.arm, 0.9 if choice.arm == "strong" else 0.2, choice.propensity))
        if step == 29:
            snapshot = json.loads(json.dumps(live.snapshot()))
            replayed = []
        elif replayed is not None:
            replayed.append((context, choice))
    restored = registry.create("auto", seed=5, members=["thompson", "elo", "qlearning"])
    restored.restore(snapshot)
    for context, choice in replayed:  # the log: rewards only, no decisions
        restored.learn(Feedback(context, choice.arm, 0.9 if choice.arm == "strong" else 0.2, choice.propensity))
    assert restored.estimates()[0] == pytest.approx(live.estimates()[0], abs=1e-12)
    probe = _context(seed=777)
    assert restored.score(probe).scores == live.score(probe).scores


def test_every_member_learns_from_every_reward_and_preference():
    policy = registry.create("auto", seed=4, members=["thompson", "elo"])
    context = _context()
    policy.learn(Feedback(context, "strong", 1.0, 0.5))
    policy.learn_preference(context, "strong", "cheap")
    assert policy.members["thompson"].stats()["arms"]["strong"]["feedback"] == 1
    assert policy.members["elo"].stats()["internals"]["comparisons"] == 1


def test_default_members_are_the_supported_bandits_and_thompson_per_cluster():
    policy = registry.create("auto", seed=0)
    assert policy.names == ["thompson", "thompson-clusters", "qlearning", "vw", "elo", "gradient"]
    assert policy.members["thompson-clusters"].clusters.n_clusters == 16
    assert all(registry.get(name).maturity == "supported" for name in ("thompson", "qlearning", "vw", "elo", "gradient"))


def test_warm_start_reaches_every_member():
    policy = registry.create("auto", seed=0, members=["thompson", "qlearning"])
    history = [HistoryPrompt(_context(seed=s).embedding, 20, {"cheap": 0.2, "strong": 0.9}) for s in range(30)]
    assert policy.warm_start(history) == 30
    assert all(m.stats()["warm_start_prompts"] == 30 for m in policy.members.values())
    assert policy.choose(_context()).probabilities["strong"] > 0.9


@pytest.mark.parametrize(
    "options",
    [
        {"members": []},
        {"members": ["thompson", "thompson"]},
        {"members": ["auto"]},
        {"members": ["nope"]},
        {"members": ["alias"], "member_options": {"alias": {"policy": "auto"}}},
        {"members": ["thompson"], "member_options": {"elo": {}}},
        {"exploration": 0.0},
        {"exploration": 1.5},
        {"samples": 0},
        {"half_life": -1},
        {"max_ratio": 0.5},
        {"members": ["thompson"], "member_options": {"thompson": {"noise": -1}}},
    ],
)
def test_bad_option_is_rejected(options):
    with pytest.raises(PolicyError):
        registry.create("auto", **options)


def test_restore_refuses_a_snapshot_of_other_members():
    snapshot = registry.create("auto", members=["thompson", "elo"]).snapshot()
    with pytest.raises(PolicyError, match="members"):
        registry.create("auto", members=["thompson", "vw"]).restore(snapshot)
