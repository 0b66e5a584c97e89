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
    # expected score of 1016 against 984: 1 / (1 + 10^(-32/400)) = 0.545922; 32 * (1 - 0.545922) = 14.5305
    assert _ratings(policy) == pytest.approx({"a": 1030.5305, "b": 969.4695}, abs=1e-3)
    assert policy.stats()["internals"]["comparisons"] == 2


def test_initial_rating_and_k_factor_are_options():
    policy = registry.create("elo", initial_rating=1500, k_factor=10)
    policy.learn_preference(_context(), "b", "a")
    assert _ratings(policy) == {"a": 1495.0, "b": 1505.0}


def test_scalar_reward_plays_neighbours_on_other_arms_weighted_by_similarity_and_importance():
    neighbours = [
        Neighbour("d1", "b", 1.0, 0.5),  # 0.8 > 0.5 + margin: a wins, full K
        Neighbour("d2", "a", 1.0, 0.1),  # same arm: no game
        Neighbour("d3", "c", 0.5, 0.78),  # within margin: draw, K halved by similarity
        Neighbour("d4", "d", 1.0, None),  # no reward yet: no game
    ]
    policy = registry.create("elo")
    policy.learn(Feedback(_context(("a", "b", "c", "d"), neighbours), "a", 0.8, 0.5))
    # a vs b: +16 / -16. a (1016) vs c (1000), draw, K=16: 16 * (0.5 - 0.523010) = -0.3682
    assert _ratings(policy) == pytest.approx({"a": 1015.6318, "b": 984.0, "c": 1000.3682}, abs=1e-3)

    weighted = registry.create("elo")
    weighted.learn(Feedback(_context(("a", "b"), [Neighbour("d1", "b", 1.0, 0.9)]), "a", 0.2, 0.5, weight=2.0))
    assert _ratings(weighted) == {"a": 968.0, "b": 1032.0}  # a loses, K doubled by the importance weight


def test_without_neighbours_a_reward_plays_the_other_arms_mean_reward():
    policy = registry.create("elo")
    policy.learn(Feedback(_context(), "a", 0.3, 0.5))  # nothing to compare with yet
    assert _ratings(policy) == {}
    policy.learn(Feedback(_context(), "b", 0.9, 0.5))
    assert _ratings(policy) == {"a": 984.0, "b": 1016.0}


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
    # a beats b (1016/984); b's preference: b (984) beats c (1000), 32 * (1 - 0.476990) = 16.7363;
    # a (1016) beats b (1000.7363): 32 * (1 - 0.521952) = 15.2975
    assert local == pytest.approx({"a": 1031.2975, "b": 985.4388, "c": 983.2637}, abs=1e-3)


def test_local_ratings_follow_the_neighbours_when_p_is_small():
    neighbours = [Neighbour(f"d{i}", arm, 0.9, reward) for i, (arm, reward) in enumerate([("b", 0.9), ("a", 0.1)] * 3)]
    for global_weight, expected in [(0.1, "b"), (1.0, "a")]:
        policy = registry.create("elo", seed=0, global_weight=global_weight)
        for _ in range(3):
            policy.learn_preference(_context(), "a", "b")  # globally a leads
        choice = policy.choose(_context(neighbours=neighbours))
        assert max(choice.scores, key=choice.scores.get) == expected
        assert choice.probabilities[expected] == pytest.approx(0.975)


def test_cold_start_ties_and_probabilities_are_the_sampling_distribution():
    policy = registry.create("elo", seed=0, epsilon=0.3)
    choice = policy.choose(_context(("a", "b", "c")))
    assert choice.probabilities == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    picks = {policy.choose(_context(("a", "b", "c"))).arm for _ in range(50)}
    assert picks == {"a", "b", "c"}  # ties broken at random

    policy.learn_preference(_context(), "a", "b")
    choice = policy.choose(_context(("a", "b", "c")))
    assert choice.probabilities == pytest.approx({"a": 0.8, "b": 0.1, "c": 0.1})  # 0.7 greedy + 0.3 / 3
    counts = [policy.choose(_context(("a", "b", "c"))).arm for _ in range(3000)]
    assert counts.count("b") == pytest.approx(300, abs=60)


def test_score_is_expected_score_against_the_mean_rating_minus_the_cost_penalty():
    policy = registry.create("elo", global_weight=1.0)
    policy.learn_preference(_context(), "a", "b")  # 1016 / 984, mean 1000
    choice = policy.choose(_context(cost_weight=1.0, costs={"a": 0.1, "b": 0.0}))
    # a: 1 / (1 + 10^(-16/400)) = 0.523010, minus lambda * cost = 0.1; b: 0.476990
    assert choice.scores == pytest.approx({"a": 0.423010, "b": 0.476990}, abs=1e-6)
    assert choice.probabilities["b"] == pytest.approx(0.975)


def test_snapshot_keeps_ratings_comparisons_and_fallback_means():
    policy = registry.create("elo")
    policy.learn(Feedback(_context(), "a", 0.3, 0.5))
    policy.learn_preference(_context(), "b", "a")
    restored = registry.create("elo")
    restored.restore(policy.snapshot())
    assert restored.stats()["internals"] == policy.stats()["internals"]
    restored.learn(Feedback(_context(), "b", 0.9, 0.5))  # plays a's restored mean reward
    assert restored.stats()["internals"]["comparisons"] == 2


@pytest.mark.parametrize(
    "options",
    [
        {"global_weight": 1.5},
        {"global_weight": -0.1},
        {"k_factor": 0},
        {"neighbours": -1},
        {"neighbours": 2.5},
        {"initial_rating": float("inf")},
        {"epsilon": 0.0},
        {"epsilon": 1.5},
        {"margin": 1.0},
        {"colour": "red"},
    ],
)
def test_bad_option_is_rejected(options):
    with pytest.raises(PolicyError):
        registry.create("elo", **options)
