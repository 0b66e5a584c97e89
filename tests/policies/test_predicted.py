"""`forc` and `hybrid`: decisions from the predictions on the context, the bandit fallback without them."""

import numpy as np
import pytest

from policies import Arm, Context, Feedback, PolicyError, Predictions, registry


def _context(predictions=Predictions(), cost_weight=0.0, max_cost_usd=None, arms=("small", "large")):
    prices = {"small": (0.1, 0.2), "large": (1.0, 2.0), "mid": (0.5, 1.0)}
    return Context(
        embedding=np.ones(4, np.float32) / 2, prompt_tokens=100,
        arms=tuple(Arm(a, *prices[a], predicted_cost_usd=prices[a][1] * 1e-4) for a in arms),
        cost_weight=cost_weight, cost_scale=1e-4, predictions=predictions, max_cost_usd=max_cost_usd,
    )


def test_forc_maximises_predicted_quality_minus_lambda_cost_within_the_cap():
    forc = registry.create("forc", seed=0)
    predicted = Predictions(quality={"small": 0.6, "large": 0.8}, cost_usd={"small": 1e-5, "large": 3e-4})
    choice = forc.choose(_context(predicted))
    assert choice.arm == "large" and choice.probabilities == {"small": 0.0, "large": 1.0}
    assert choice.scores == {"small": pytest.approx(0.6), "large": pytest.approx(0.8)}
    # lambda 0.1 per 1e-4 USD: large loses 0.3, small 0.01.
    assert forc.choose(_context(predicted, cost_weight=0.1)).arm == "small"
    # The cap leaves large out even with lambda 0; if nothing fits, the router's candidates stand.
    assert forc.choose(_context(predicted, max_cost_usd=1e-4)).arm == "small"
    assert forc.choose(_context(predicted, max_cost_usd=1e-9)).arm == "large"
    assert forc.stats()["internals"]["decided_by_model"] == 4


def test_hybrid_sends_to_large_below_the_threshold_and_uses_the_other_when_one_is_missing():
    hybrid = registry.create("hybrid", seed=0)
    pair = {"small": "small", "large": "large", "threshold": 0.4}
    assert hybrid.choose(_context(Predictions(small_ok=0.2, **pair))).arm == "large"
    assert hybrid.choose(_context(Predictions(small_ok=0.7, **pair))).arm == "small"
    assert hybrid.choose(_context(Predictions(small_ok=0.2, **pair), arms=("small", "mid"))).arm == "small"
    fallback = hybrid.choose(_context(Predictions(small_ok=0.2, **pair), arms=("mid",)))
    assert fallback.arm == "mid" and hybrid.stats()["internals"]["decided_by_fallback"] == 1


@pytest.mark.parametrize("name", ["forc", "hybrid"])
def test_without_a_model_the_fallback_bandit_decides_and_always_learns(name):
    policy = registry.create(name, seed=1, fallback="thompson")
    for _ in range(60):
        context = _context()
        choice = policy.choose(context)
        assert 0 < choice.propensity <= 1
        policy.learn(Feedback(context, choice.arm, 1.0 if choice.arm == "small" else 0.0, choice.propensity))
    internals = policy.stats()["internals"]
    assert internals["decided_by_fallback"] == 60 and internals["fallback"]["name"] == "thompson"
    assert [policy.choose(_context()).arm for _ in range(20)].count("small") >= 15  # the bandit learned
    restored = registry.create(name, seed=1)
    restored.restore(policy.snapshot())
    assert restored.fallback.snapshot()["state"] == policy.fallback.snapshot()["state"]


def test_fallback_must_be_a_bandit():
    for bad in ("forc", "hybrid", "nope"):
        with pytest.raises(PolicyError):
            registry.create("forc", fallback=bad)
