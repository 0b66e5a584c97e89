"""ELO-specific behaviour of the `elo` policy (Eagle): hand-checked rating updates and local ratings."""

import numpy as np
import pytest

from policies import Arm, Context, Feedback, Neighbour, PolicyError, registry


def _context(arms=("a", "b"), neighbours=(), cost_weight=0.0, costs=None) -> Context:
    costs = costs or {}
    return Context(
        embedding=np.ones(4, np.float32) / 2,
        prompt_tokens=10,
        arms=tuple(Arm(name, 1.0, 1.0, costs.get(name, 0.0)) for name in arms),
        neighbours=tuple(neighbours),
        cost_weight=cost_weight,
    )


def _ratings(policy) -> dict[str, float]:
    return policy.stats()["internals"]["global_ratings"]


def test_preference_moves_winner_up_and_loser_down_by_the_elo_formula():
    policy = registry.create("elo")
    policy.learn_preference(_context(), "a", "b")
    assert _ratings(policy) == {"a": 1016.0, "b": 984.0}  # K=32 from equal ratings: +-K/2
    policy.learn_preference(_context(), "a", "b")
    # K shrinks with evidence: 32 * 20 / (20 + 1) = 30.4762; expected score of 1016 against 984 is
    # 1 / (1 + 10^(-32/400)) = 0.545922; 30.4762 * (1 - 0.545922) = 13.8389
    assert _ratings(policy) == pytest.approx({"a": 1029.8389, "b": 970.1611}, abs=1e-3)
    assert policy.stats()["internals"]["comparisons"] == 2


def test_k_shrinks_as_one_over_the_evidence_and_the_spread_with_its_square_root():
    policy = registry.create("elo", k_factor=32, settle_games=20, uncertainty=120)
    assert policy.k("a") == 32 and policy.spread("a") == 120
    for _ in range(60):
        policy.learn(Feedback(_context(), "a", 0.5, 0.5))
    assert policy.k("a") == pytest.approx(32 * 20 / 80)
    assert policy.spread("a") == pytest.approx(120 / 61**0.5)
    assert policy.k("b") == 32  # an arm never seen keeps its full step and spread


def test_initial_rating_and_k_factor_are_options():
    policy = registry.create("elo", initial_rating=1500, k_factor=10)
    policy.learn_preference(_context(), "b", "a")
    assert _ratings(policy) == {"a": 1495.0, "b": 1505.0}


def test_scalar_rewards_are_soft_games_against_neighbours_weighted_by_similarity_and_importance():
    neighbours = [
        Neighbour("d1", "b", 1.0, 0.5),  # a scores 0.5 + (0.8 - 0.5) / 2 = 0.65
        Neighbour("d2", "a", 1.0, 0.1),  # same arm: no game
        Neighbour("d3", "c", 0.5, 0.78),  # a scores 0.51, at half the weight of d1 (similarity)
        Neighbour("d4", "d", 1.0, None),  # no reward yet: no game
    ]
    policy = registry.create("elo")
    policy.learn(Feedback(_context(("a", "b", "c", "d"), neighbours), "a", 0.8, 0.5))
    # one reward is one observation: K = 32 is shared by its games in proportion to similarity (1 : 0.5), and
    # only a moves (the neighbours' rewards were counted when they came). a vs b: 21.3333 * 0.15 = 3.2;
    # a (1003.2) vs c: expected 0.504605, 10.6667 * (0.51 - 0.504605) = 0.0575
    assert _ratings(policy) == pytest.approx({"a": 1003.2575, "b": 1000.0, "c": 1000.0}, abs=1e-3)

    weighted = registry.create("elo")
    weighted.learn(Feedback(_context(("a", "b"), [Neighbour("d1", "b", 1.0, 0.9)]), "a", 0.2, 0.5, weight=2.0))
    assert _ratings(weighted) == pytest.approx({"a": 977.6, "b": 1000.0})  # a scores 0.15; K doubled: 64 * -0.35


def test_outcome_is_the_soft_score_with_an_optional_dead_zone():
    policy = registry.create("elo")
    assert [policy.outcome(1, 0), policy.outcome(0, 1), policy.outcome(1, 1)] == [1.0, 0.0, 0.5]  # 0/1 rewards: win, loss, draw
    assert policy.outcome(0.9, 0.3) == pytest.approx(0.8)
    assert registry.create("elo", margin=0.05).outcome(0.52, 0.5) == 0.5


def test_without_neighbours_a_reward_plays_the_other_arms_mean_reward():
    policy = registry.create("elo")
    policy.learn(Feedback(_context(), "a", 0.3, 0.5))  # nothing to compare with yet
    assert _ratings(policy) == {}
    policy.learn(Feedback(_context(), "b", 0.9, 0.5))
    # b scores 0.8 against a's mean 0.3: b moves by 32 * 0.3; a's mean was counted when a was rewarded
    assert _ratings(policy) == pytest.approx({"a": 1000.0, "b": 1009.6}, abs=1e-3)


