"""VW-specific behaviour of the `vw` policy: persistence across processes, options, label sign, features."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from policies import Arm, Context, Feedback, PolicyError, registry

ROOT = Path(__file__).resolve().parents[2]


def _context(seed: int, arms=("cheap", "strong"), dim: int = 384, cost_weight: float = 0.0) -> Context:
    vector = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return Context(
        embedding=vector / np.linalg.norm(vector),
        prompt_tokens=40,
        arms=tuple(Arm(name, 1.0, 2.0, 1e-5 * (i + 1)) for i, name in enumerate(arms)),
        cost_weight=cost_weight,
        cost_scale=1e-5,
    )


def _train(policy, steps: int, rewards: dict[str, float], arms=("cheap", "strong"), start: int = 0) -> list[str]:
    picks = []
    for step in range(start, start + steps):
        context = _context(step, arms)
        choice = policy.choose(context)
        policy.learn(Feedback(context, choice.arm, rewards[choice.arm], choice.propensity))
        picks.append(choice.arm)
    return picks


def continue_run(policy) -> dict:
    """What a policy does next: 30 more learning steps, then its scores on fresh queries (run in both processes)."""
    picks = _train(policy, 30, {"cheap": 0.3, "strong": 0.8}, start=1000)
    return {"picks": picks, "scores": [policy.score(_context(2000 + i)).scores for i in range(5)]}


def test_snapshot_restored_in_a_fresh_process_learns_on_identically():
    policy = registry.create("vw", seed=4)
    _train(policy, 40, {"cheap": 0.3, "strong": 0.8})
    snapshot = json.dumps(policy.snapshot())
    script = (
        "import json, sys\n"
        "from policies import registry\n"
        "from tests.policies.test_vw import continue_run\n"
        # other options than the snapshot's, which replace them
        "policy = registry.create('vw', seed=99, exploration='epsilon', quadratic=False)\n"
        "policy.restore(json.loads(sys.stdin.read()))\n"
        "print(json.dumps(continue_run(policy)))\n"
    )
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, input=snapshot, capture_output=True, text=True, cwd=ROOT, check=True)
    assert json.loads(done.stdout) == json.loads(json.dumps(continue_run(policy)))
    assert policy.stats()["internals"]["examples_learned"] == 70


@pytest.mark.parametrize(
    "options",
    [{"exploration": "ucb"}, {"epsilon": 1.5}, {"gamma_scale": 0}, {"learning_rate": -0.1},
     {"learning_rate": float("inf")}, {"quadratic": "yes"}, {"passes": 3}, {"max_importance_weight": 0}],
)
def test_bad_option_is_rejected(options):
    with pytest.raises(PolicyError):
        registry.create("vw", **options)


def test_options_reach_vw():
    squarecb = registry.create("vw", gamma_scale=50, learning_rate=0.25).stats()["internals"]["arguments"]
    assert "--squarecb" in squarecb and "--gamma_scale 50" in squarecb and "--learning_rate 0.25" in squarecb
    assert "--quadratic ea --quadratic pa" in squarecb
    policy = registry.create("vw", exploration="epsilon", epsilon=0.2, quadratic=False)
    arguments = policy.stats()["internals"]["arguments"]
    assert "--epsilon 0.2" in arguments and "--squarecb" not in arguments and "--quadratic" not in arguments
    _train(policy, 50, {"cheap": 0.1, "strong": 0.9})
    # epsilon-greedy: the greedy arm gets 1 - eps + eps/K, the other eps/K (which arm is greedy after 50
    # steps depends on VW's exploration draws, so only the split is asserted: squarecb would not give it)
    probabilities = policy.score(_context(500)).probabilities
    assert sorted(probabilities.values()) == pytest.approx([0.1, 0.9], abs=1e-6)


def test_scores_are_the_predicted_utility_and_the_better_backend_wins():
    policy = registry.create("vw", seed=2)
    picks = _train(policy, 300, {"cheap": 0.2, "strong": 0.9})
    assert picks[-100:].count("strong") >= 90
    scores = policy.score(_context(999)).scores
    assert scores["strong"] == pytest.approx(0.9, abs=0.1)  # -(VW's cost), the cost being -reward
    assert scores["cheap"] < scores["strong"] - 0.3


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_rare_logged_choice_moves_the_model_more_than_a_likely_one(position):
    """The propensity sets the sample's weight wherever the backend is listed (VW 9 keeps the label's
    probability on the last action line only; at positions 0 and 1 it used to make no difference)."""
    arms = ("x", "y", "z")
    moved = {}
    for propensity in (0.9, 0.1):
        policy = registry.create("vw")
        policy.learn(Feedback(_context(0, arms), arms[position], 1.0, propensity))
        moved[propensity] = policy.score(_context(0, arms)).scores[arms[position]]
    assert 0.0 < moved[0.9] < moved[0.1] - 0.1


@pytest.mark.parametrize("cap, clipped_below", [(10.0, 0.02), (1.0, 1 / 3)])
def test_importance_weight_is_clipped(cap, clipped_below):
    """Below 1 / (cap K) a propensity counts as 1 / (cap K): with cap 10 one sample logged at the 1e-3
    floor weighs 10x a uniform one, not ~333x; with the default cap 1 no sample weighs more than a
    uniform logger's, while an over-sampled backend (p = 0.9) still weighs less."""
    arms = ("x", "y", "z")
    scores = {}
    for propensity in (1e-3, clipped_below, 0.9):
        policy = registry.create("vw", max_importance_weight=cap)
        policy.learn(Feedback(_context(0, arms), "z", 1.0, propensity))
        scores[propensity] = policy.score(_context(0, arms)).scores["z"]
    assert scores[1e-3] == pytest.approx(scores[clipped_below], abs=1e-9)
    assert scores[clipped_below] > scores[0.9] + 0.05


