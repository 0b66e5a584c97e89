"""The replay protocol and budget pacing on real embeddings of real prompts."""

import json
from pathlib import Path

import numpy as np
import pytest

from policies import registry
from router.core import Candidate
from router.replay import Dataset, Outcome, Prompt, load_dataset, references, replay_pass

ROWS = [json.loads(line) for line in (Path(__file__).parent.parent / "data" / "two_kinds.jsonl").read_text().splitlines()]
LEARNING = [n for n in registry.names() if n not in ("random", "fixed")]
MODELS = [Candidate("small", 0.1, 0.1), Candidate("medium", 0.5, 0.5), Candidate("large", 2.0, 2.0)]
QUALITY = {"math": {"small": 0.2, "medium": 0.7, "large": 0.9}, "code": {"small": 0.6, "medium": 0.65, "large": 0.8}}


def _synthetic(n: int, seed: int = 0) -> tuple[Dataset, np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(ROWS), size=n).tolist()
    prompts = []
    for i, j in enumerate(picks):
        kind = ROWS[j]["kind"]
        outcomes = {
            m.name: Outcome(float(rng.random() < QUALITY[kind][m.name]), 100 * m.price_per_1m_input_tokens_usd / 1e6, 0.0)
            for m in MODELS
        }
        prompts.append(Prompt(f"p{i}", ROWS[j]["prompt"], 100, outcomes))
    return Dataset("synthetic", prompts, MODELS), np.array(picks), picks


@pytest.fixture(scope="module")
def unique_vectors(embedder):
    return embedder.embed([r["prompt"] for r in ROWS])


@pytest.mark.parametrize("name", LEARNING)
def test_pacing_brings_mean_cost_within_5_percent_of_target(name, unique_vectors):
    dataset, _, picks = _synthetic(2000)
    vectors = unique_vectors[picks]
    target = 6e-5  # between medium (5e-5) and large (2e-4): the unconstrained best is over budget
    result = replay_pass(dataset, vectors, name, seed=0, budget_usd=target)
    assert abs(result.costs.mean() / target - 1.0) <= 0.05, result.costs.mean()


def test_a_policy_never_sees_an_outcome_it_did_not_choose(unique_vectors, monkeypatch):
    """Bandit feedback only: every learn() call carries the chosen arm and that arm's recorded quality."""
    dataset, _, picks = _synthetic(200)
    seen = []
    original = registry.classes["qlearning"]._learn

    def spy(self, feedback):
        seen.append((feedback.arm, feedback.reward, feedback.context.embedding.tobytes()))
        return original(self, feedback)

    monkeypatch.setattr(registry.classes["qlearning"], "_learn", spy)
    result = replay_pass(dataset, unique_vectors[picks], "qlearning", seed=3)
    order = np.random.default_rng(3).permutation(len(dataset.prompts))
    assert [arm for arm, _, _ in seen] == result.choices
    for (arm, reward, _), index in zip(seen, order.tolist()):
        assert reward == dataset.prompts[index].outcomes[arm].quality


def test_references_on_a_hand_checked_case():
    prompts = [
        Prompt("a", "x", 10, {"m1": Outcome(1.0, 1.0, None), "m2": Outcome(0.0, 2.0, None)}),
        Prompt("b", "y", 10, {"m1": Outcome(0.0, 1.0, None), "m2": Outcome(1.0, 2.0, None)}),
        Prompt("c", "z", 10, {"m1": Outcome(1.0, 1.0, None), "m2": Outcome(1.0, 2.0, None)}),
    ]
    refs = references(Dataset("hand", prompts, [Candidate("m1", 1, 1), Candidate("m2", 2, 2)]))
    assert refs["oracle"] == {"quality": 1.0, "cost_usd": pytest.approx(4 / 3)}
    assert refs["best_single"] == {"model": "m1", "quality": pytest.approx(2 / 3), "cost_usd": 1.0}
    assert refs["random"]["quality"] == pytest.approx(4 / 6)
    assert refs["cheapest"]["model"] == "m1"


def test_replay_cli_on_an_unseen_file(tmp_path):
    """Any file in the shared format works, also without a models file (prices inferred from costs)."""
    from router.cli import main

    data = tmp_path / "unseen_routing.jsonl"
    with data.open("w") as handle:
        for i, row in enumerate(ROWS[:40]):
            handle.write(json.dumps({
                "id": str(i), "prompt": row["prompt"], "dataset": row["kind"], "prompt_tokens": 50,
                "outcomes": {"a": {"quality": 0.5, "output_tokens": 10, "cost_usd": 6e-6},
                             "b": {"quality": 0.9, "output_tokens": None, "cost_usd": 5e-5}},
            }) + "\n")
    assert main(["replay", "--data", str(data), "--policy", "qlearning", "--seeds", "0,1", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("policy", "dataset", "n_prompts", "seeds", "mean_quality", "mean_quality_second_half", "mean_cost_usd",
                "decision_ms_p50", "decision_ms_p99"):
        assert key in report
    assert report["n_prompts"] == 40 and report["seeds"] == [0, 1]
    assert report["references"]["best_single"]["model"] == "b"
    assert set(report["references"]) >= {"oracle", "best_single", "random"}
    assert load_dataset(data).models[0].price_per_1m_input_tokens_usd == pytest.approx(1e6 * 6e-6 / 60)


def test_bad_replay_input_is_a_clear_error(tmp_path, capsys):
    from router.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "prompt": "x"}\n')
    assert main(["replay", "--data", str(bad), "--policy", "qlearning", "--out", str(tmp_path)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["replay", "--data", str(bad), "--policy", "nope", "--out", str(tmp_path)]) == 2


def test_train_fraction_trains_predictors_on_history_and_measures_the_rest(tmp_path, embedder):
    from router.predictors import TrainSettings, build_tiny_backbone
    from router.replay import TrainFraction, run

    sample = Path(__file__).parent.parent / "data" / "llmrouter_sample.jsonl"
    backbone = build_tiny_backbone("distilbert", tmp_path / "backbone")
    train = TrainFraction(0.5, TrainSettings(backbone=str(backbone), epochs=2, batch_size=16, learning_rate=1e-3))
    reports = run(sample, ["forc", "hybrid", "thompson"], [0], None, tmp_path / "out", embedder, cache_dir=tmp_path, train=train)
    by_policy = {r["policy"]: r for r in reports}
    for r in reports:
        assert r["train_fraction"] == 0.5 and r["n_routed"] == 200
        assert r["references"]["oracle"]["quality"] >= r["mean_quality"]
    # Every policy is measured on the same routed prompts, so the references agree.
    assert by_policy["forc"]["references"] == by_policy["thompson"]["references"]
    assert by_policy["forc"]["references"] != references(load_dataset(sample))
    assert (tmp_path / "out" / "comparison.md").exists()