def test_local_ratings_replay_neighbour_pairs_and_preferences_from_the_initial_rating():
    policy = registry.create("elo", neighbours=3)
    policy.learn_preference(_context(), "c", "a")  # global ratings do not seed the local ones
    neighbours = (
        Neighbour("d1", "a", 0.9, 0.9),
        Neighbour("d2", "b", 0.8, 0.2, preference=("b", "c")),
        Neighbour("d3", "a", 0.7, 0.92),  # same arm as d1: no game between them
        Neighbour("d4", "c", 0.6, 0.0),  # beyond N=3: ignored
    )
    local = policy.local_ratings(neighbours)
    # a beats b, score 0.85: 1011.2 / 988.8; b's preference: b (988.8) beats c (1000): 32 * (1 - 0.483886) = 16.5156;
    # b (1005.3156) scores 0.14 against a (1011.2): 32 * (0.14 - 0.491533) = -11.2491
    assert local == pytest.approx({"a": 1022.4491, "b": 994.0666, "c": 983.4844}, abs=1e-3)


def test_local_ratings_follow_the_neighbours_when_p_is_small():
    neighbours = [Neighbour(f"d{i}", arm, 0.9, reward) for i, (arm, reward) in enumerate([("b", 0.9), ("a", 0.1)] * 3)]
    for global_weight, expected in [(0.1, "b"), (1.0, "a")]:
        policy = registry.create("elo", seed=0, global_weight=global_weight)
        for _ in range(3):
            policy.learn_preference(_context(), "a", "b")  # globally a leads
        choice = policy.choose(_context(neighbours=neighbours))
        assert max(choice.scores, key=choice.scores.get) == expected
        assert choice.probabilities[expected] > 0.5


def test_cold_start_is_uniform_and_probabilities_are_the_sampling_distribution():
    policy = registry.create("elo", seed=0, propensity_samples=4000)
    choice = policy.choose(_context(("a", "b", "c")))
    assert choice.probabilities == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, abs=0.03)
    for _ in range(5):
        policy.learn_preference(_context(), "a", "b")
    choice = policy.choose(_context(("a", "b", "c")))
    assert choice.probabilities["a"] > choice.probabilities["c"] > choice.probabilities["b"]
    counts = [policy.choose(_context(("a", "b", "c"))).arm for _ in range(3000)]
    for arm in "abc":
        assert counts.count(arm) / 3000 == pytest.approx(choice.probabilities[arm], abs=0.035)


def test_exploration_fades_with_evidence_but_a_seldom_tried_arm_keeps_being_tried():
    policy = registry.create("elo", seed=0)
    for _ in range(400):
        context = _context(("a", "b", "c"))
        choice = policy.choose(context)
        reward = {"a": 0.8, "b": 0.6, "c": 0.3}[choice.arm]
        policy.learn(Feedback(context, choice.arm, reward, choice.propensity))
    probabilities = policy.score(_context(("a", "b", "c"))).probabilities
    assert probabilities["a"] > 0.9
    assert min(probabilities.values()) >= 0.99e-3  # the floor (renormalised)
    wider = policy.score(_context(("a", "b", "c", "new"))).probabilities
    assert wider["new"] > 0.05  # a new backend is uncertain, so it is tried


def test_score_is_expected_score_against_the_mean_rating_minus_the_cost_penalty():
    policy = registry.create("elo", global_weight=1.0)
    policy.learn_preference(_context(), "a", "b")  # 1016 / 984, mean 1000
    choice = policy.choose(_context(cost_weight=1.0, costs={"a": 0.1, "b": 0.0}))
    # a: 1 / (1 + 10^(-16/400)) = 0.523010, minus lambda * cost = 0.1; b: 0.476990
    assert choice.scores == pytest.approx({"a": 0.423010, "b": 0.476990}, abs=1e-6)
    assert choice.probabilities["b"] > choice.probabilities["a"]


def test_snapshot_keeps_ratings_comparisons_and_fallback_means():
    policy = registry.create("elo")
    policy.learn(Feedback(_context(), "a", 0.3, 0.5))
    policy.learn_preference(_context(), "b", "a")
    restored = registry.create("elo")
    restored.restore(policy.snapshot())
    assert restored.stats()["internals"] == policy.stats()["internals"]
    restored.learn(Feedback(_context(), "b", 0.9, 0.5))  # plays a's restored mean reward
    assert restored.stats()["internals"]["comparisons"] == 2
    assert restored.k("a") == policy.k("a") < 32  # the evidence behind each rating is restored too


@pytest.mark.parametrize(
    "options",
    [
        {"global_weight": 1.5},
        {"global_weight": -0.1},
        {"k_factor": 0},
        {"neighbours": -1},
        {"neighbours": 2.5},
        {"initial_rating": float("inf")},
        {"epsilon": -0.1},
        {"epsilon": 1.5},
        {"uncertainty": -1},
        {"settle_games": 0},
        {"propensity_samples": 0},
        {"margin": 1.0},
        {"colour": "red"},
    ],
)
def test_bad_option_is_rejected(options):
    with pytest.raises(PolicyError):
        registry.create("elo", **options)