def _learn_logged_stream(order: tuple[str, ...]) -> list[dict[str, float]]:
    """One logged stream, learned with the backends listed in `order`; the scores on fresh queries.

    The logger alternates between "a" and "b" (propensity 0.475 each) and tried "rare", the best
    backend, once (propensity 0.05): weighted 1/(K p), that one sample outweighs the others' levels."""
    costs = {"a": 1e-5, "b": 2e-5, "rare": 3e-5}  # by name: the same price features in every order
    logger = {"a": 0.475, "b": 0.475, "rare": 0.05}
    rewards = {"a": 0.5, "b": 0.6, "rare": 0.9}

    def context(seed: int) -> Context:
        return Context(_context(seed).embedding, 40, tuple(Arm(name, 1.0, 2.0, costs[name]) for name in order))

    policy = registry.create("vw", seed=1, max_importance_weight=10)
    for step in range(20):
        arm = "rare" if step == 7 else ("a", "b")[step % 2]
        policy.learn(Feedback(context(step), arm, rewards[arm], logger[arm]))
    return [policy.score(context(5000 + i)).scores for i in range(10)]


def test_backend_order_does_not_change_what_is_learned():
    """VW used to weigh the rare sample by 1/(K p) only when "rare" was listed last (1/K elsewhere), so
    listed first or second it lost to "b" on most queries."""
    reference = _learn_logged_stream(("a", "b", "rare"))
    assert all(max(scores, key=scores.get) == "rare" for scores in reference)
    for order in itertools.permutations(("a", "b", "rare")):
        learned = _learn_logged_stream(order)
        assert [max(scores, key=scores.get) for scores in learned] == ["rare"] * len(reference)
        for got, want in zip(learned, reference):
            assert got == pytest.approx(want, abs=1e-4)


def test_budget_penalty_is_learned_from_the_label():
    policy = registry.create("vw", seed=6)
    picks = []
    for step in range(300):
        context = _context(step, cost_weight=0.5)  # strong costs twice as much: penalties 0.5 and 1.0
        choice = policy.choose(context)
        policy.learn(Feedback(context, choice.arm, 0.9 if choice.arm == "strong" else 0.6, choice.propensity))
        picks.append(choice.arm)
    assert picks[-100:].count("cheap") >= 90  # utility 0.1 beats -0.1 although strong's reward is higher


def _final_phase_correct(seed: int) -> int:
    """lambda goes 0, 1, 0, 1, 0: how often the last phase picks the pricier, better backend again."""
    costs, rewards = {"cheap": 1e-4, "strong": 1e-3}, {"cheap": 0.6, "strong": 0.9}
    arms = tuple(Arm(name, 1.0, 1.0, cost) for name, cost in costs.items())
    policy = registry.create("vw", seed=seed)
    for cost_weight in (0.0, 1.0, 0.0, 1.0, 0.0):  # utilities 0.9 vs 0.6, then -0.92 vs 0.42
        picks = []
        for step in range(150):
            embedding = _context(step % 50, dim=16).embedding
            context = Context(embedding, 40, arms, cost_weight=cost_weight, cost_scale=5.5e-4)
            choice = policy.choose(context)
            arm = choice.arm
            policy.learn(Feedback(context, arm, rewards[arm], choice.propensity, cost_usd=costs[arm]))
            picks.append(arm)
    return picks[-100:].count("strong")


def test_penalty_feature_lets_most_runs_follow_lambda_back_down():
    """Backend ids alone absorb lambda * cost: without the penalty feature ~5% of picks go back to the
    better, pricier backend once lambda is 0 again; with it ~80% (some runs never explore it again)."""
    assert sum(_final_phase_correct(seed) for seed in range(8)) / 8 >= 65


def test_backend_appearing_at_run_time_with_an_awkward_name_is_learned():
    new = "gpt 4o:mini|eu"  # space, colon and bar would break VW's text format unescaped
    policy = registry.create("vw", seed=8)
    _train(policy, 100, {"cheap": 0.3, "strong": 0.6})
    picks = _train(policy, 300, {"cheap": 0.3, "strong": 0.6, new: 0.95}, arms=("cheap", "strong", new), start=100)
    assert picks[-100:].count(new) >= 85
    assert set(policy.score(_context(7, arms=(new,))).probabilities) == {new}


def test_feedback_for_an_arm_outside_the_decisions_candidates_is_skipped():
    policy = registry.create("vw")
    policy.learn(Feedback(_context(0), "gone", 1.0, 0.5))
    assert policy.stats()["internals"]["examples_learned"] == 0
    assert policy.score(_context(0)).scores == {"cheap": 0.0, "strong": 0.0}


@pytest.mark.parametrize("quadratic", [True, False])
def test_query_x_backend_interactions_make_it_contextual(quadratic):
    """Two regions of embedding space, each with its own best backend: only the interactions can tell them apart."""
    centres = [_context(s).embedding for s in (1, 2)]
    policy = registry.create("vw", seed=3, quadratic=quadratic)
    rng = np.random.default_rng(0)
    correct = []
    for step in range(400):
        kind = step % 2
        vector = centres[kind] + 0.5 * rng.normal(size=384).astype(np.float32) / np.sqrt(384)
        context = Context(vector / np.linalg.norm(vector), 40, tuple(Arm(a, 1.0, 1.0) for a in ("a", "b")))
        choice = policy.choose(context)
        best = ("a", "b")[kind]
        policy.learn(Feedback(context, choice.arm, 0.9 if choice.arm == best else 0.1, choice.propensity))
        correct.append(choice.arm == best)
    accuracy = sum(correct[-100:]) / 100
    assert accuracy >= 0.9 if quadratic else accuracy <= 0.6
