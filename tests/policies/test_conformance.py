"""One conformance test over every registered policy: the contract every policy must keep."""

import json
import random
from pathlib import Path

import numpy as np
import pytest

from policies import Arm, Context, Feedback, PolicyError, importance_weight, registry
from router.memory import Memory, MemoryEntry

NON_LEARNING = {"random", "fixed"}
LEARNING = [n for n in registry.names() if n not in NON_LEARNING]
CONTEXTUAL = [n for n in LEARNING if registry.get(n).contextual]
TWO_KINDS = Path(__file__).parent.parent / "data" / "two_kinds.jsonl"


def _context(arms=("cheap", "strong"), seed=0, **extra):
    rng = np.random.default_rng(seed)
    vector = rng.normal(size=16).astype(np.float32)
    vector /= np.linalg.norm(vector)
    return Context(
        embedding=vector,
        prompt_tokens=20,
        arms=tuple(Arm(name, 0.1 * (i + 1), 0.2 * (i + 1), 1e-6 * (i + 1)) for i, name in enumerate(arms)),
        **extra,
    )


def run_stream(policy, items, reward_of, arms, steps, seed=0, memory=None, cost_weight=0.0, costs=None):
    """Online loop with bandit feedback only, the way the router drives a policy: neighbours from a
    FAISS memory, the chosen arm's reward, then memory learns that reward. Returns the chosen arms."""
    rng = random.Random(seed)
    costs = costs or {a: 1e-6 for a in arms}
    scale = sum(costs.values()) / len(costs)
    picks = []
    for step in range(steps):
        kind, vector = items[rng.randrange(len(items))]
        neighbours = memory.search(vector, 20) if memory is not None else ()
        context = Context(
            embedding=vector, prompt_tokens=50, arms=tuple(Arm(a, 1.0, 1.0, costs[a]) for a in arms),
            neighbours=neighbours, cost_weight=cost_weight, cost_scale=scale,
        )
        choice = policy.choose(context)
        reward = reward_of(kind, choice.arm)
        policy.learn(Feedback(context, choice.arm, reward, choice.propensity, cost_usd=costs[choice.arm]))
        if memory is not None:
            memory.add(np.array([step], dtype=np.int64), vector.reshape(1, -1), [MemoryEntry(f"d{step}", choice.arm, reward)])
        picks.append((kind, choice.arm))
    return picks


@pytest.fixture(scope="module")
def two_kinds(embedder):
    rows = [json.loads(line) for line in TWO_KINDS.read_text().splitlines()]
    vectors = embedder.embed([r["prompt"] for r in rows])
    return [(r["kind"], v) for r, v in zip(rows, vectors)]


@pytest.fixture(params=registry.names())
def policy(request):
    return registry.create(request.param, seed=3)


def test_choice_is_a_candidate_with_a_distribution(policy):
    for seed in range(50):
        context = _context(seed=seed)
        choice = policy.choose(context)
        assert choice.arm in context.arm_names
        assert set(choice.probabilities) == set(context.arm_names) == set(choice.scores)
        assert sum(choice.probabilities.values()) == pytest.approx(1.0)
        assert 0.0 < choice.propensity <= 1.0


def test_no_candidates_is_an_error(policy):
    with pytest.raises(PolicyError):
        policy.choose(Context(embedding=np.zeros(16, np.float32), prompt_tokens=1, arms=()))


@pytest.mark.parametrize("reward", [-0.1, 1.5, float("nan")])
def test_reward_outside_unit_interval_is_rejected_and_changes_nothing(policy, reward):
    before = json.dumps(policy.snapshot(), sort_keys=True)
    with pytest.raises(PolicyError):
        policy.learn(Feedback(_context(), "cheap", reward, 0.5))
    assert json.dumps(policy.snapshot(), sort_keys=True) == before


@pytest.mark.parametrize("name", LEARNING)
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


@pytest.mark.parametrize("name", CONTEXTUAL)
def test_learns_a_different_backend_per_kind_of_query(name, two_kinds):
    """Real MiniLM embeddings of real prompts: math goes to one backend, code to another."""
    best = {"math": "math-expert", "code": "code-expert"}

    def reward_of(kind, arm):
        return 0.9 if arm == best[kind] else (0.5 if arm == "generalist" else 0.1)

    policy = registry.create(name, seed=1)
    picks = run_stream(policy, two_kinds, reward_of, ["math-expert", "code-expert", "generalist"], 600, memory=Memory(384))
    last = picks[-150:]
    assert sum(arm == best[kind] for kind, arm in last) >= 0.75 * len(last)


@pytest.mark.parametrize("name", LEARNING)
def test_cost_weight_steers_to_the_cheaper_of_equal_backends(name):
    policy = registry.create(name, seed=5)
    items = [("any", _context(seed=s).embedding) for s in range(50)]
    picks = run_stream(policy, items, lambda kind, arm: 0.6, ["pricey", "cheap"], 400,
                       cost_weight=1.0, costs={"pricey": 1e-3, "cheap": 1e-4})
    assert [arm for _, arm in picks[-100:]].count("cheap") >= 80


def test_new_backend_at_run_time_is_accepted(policy):
    for step in range(20):
        context = _context(seed=step)
        choice = policy.choose(context)
        policy.learn(Feedback(context, choice.arm, 0.5, choice.propensity))
    wider = _context(arms=("cheap", "strong", "new"))
    assert policy.choose(wider).arm in wider.arm_names


def test_learning_from_another_policys_log_with_importance_weights(policy):
    context = _context()
    weight = importance_weight(0.05, 2)
    assert weight == pytest.approx(10.0)
    policy.learn(Feedback(context, "strong", 1.0, 0.05, weight=weight))
    with pytest.raises(PolicyError):
        policy.learn(Feedback(context, "strong", 1.0, 0.05, weight=0.0))


def test_snapshot_restores_the_same_scores_and_choices(policy):
    for step in range(30):
        context = _context(seed=step)
        choice = policy.choose(context)
        policy.learn(Feedback(context, choice.arm, 1.0 if choice.arm == "strong" else 0.0, choice.propensity))
        policy.learn_preference(context, "strong", "cheap")
    snapshot = json.loads(json.dumps(policy.snapshot()))
    restored = registry.create(policy.name, seed=99)
    restored.restore(snapshot)
    contexts = [_context(seed=100 + i) for i in range(20)]
    assert [restored.score(c).scores for c in contexts] == [policy.score(c).scores for c in contexts]
    assert [restored.choose(c).arm for c in contexts] == [policy.choose(c).arm for c in contexts]


def test_stats_are_json_and_count_pulls_and_feedback(policy):
    context = _context()
    choice = policy.choose(context)
    policy.score(context)  # shadow scoring is not a pull
    policy.learn(Feedback(context, choice.arm, 1.0, choice.propensity))
    stats = json.loads(json.dumps(policy.stats()))
    assert stats["name"] == policy.name and stats["maturity"] in ("supported", "experimental")
    assert stats["arms"][choice.arm] == {"pulls": 1, "feedback": 1, "mean_reward": 1.0}


def test_same_preference_for_same_arms_is_rejected():
    with pytest.raises(PolicyError):
        registry.create("random").learn_preference(_context(), "cheap", "cheap")


def test_unknown_policy_name_is_rejected():
    with pytest.raises(PolicyError, match="unknown policy"):
        registry.create("nope")


@pytest.mark.parametrize("options", [{"epsilon": 2.0}, {"alpha": 0.0}, {"clusters": 0}, {"colour": "red"}])
def test_bad_option_is_rejected(options):
    with pytest.raises(PolicyError):
        registry.create("qlearning", **options)
