"""Library peers on the replay protocol: same order, bandit feedback only, and they actually learn."""

import numpy as np
import pytest
from mabwiser.mab import MAB
from river import bandit

from policies import Arm
from router.replay.data import Dataset, Outcome, Prompt
from router.replay.peers import PEERS, peer_pass

N = 300
CONTEXTUAL = ["mabwiser-linucb", "mabwiser-lints", "river-linucb-disjoint"]


def _stream(quality: dict[str, float] | list[dict[str, float]], cost: dict[str, float], n: int = N,
            clusters: np.ndarray | None = None) -> tuple[Dataset, np.ndarray]:
    """Bernoulli qualities per model (per cluster when a list), fixed costs, random unit embeddings."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, 384))
    if clusters is not None:
        vectors[:, 0] += np.where(clusters == 1, 8.0, -8.0)  # two well-separated clusters
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    prompts = []
    for i in range(n):
        q = quality[clusters[i]] if clusters is not None else quality
        outcomes = {m: Outcome(float(rng.random() < q[m]), cost[m], 10.0) for m in cost}
        prompts.append(Prompt(f"p{i}", "", 100, outcomes))
    return Dataset("synthetic", prompts, [Arm(m, cost[m], cost[m]) for m in cost]), vectors


def _last_third(choices: list[str]) -> list[str]:
    return choices[2 * len(choices) // 3:]


@pytest.mark.parametrize("name", list(PEERS))
def test_a_peer_runs_the_protocol_and_is_paid_only_its_choice(name):
    dataset, vectors = _stream({"a": 0.3, "b": 0.6, "c": 0.5}, {"a": 1e-5, "b": 2e-5, "c": 3e-5})
    result = peer_pass(dataset, vectors, name, seed=1)
    order = np.random.default_rng(1).permutation(N)
    assert len(result.choices) == len(result.qualities) == len(result.costs) == len(result.decision_ms) == N
    chosen = [dataset.prompts[i].outcomes[arm] for i, arm in zip(order, result.choices)]
    assert result.qualities.tolist() == [o.quality for o in chosen]
    assert result.costs.tolist() == [o.cost_usd for o in chosen]
    assert (result.decision_ms >= 0).all()
    assert result.routed.tolist() == order.tolist()  # every prompt measured, in stream order (the references' prompts)


@pytest.mark.parametrize("name", list(PEERS))
def test_a_peer_learns_the_clearly_better_model(name):
    # 450 steps: MABWiser's LinTS (alpha=1 assumes unit reward noise) explores 65 features for long
    dataset, vectors = _stream({"a": 0.1, "b": 0.95, "c": 0.3}, {"a": 1e-5, "b": 1e-5, "c": 1e-5}, n=450)
    choices = _last_third(peer_pass(dataset, vectors, name, seed=0).choices)
    assert choices.count("b") / len(choices) >= 0.7


@pytest.mark.parametrize("name", list(PEERS))
def test_cost_weight_steers_to_the_cheaper_of_two_equal_models(name):
    dataset, vectors = _stream({"cheap": 0.7, "dear": 0.7}, {"cheap": 1e-5, "dear": 3e-5})
    choices = _last_third(peer_pass(dataset, vectors, name, seed=0, cost_weight=1.0).choices)
    assert choices.count("cheap") / len(choices) >= 0.7


@pytest.mark.parametrize("name", CONTEXTUAL)
def test_a_contextual_peer_picks_the_best_model_per_cluster(name):
    clusters = np.random.default_rng(5).integers(0, 2, size=N)
    dataset, vectors = _stream([{"a": 0.9, "b": 0.1}, {"a": 0.1, "b": 0.9}], {"a": 1e-5, "b": 1e-5}, clusters=clusters)
    result = peer_pass(dataset, vectors, name, seed=0)
    best = ["a" if clusters[i] == 0 else "b" for i in np.random.default_rng(0).permutation(N)]
    right = [c == b for c, b in zip(result.choices, best)]
    assert np.mean(_last_third(right)) >= 0.7


@pytest.mark.parametrize("name", list(PEERS))
def test_a_peer_never_sees_an_outcome_it_did_not_choose(name, monkeypatch):
    """Spy on what the library itself is fed: only the chosen arm, with that arm's reward."""
    fed: list[tuple[str, float]] = []

    def spy(cls, method, unpack):
        original = getattr(cls, method)

        def wrapper(self, *args):
            fed.extend(unpack(*args))
            return original(self, *args)

        monkeypatch.setattr(cls, method, wrapper)

    spy(MAB, "partial_fit", lambda decisions, rewards, contexts: zip(decisions, rewards))
    spy(MAB, "fit", lambda decisions, rewards, contexts: zip(decisions, rewards))
    spy(bandit.LinUCBDisjoint, "update", lambda arm, context, reward: [(arm, reward)])
    spy(bandit.UCB, "update", lambda arm, reward: [(arm, reward)])
    spy(bandit.EpsilonGreedy, "update", lambda arm, reward: [(arm, reward)])
    dataset, vectors = _stream({"a": 0.3, "b": 0.6, "c": 0.5}, {"a": 1e-5, "b": 2e-5, "c": 6e-5})
    result = peer_pass(dataset, vectors, name, seed=2, cost_weight=0.5)
    order = np.random.default_rng(2).permutation(N)
    outcomes = [dataset.prompts[i].outcomes[arm] for i, arm in zip(order, result.choices)]
    scale = 3e-5  # mean cost over all models
    assert [arm for arm, _ in fed] == result.choices
    assert np.allclose([r for _, r in fed], [o.quality - 0.5 * o.cost_usd / scale for o in outcomes])


@pytest.mark.parametrize("name", list(PEERS))
def test_unchosen_outcomes_do_not_change_a_peers_choices(name):
    """Rewrite every quality the peer did not choose: an honest peer makes exactly the same choices."""
    dataset, vectors = _stream({"a": 0.3, "b": 0.6, "c": 0.5}, {"a": 1e-5, "b": 2e-5, "c": 3e-5})
    first = peer_pass(dataset, vectors, name, seed=4, cost_weight=0.3)
    order = np.random.default_rng(4).permutation(N)
    chosen = dict(zip(order.tolist(), first.choices))
    rng = np.random.default_rng(9)
    rewritten = [
        Prompt(p.id, p.prompt, p.prompt_tokens, {
            m: o if m == chosen[i] else Outcome(float(rng.random()), o.cost_usd, o.output_tokens)
            for m, o in p.outcomes.items()
        })
        for i, p in enumerate(dataset.prompts)
    ]
    second = peer_pass(Dataset(dataset.name, rewritten, dataset.models), vectors, name, seed=4, cost_weight=0.3)
    assert second.choices == first.choices
