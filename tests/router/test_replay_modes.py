"""Replay of the answer-aware modes (router.replay.modes, `llm-router replay --mode cascade|parallel`) on a
small synthetic routing file with an answers file beside it, where the right selection is obvious: good
answers are long lists marked GOOD, poor ones a short line. The mechanics are checked against a scorer with
known scores; the CLI runs train a real tiny cross-encoder on the history part."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.cli import main
from router.config import default_config_text, load_config
from router.predictors import build_tiny_backbone
from router.replay.data import DatasetError, load_answers, load_dataset
from router.replay.modes import Scorers, cascade_one, chains, frontier, parallel_pass, stop_signal

COST = {"cheap": 1e-5, "mid": 3e-5, "dear": 1e-4}


def _quality(model: str, i: int) -> float:
    if model == "cheap":
        return 0.9 if i % 2 == 0 else 0.1  # mean 0.5
    return 0.3 if model == "mid" else 0.7  # mid is dominated by cheap (dearer, worse): off the frontier


def _answer(quality: float, i: int) -> str:
    if quality >= 0.7:
        return f"GOOD answer {i}:\n" + "".join(f"{n}. a careful step about topic {i}\n" for n in range(1, int(quality * 40)))
    return f"bad {i}."


def _write(directory: Path, n: int = 80) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    routing, answers = [], []
    for i in range(n):
        outcomes = {m: {"quality": _quality(m, i), "output_tokens": 10, "cost_usd": c} for m, c in COST.items()}
        routing.append({"id": f"p{i}", "prompt": f"question number {i} about topic {i % 7}", "dataset": "synthetic",
                        "prompt_tokens": 10, "outcomes": outcomes})
        answers.append({"id": f"p{i}", "answers": {m: _answer(_quality(m, i), i) for m in COST}})
    path = directory / "synth_routing.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in routing))
    (directory / "synth_answers.jsonl").write_text("".join(json.dumps(a) + "\n" for a in answers))
    return path


class LengthKnown:
    """A stand-in trained scorer with known scores: longer answers score higher (GOOD ones above 0.5)."""

    def score_pairs(self, queries, answers, backends=None):
        return [min(1.0, len(a) / 4000) for a in answers]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_backbone("distilbert", tmp_path_factory.mktemp("backbone") / "distilbert")


def _config(tmp_path: Path, backbone: Path, extra: str = "") -> Path:
    path = tmp_path / "replay.toml"
    options = {"backbone": str(backbone), "max_length": 64, "epochs": 3, "batch_size": 32, "learning_rate": 1e-3,
               "trainable_layers": 1}
    path.write_text(default_config_text() + "\n" + extra + "\n[predictors]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items()))
    return path


def test_the_cascade_order_is_the_cost_quality_frontier(tmp_path):
    dataset = load_dataset(_write(tmp_path))
    assert frontier(dataset, range(80)) == ["cheap", "dear"]
    assert chains(["a", "b", "c"], 2) == [["c"], ["a", "c"], ["b", "c"]]
    assert chains(["a", "b", "c"], 3)[-1] == ["a", "b", "c"]


def test_the_cascade_stops_at_the_first_answer_scored_high_and_pays_every_call(tmp_path):
    dataset = load_dataset(_write(tmp_path))
    early = cascade_one(dataset, 0, ["cheap", "dear"], [0.9, 0.2], threshold=0.5)
    assert (early.calls, early.delivered, early.cost, early.quality) == (1, "cheap", COST["cheap"], 0.9)
    escalated = cascade_one(dataset, 1, ["cheap", "dear"], [0.2, 0.3], threshold=0.5)
    assert (escalated.calls, escalated.delivered) == (2, "dear")
    assert escalated.cost == pytest.approx(COST["cheap"] + COST["dear"]) and escalated.quality == 0.7
    # the best-scored answer seen is delivered, even when a later call was paid for
    kept = cascade_one(dataset, 1, ["cheap", "dear"], [0.4, 0.3], threshold=0.5)
    assert (kept.calls, kept.delivered, kept.quality) == (2, "cheap", 0.1)
    never = cascade_one(dataset, 0, ["cheap", "mid", "dear"], [0.9, 0.9, 0.9], threshold=1.01)
    assert never.calls == 3 and never.cost == pytest.approx(sum(COST.values()))


def test_the_stop_signal_says_how_well_the_first_score_tells_when_to_stop(tmp_path):
    dataset = load_dataset(_write(tmp_path))
    prompts = list(range(80))  # cheap is at least as good as dear (0.9 vs 0.7) on the even prompts only
    telling = stop_signal(dataset, prompts, ["cheap", "dear"], {i: [1.0 - i % 2, 0.5] for i in prompts})
    backwards = stop_signal(dataset, prompts, ["cheap", "dear"], {i: [float(i % 2), 0.5] for i in prompts})
    blind = stop_signal(dataset, prompts, ["cheap", "dear"], {i: [0.5, 0.5] for i in prompts})
    assert (telling["auc_first_at_least_last"], backwards["auc_first_at_least_last"], blind["auc_first_at_least_last"]) == (1.0, 0.0, 0.5)
    # the bound: scored by its recorded quality, the cascade stops on the even prompts and escalates on the odd
    at_half = next(p for p in telling["perfect_scorer_sweep"] if p["threshold"] == 0.5)
    assert at_half["mean_quality"] == pytest.approx(0.8) and at_half["calls_per_prompt"] == 1.5


@pytest.mark.parametrize("k", [2, 3])
def test_parallel_calls_k_backends_pays_them_all_and_delivers_the_top_score(k, tmp_path):
    path = _write(tmp_path)
    dataset = load_dataset(path)
    answers = load_answers(path, dataset)
    scorers = Scorers(dataset, answers, embedder=None, trained=LengthKnown())
    vectors = np.random.default_rng(0).normal(size=(80, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    config = load_config(None, environ={})
    result = parallel_pass(dataset, vectors, "thompson", 0, k, "scorer", scorers, config, split=20)
    assert len(result.qualities) == 60 and set(result.calls) == {k}
    for index, called, delivered, cost, quality in zip(result.routed, result.called, result.choices, result.costs, result.qualities):
        assert len(set(called)) == k
        assert cost == pytest.approx(sum(COST[m] for m in called))
        scores = [min(1.0, len(answers[index][m]) / 4000) for m in called]
        assert delivered == called[int(np.argmax(scores))]
        assert quality == dataset.prompts[index].outcomes[delivered].quality
    assert result.qualities.mean() == pytest.approx(result.called_best.mean())  # the obvious pick, every time


def test_an_answers_file_that_lacks_a_prompt_is_a_clear_error(tmp_path):
    path = _write(tmp_path)
    answers = tmp_path / "synth_answers.jsonl"
    answers.write_text("".join(answers.read_text().splitlines(keepends=True)[1:]))
    with pytest.raises(DatasetError, match="lack an answer"):
        load_answers(path, load_dataset(path))
    answers.unlink()
    with pytest.raises(DatasetError, match="no answers file"):
        load_answers(path, load_dataset(path))


def test_replay_cli_cascade_trains_the_scorer_on_history_and_reports_the_mode(tmp_path, backbone, capsys):
    data = _write(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["replay", "--data", str(data), "--mode", "cascade", "--train-fraction", "0.5", "--seeds", "0,1",
                 "--config", str(_config(tmp_path, backbone)), "--out", str(out), "--budgets", "3e-5,6e-5,1.2e-4"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cascade" and report["policy"] == "frontier" and report["n_routed"] == 40
    assert report["scorer"]["name"] == "scorer" and len(report["scorer"]["training"]) == 2
    assert all(seed["chain"] == ["cheap", "dear"] for seed in report["cascade"])
    assert 1 <= report["calls_per_prompt"] <= 2
    assert {"scorer", "agreement", "length"} <= set(report["selectors"]) and "note" in report["selectors"]["agreement"]
    assert [p["budget_usd"] for p in report["budget_sweep"]] == [3e-5, 6e-5, 1.2e-4] and 0 < report["aiq"] <= 1
    assert report["aiq_from"] == "budget_sweep" and len(report["threshold_sweep"]) == 22
    assert 0 <= report["stop_signal"]["auc_first_at_least_last"] <= 1 and len(report["stop_signal"]["perfect_scorer_sweep"]) == 22
    # the claim: the trained scorer stops at the cheap answer when it is good, so the cascade beats the
    # dear model alone on quality at a lower cost (cheap 0.9 on half the prompts, dear 0.7)
    dear = report["single_models"]["models"]["dear"]
    assert report["mean_quality"] > dear["quality"] + 0.05 and report["mean_cost_usd"] < dear["cost_usd"], report["selection"]


def test_replay_cli_parallel_reports_calls_and_each_selector(tmp_path, backbone, capsys):
    data = _write(tmp_path / "data")
    code = main(["replay", "--data", str(data), "--mode", "parallel", "--policy", "thompson", "--k", "3",
                 "--train-fraction", "0.5", "--config", str(_config(tmp_path, backbone)), "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["mode"] == "parallel" and report["policy"] == "thompson" and report["mode_settings"] == {"k": 3}
    assert report["calls_per_prompt"] == 3 and report["mean_cost_usd"] == pytest.approx(sum(COST.values()))
    assert set(report["selectors"]) == {"scorer", "agreement", "length"}
    assert report["selectors"]["scorer"]["mean_quality"] > report["selectors"]["scorer"]["first_call_quality"]
    assert report["references"]["best_single"]["model"] == "dear"

    # without a history part there is no trained scorer: agreement delivers (between two answers a tie,
    # so the policy's first choice)
    code = main(["replay", "--data", str(data), "--mode", "parallel", "--policy", "random", "--config",
                 str(_config(tmp_path, backbone)), "--out", str(tmp_path / "out2")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert report["scorer"]["name"] == "agreement" and report["calls_per_prompt"] == 2 and report["n_prompts"] == 80
    assert report["selection"]["mean_quality"] == pytest.approx(report["selection"]["first_call_quality"])


@pytest.mark.parametrize(("args", "message"), [
    (["--mode", "cascade"], "needs --train-fraction"),
    (["--mode", "parallel", "--policy", "thompson", "--k", "1"], "--k"),
    (["--mode", "cascade", "--k", "2", "--train-fraction", "0.5"], "--k"),
    (["--mode", "parallel"], "--policy is required"),
    (["--mode", "parallel", "--policy", "thompson", "--peers"], "does not combine"),
])
def test_bad_mode_options_are_clear_errors(args, message, tmp_path, capsys):
    data = _write(tmp_path / "data")
    assert main(["replay", "--data", str(data), "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
