"""The replay protocol, its engine (built from the whole config), its references and reports, on real
embeddings of real prompts and on hand-built datasets."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from policies import PREDICTED_POLICIES, Arm, registry
from router.config import load_config
from router.replay import run
from router.replay.data import Dataset, Outcome, Prompt, embed_dataset, embedding_cache_file, load_dataset
from router.replay.passes import TrainFraction, replay_config, replay_pass, select_policies
from router.replay.report import PEER_NOTE, comparison_table, references, report

ROWS = [json.loads(line) for line in (Path(__file__).parent.parent / "data" / "two_kinds.jsonl").read_text().splitlines()]
LEARNING = [n for n in registry.names() if n not in ("random", "fixed")]
MODELS = [Arm("small", 0.1, 0.1), Arm("medium", 0.5, 0.5), Arm("large", 2.0, 2.0)]
QUALITY = {"math": {"small": 0.2, "medium": 0.7, "large": 0.9}, "code": {"small": 0.6, "medium": 0.65, "large": 0.8}}
TARGET = 6e-5  # between medium (5e-5) and large (2e-4) per query: the unconstrained best is over budget


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


def _write(dataset: Dataset, path: Path) -> Path:
    """A dataset as a routing file in the shared format (no models file: prices are inferred from costs)."""
    with path.open("w") as handle:
        for p in dataset.prompts:
            handle.write(json.dumps({
                "id": p.id, "prompt": p.prompt, "dataset": "synthetic", "prompt_tokens": p.prompt_tokens,
                "outcomes": {m: {"quality": o.quality, "output_tokens": o.output_tokens, "cost_usd": o.cost_usd} for m, o in p.outcomes.items()},
            }) + "\n")
    return path


def _config(path: Path, extra: str = "", top: str = "") -> Path:
    """A router config for replays (its backend is never called: the dataset's models are the candidates)."""
    path.write_text(f"""{top}
[[backends]]
name = "unused"
base_url = "http://127.0.0.1:9"
model = "unused"
price_per_1m_input_tokens_usd = 1.0
price_per_1m_output_tokens_usd = 1.0
{extra}
""")
    return path


@pytest.fixture(scope="module")
def unique_vectors(embedder):
    return embedder.embed([r["prompt"] for r in ROWS])


def _unit_vectors(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# --- pacing and the bandit protocol ---------------------------------------------------------------------


@pytest.mark.parametrize("name", LEARNING)
def test_pacing_brings_mean_cost_within_5_percent_of_target(name, unique_vectors):
    dataset, _, picks = _synthetic(2000)
    result = replay_pass(dataset, unique_vectors[picks], name, seed=0, budget_usd=TARGET)
    # Never more than 5% over. Under: 5%, except vw, whose importance-weighted updates (up to 10x for a
    # rarely chosen backend) make it shy of the dear backend for a while after a bad answer: 0.90-1.00
    # of the target over seeds 0-3.
    under = 0.12 if name == "vw" else 0.05
    assert 1.0 - under <= result.costs.mean() / TARGET <= 1.05, result.costs.mean()


@pytest.mark.parametrize("name", registry.names())
def test_a_policy_never_sees_an_outcome_it_did_not_choose(name, unique_vectors, monkeypatch):
    """Bandit feedback only: every learn() call carries the chosen arm and that arm's recorded quality."""
    dataset, _, picks = _synthetic(200)
    seen = []
    policy_class = registry.get(name)
    original = policy_class._learn

    def spy(self, feedback):
        if type(self) is policy_class:  # a predictor policy's fallback learns through its own class
            seen.append((feedback.arm, feedback.reward, feedback.context.embedding.tobytes()))
        return original(self, feedback)

    monkeypatch.setattr(policy_class, "_learn", spy)
    result = replay_pass(dataset, unique_vectors[picks], name, seed=3)
    order = np.random.default_rng(3).permutation(len(dataset.prompts))
    assert [arm for arm, _, _ in seen] == result.choices
    for (arm, reward, _), index in zip(seen, order.tolist()):
        assert reward == dataset.prompts[index].outcomes[arm].quality
    assert result.routed.tolist() == order.tolist()


# --- the engine comes from the whole config --------------------------------------------------------------


def test_replay_builds_its_engine_from_the_whole_config(tmp_path, monkeypatch):
    """build_engine gets the config (budget, neighbours, policy options) and the pass's seed."""
    import router.replay.passes as passes

    built = []
    original = passes.build_engine

    def spy(config, dim, **kwargs):
        engine = original(config, dim, **kwargs)
        built.append((kwargs, engine))
        return engine

    monkeypatch.setattr(passes, "build_engine", spy)
    config = load_config(_config(tmp_path / "c.toml", top='policies = ["thompson", "random"]\n', extra="""
[embedder]
neighbours = 5
[budget]
cost_weight = 0.7
pacing_step = 0.2
max_carryover_hours = 3.0
[policy_options.fixed]
backend = "large"
"""), environ={})
    dataset, _, _ = _synthetic(30)
    result = replay_pass(dataset, _unit_vectors(30), "fixed", seed=11, config=config)
    assert set(result.choices) == {"large"}  # the option reached the policy
    (kwargs, engine), = built
    assert kwargs == {"policies": ["fixed"], "active": "fixed", "seed": 11}
    assert engine.neighbours == 5
    assert (engine.pacer.lam, engine.pacer.step, engine.pacer.max_carryover_hours) == (0.7, 0.2, 3.0)
    replay_pass(dataset, _unit_vectors(30), "fixed", seed=4, config=config, shadows=True)
    assert built[-1][0] == {"policies": ["fixed", "thompson", "random"], "active": "fixed", "seed": 4}
    assert set(built[-1][1].policies) == {"fixed", "thompson", "random"}


@pytest.mark.parametrize("budget", ["target_usd_per_query = 6e-5", "cost_weight = 5.0"])
def test_a_config_budget_changes_the_replays_cost(budget, tmp_path, unique_vectors):
    dataset, _, picks = _synthetic(1000)
    plain = load_config(_config(tmp_path / "plain.toml"), environ={})
    budgeted = load_config(_config(tmp_path / "budgeted.toml", extra=f"[budget]\n{budget}\n"), environ={})
    free = replay_pass(dataset, unique_vectors[picks], "thompson", seed=0, config=plain).costs.mean()
    paced = replay_pass(dataset, unique_vectors[picks], "thompson", seed=0, config=budgeted).costs.mean()
    assert free > 1.5 * TARGET, free  # unconstrained, it mostly buys the large model
    assert paced < 0.75 * free, (paced, free)


def test_replay_cli_honours_the_configs_budget_and_budget_overrides_it(tmp_path, capsys):
    """`llm-router replay --config F`: F's [budget] target paces the run; `--budget` replaces it."""
    from router.cli import main

    dataset, _, _ = _synthetic(1000)
    data = _write(dataset, tmp_path / "synthetic_routing.jsonl")
    plain = _config(tmp_path / "plain.toml")
    budgeted = _config(tmp_path / "budgeted.toml", extra=f"[budget]\ntarget_usd_per_query = {TARGET}\n")
    hourly = _config(tmp_path / "hourly.toml", extra="[budget]\ntarget_usd_per_hour = 5.0\n")
    reports = {}
    for name, extra in (("plain", ["--config", str(plain)]), ("budgeted", ["--config", str(budgeted)]),
                        ("override", ["--config", str(hourly), "--budget", "0.00012"])):
        assert main(["replay", "--data", str(data), "--policy", "thompson", "--out", str(tmp_path / name), *extra]) == 0
        reports[name] = json.loads((tmp_path / name / "report.json").read_text())
    capsys.readouterr()
    assert reports["plain"]["budget_usd"] is None and reports["plain"]["mean_cost_usd"] > 1.5 * TARGET
    assert reports["budgeted"]["budget_usd"] == TARGET
    assert abs(reports["budgeted"]["mean_cost_usd"] / TARGET - 1) <= 0.1, reports["budgeted"]["mean_cost_usd"]
    assert reports["override"]["budget_usd"] == 0.00012 and "budget_usd_per_hour" not in reports["override"]
    assert abs(reports["override"]["mean_cost_usd"] / 0.00012 - 1) <= 0.1, reports["override"]["mean_cost_usd"]


def test_budget_replaces_the_configs_targets(tmp_path):
    hourly = load_config(_config(tmp_path / "h.toml", extra="[budget]\ntarget_usd_per_hour = 5.0\ncost_weight = 0.3\n"), environ={})
    replaced = replay_config(hourly, 2e-5).budget
    assert (replaced.target_usd_per_query, replaced.target_usd_per_hour, replaced.cost_weight) == (2e-5, 0.0, 0.3)
    assert replay_config(hourly).budget.target_usd_per_hour == 5.0
    with pytest.raises(ValueError):
        replay_config(hourly, -1.0)


def test_shadow_scoring_is_in_the_decision_time(tmp_path, monkeypatch):
    """With shadows, every decision also scores the config's other policies, inside the timed decision."""
    import time

    config = load_config(_config(tmp_path / "c.toml", top='default_policy = "thompson"\npolicies = ["thompson", "random"]\n'), environ={})
    calls = []

    def slow_score(self, context):
        calls.append(1)
        time.sleep(0.003)
        return original(self, context)

    original = registry.get("random").score
    monkeypatch.setattr(registry.get("random"), "score", slow_score)
    dataset, _, _ = _synthetic(40)
    alone = replay_pass(dataset, _unit_vectors(40), "qlearning", seed=0, config=config)
    assert not calls and np.median(alone.decision_ms) < 3.0
    shadowed = replay_pass(dataset, _unit_vectors(40), "qlearning", seed=0, config=config, shadows=True)
    assert len(calls) == 40
    assert np.median(shadowed.decision_ms) >= 3.0
    assert shadowed.choices == alone.choices  # shadows score, they do not decide


# --- references over exactly the prompts measured ---------------------------------------------------------

HAND = [  # two models, hand-checked references below
    {"m1": Outcome(1.0, 1.0, None), "m2": Outcome(0.0, 2.0, None)},
    {"m1": Outcome(0.0, 1.0, None), "m2": Outcome(1.0, 2.0, None)},
    {"m1": Outcome(1.0, 1.0, None), "m2": Outcome(1.0, 2.0, None)},
    {"m1": Outcome(0.0, 1.0, None), "m2": Outcome(0.5, 2.0, None)},
]


def _hand(n: int = 4) -> Dataset:
    prompts = [Prompt(f"p{i}", f"prompt {i}", 10, HAND[i % 4]) for i in range(n)]
    return Dataset("hand", prompts, [Arm("m1", 1, 1), Arm("m2", 2, 2)])


def test_references_on_a_hand_checked_case():
    refs = references(_hand())
    # oracle: 1, 1 (m2), 1 (tie: cheaper m1), 0.5 (m2); best single: m2 (2.5/4 against m1's 2/4)
    assert refs["oracle"] == {"quality": 0.875, "cost_usd": 1.5}
    assert refs["best_single"] == {"model": "m2", "quality": 0.625, "cost_usd": 2.0}
    assert refs["random"] == {"quality": 0.5625, "cost_usd": 1.5}
    assert refs["cheapest"]["model"] == "m1"


def test_references_cover_each_seeds_second_half_and_all_of_it():
    assert np.random.default_rng(0).permutation(4).tolist() == [2, 0, 1, 3]  # second half: prompts 1, 3
    assert np.random.default_rng(1).permutation(4).tolist() == [0, 1, 2, 3]  # second half: prompts 2, 3
    dataset = _hand()
    passes = [replay_pass(dataset, _unit_vectors(4), "random", seed) for seed in (0, 1)]
    result = report(dataset, "random", [0, 1], passes)
    # rows 1, 3, 2, 3: oracle 1, .5, 1, .5 at 2, 2, 1, 2; m1 .25, m2 .75
    assert result["references"]["oracle"] == {"quality": 0.75, "cost_usd": 1.75}
    assert result["references"]["best_single"] == {"model": "m2", "quality": 0.75, "cost_usd": 2.0}
    assert result["references"]["random"] == {"quality": 0.5, "cost_usd": 1.5}
    # every prompt once per seed: the whole file's references
    assert result["references_all"] == references(dataset)
    for key, half in (("mean_quality", 0), ("mean_quality_second_half", 2)):  # the measured prompts match
        assert result[key] == pytest.approx(np.mean([p.qualities[half:].mean() for p in passes]))
    table = comparison_table([result, {**result, "policy": "other"}])
    assert "| *oracle* | 0.8750 | 0.7500 | 1.5 | 1.75 | | |" in table
    assert "| *best_single (m2)* | 0.6250 | 0.7500 | 2 | 2 | | |" in table
    assert "'2nd half' columns the second half of each seed's stream" in table


def test_with_a_history_part_references_cover_the_routed_part():
    assert np.random.default_rng(0).permutation(8).tolist() == [2, 4, 3, 6, 5, 0, 1, 7]
    dataset = _hand(8)  # prompt i is HAND[i % 4]: routed 5, 0, 1, 7 -> rows 1, 0, 1, 3; second half rows 1, 3
    train = TrainFraction(0.5)
    result = report(dataset, "qlearning", [0], [replay_pass(dataset, _unit_vectors(8), "qlearning", 0, train=train)], train=train)
    assert result["n_routed"] == 4
    assert result["references"]["oracle"] == {"quality": 0.75, "cost_usd": 2.0}
    assert result["references"]["random"] == {"quality": 0.375, "cost_usd": 1.5}
    assert result["references_all"]["oracle"] == {"quality": 0.875, "cost_usd": 1.75}
    assert result["references_all"]["best_single"] == {"model": "m2", "quality": 0.625, "cost_usd": 2.0}
    assert result["references_all"]["random"] == {"quality": 0.4375, "cost_usd": 1.5}
    assert "routed part (after the first 0.5 as history)" in result["references_cover"]["references"]


# --- the CLI ----------------------------------------------------------------------------------------------


def _unseen(tmp_path: Path, n: int = 40) -> Path:
    data = tmp_path / "unseen_routing.jsonl"
    with data.open("w") as handle:
        for i, row in enumerate(ROWS[:n]):
            handle.write(json.dumps({
                "id": str(i), "prompt": row["prompt"], "dataset": row["kind"], "prompt_tokens": 50,
                "outcomes": {"a": {"quality": 0.5 if row["kind"] == "math" else 0.2, "output_tokens": 10, "cost_usd": 6e-6},
                             "b": {"quality": 0.9, "output_tokens": None, "cost_usd": 5e-5}},
            }) + "\n")
    return data


def test_replay_cli_on_an_unseen_file(tmp_path, capsys):
    """Any file in the shared format works, also without a models file (prices inferred from costs)."""
    from router.cli import main

    data = _unseen(tmp_path)
    assert main(["replay", "--data", str(data), "--policy", "qlearning", "--seeds", "0,1", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for key in ("policy", "dataset", "n_prompts", "seeds", "mean_quality", "mean_quality_second_half", "mean_cost_usd",
                "decision_ms_p50", "decision_ms_p99"):
        assert key in report
    assert report["n_prompts"] == 40 and report["seeds"] == [0, 1]
    assert report["references"]["best_single"]["model"] == "b"
    assert set(report["references"]) >= {"oracle", "best_single", "random"}
    assert report["shadows"] == [] and report["peer"] is False
    assert load_dataset(data).models[0].price_per_1m_input_tokens_usd == pytest.approx(1e6 * 6e-6 / 60)
    out = capsys.readouterr()
    assert json.loads(out.out)["policy"] == "qlearning"
    assert out.err == ""  # progress goes to a terminal only


def test_policy_all_without_history_skips_the_predictor_policies(tmp_path, capsys):
    from router.cli import main

    assert main(["replay", "--data", str(_unseen(tmp_path)), "--policy", "all", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "forc, hybrid" in out.err and "--train-fraction" in out.err
    rows = [line.split("|")[1].strip() for line in out.out.splitlines() if line.startswith("| ") and not line.startswith("| *")]
    assert rows[1:] == [p for p in registry.names() if p not in PREDICTED_POLICIES]
    assert not any((tmp_path / "out" / p).exists() for p in PREDICTED_POLICIES)
    assert (tmp_path / "out" / "comparison.md").read_text() in out.out


def test_select_policies():
    assert select_policies("thompson, vw", with_history=False) == (["thompson", "vw"], [])
    assert select_policies("all", with_history=True) == (registry.names(), [])
    kept, skipped = select_policies("all", with_history=False)
    assert skipped == list(PREDICTED_POLICIES)
    assert sorted(kept + skipped) == registry.names() and not set(kept) & set(PREDICTED_POLICIES)
    with pytest.raises(ValueError, match="nope"):
        select_policies("thompson,nope", with_history=False)


def test_a_comma_separated_policy_list_runs_each(tmp_path, capsys):
    from router.cli import main

    assert main(["replay", "--data", str(_unseen(tmp_path)), "--policy", "thompson,fixed", "--out", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").iterdir() if p.is_dir()} == {"thompson", "fixed"}
    assert "| thompson |" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["flag", "config"])
def test_unconstrained_peers_beside_a_budgeted_run_say_so(how, tmp_path, capsys):
    from router.cli import main

    budget = ["--budget", "2e-5"] if how == "flag" else ["--config", str(_config(tmp_path / "c.toml", "[budget]\ntarget_usd_per_query = 2e-5\n"))]
    assert main(["replay", "--data", str(_unseen(tmp_path)), "--policy", "thompson", "--peers", "--out", str(tmp_path / "out"), *budget]) == 0
    ours = json.loads((tmp_path / "out" / "thompson" / "report.json").read_text())
    assert ours["budget_usd"] == 2e-5 and "note" not in ours
    peer = json.loads((tmp_path / "out" / "river-ucb" / "report.json").read_text())
    assert peer["peer"] is True and peer["budget_usd"] is None and peer["note"] == PEER_NOTE
    table = capsys.readouterr().out
    assert "| river-ucb (peer, no budget) |" in table and "| thompson |" in table
    assert "peers marked 'no budget' ran unconstrained" in table


def test_peers_without_a_budget_carry_no_note(tmp_path, capsys):
    from router.cli import main

    assert main(["replay", "--data", str(_unseen(tmp_path)), "--policy", "thompson", "--peers", "--out", str(tmp_path / "out")]) == 0
    peer = json.loads((tmp_path / "out" / "river-ucb" / "report.json").read_text())
    assert peer["budget_usd"] is None and "note" not in peer
    assert "| river-ucb (peer) |" in capsys.readouterr().out


def test_shadows_flag_runs_the_configs_other_policies(tmp_path, capsys):
    from router.cli import main

    config = _config(tmp_path / "c.toml", top='default_policy = "thompson"\npolicies = ["thompson", "elo", "random"]\n')
    assert main(["replay", "--data", str(_unseen(tmp_path)), "--policy", "elo", "--shadows", "--config", str(config),
                 "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["shadows"] == ["thompson", "random"]
    capsys.readouterr()


def test_bad_replay_input_is_a_clear_error(tmp_path, capsys):
    from router.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "prompt": "x"}\n')
    assert main(["replay", "--data", str(bad), "--policy", "qlearning", "--out", str(tmp_path)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
    assert main(["replay", "--data", str(bad), "--policy", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert main(["replay", "--data", str(bad), "--policy", "qlearning", "--budget", "-1", "--out", str(tmp_path)]) == 2


# --- the embedding cache is keyed by the embedder's weights and settings ----------------------------------


class _FakeEmbedder:
    def __init__(self, fingerprint: str, value: float) -> None:
        self.name, self.fingerprint, self.value, self.calls = "same-name-384", fingerprint, value, 0

    def embed(self, texts):
        self.calls += 1
        return np.full((len(texts), 4), self.value, dtype=np.float32)


def test_embedding_cache_is_keyed_by_the_embedders_fingerprint(tmp_path):
    dataset = _hand()
    first, other = _FakeEmbedder("a" * 64, 1.0), _FakeEmbedder("b" * 64, 2.0)
    assert embed_dataset("x.jsonl", dataset, first, tmp_path)[0, 0] == 1.0
    assert embed_dataset("x.jsonl", dataset, first, tmp_path)[0, 0] == 1.0 and first.calls == 1  # cached
    assert embed_dataset("x.jsonl", dataset, other, tmp_path)[0, 0] == 2.0 and other.calls == 1  # same name, other weights
    assert "a" * 16 in embedding_cache_file("x.jsonl", dataset, first, tmp_path).name


def test_embedder_fingerprint_follows_weights_and_settings(tmp_path, embedder):
    from router.embedding import Embedder

    assert Embedder().fingerprint == embedder.fingerprint  # stable
    assert Embedder(quantize=False).fingerprint != embedder.fingerprint
    reference = Embedder(backend="torch")
    assert reference.fingerprint != embedder.fingerprint
    # the same weights with another setting (a shorter input length): another fingerprint, same name
    copy = tmp_path / reference.path.name
    for source in reference.path.rglob("*"):
        target = copy / source.relative_to(reference.path)
        if source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    settings = copy / "sentence_bert_config.json"
    value = json.loads(settings.read_text())
    settings.unlink()
    settings.write_text(json.dumps({**value, "max_seq_length": 64}))
    changed = Embedder(str(copy), backend="torch")
    assert changed.name == reference.name and changed.fingerprint != reference.fingerprint


# --- package layout ---------------------------------------------------------------------------------------


def test_replay_modules_import_without_a_cycle_and_passes_without_peer_libraries():
    code = (
        "import sys, router.replay.passes\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('mabwiser', 'river', 'matplotlib')], 'peer libraries loaded'\n"
        "assert 'router.replay.peers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    subprocess.run([sys.executable, "-c", "import router.replay.peers"], check=True, timeout=120)
    subprocess.run([sys.executable, "-c", "import router.replay.report, router.replay.plots, router.replay.data"], check=True, timeout=120)


def test_train_fraction_trains_predictors_on_history_and_measures_the_rest(tmp_path, embedder):
    from router.predictors import TrainSettings, build_tiny_backbone

    sample = Path(__file__).parent.parent / "data" / "llmrouter_sample.jsonl"
    backbone = build_tiny_backbone("distilbert", tmp_path / "backbone")
    train = TrainFraction(0.5, TrainSettings(backbone=str(backbone), epochs=2, batch_size=16, learning_rate=1e-3))
    reports = run(sample, ["forc", "hybrid", "thompson"], [0], None, tmp_path / "out", embedder, cache_dir=tmp_path, train=train)
    dataset = load_dataset(sample)
    routed = np.random.default_rng(0).permutation(len(dataset.prompts))[200:]
    for r in reports:
        assert r["train_fraction"] == 0.5 and r["n_routed"] == 200
        # every policy is measured on the same routed prompts: the references are those prompts'
        assert r["references"] == references(dataset, [routed[100:]])
        assert r["references_all"] == references(dataset, [routed])
    stats = {r["policy"]: r for r in reports}
    assert stats["forc"]["references"]["oracle"] != references(dataset)["oracle"]
    # the predictors decided (a fallback-only forc would repeat thompson's choices and numbers)
    assert stats["forc"]["mean_cost_usd"] != stats["thompson"]["mean_cost_usd"]
    assert (tmp_path / "out" / "comparison.md").exists()


# --- warm starts, RouteLLM's matrix factorisation, two-model routing (APGR) -------------------------------


def test_warm_start_learns_the_history_part_as_history_and_routes_the_same_prompts(unique_vectors, monkeypatch):
    """--warm-start: every policy warm-starts from the history part (every model's outcome) and is never
    fed it online; cold and warm route and measure the same prompts."""
    dataset, _, picks = _synthetic(400)
    vectors = unique_vectors[picks]
    train = TrainFraction(0.5)
    warm_calls, learned = [], []
    policy_class = registry.get("thompson")
    original_warm, original_learn = policy_class._warm_start, policy_class._learn
    monkeypatch.setattr(policy_class, "_warm_start", lambda self, history: warm_calls.append(history) or original_warm(self, history))
    monkeypatch.setattr(policy_class, "_learn", lambda self, feedback: learned.append(feedback.arm) or original_learn(self, feedback))
    warm = replay_pass(dataset, vectors, "thompson", 0, train=train, warm_start=True)
    assert len(warm_calls) == 1 and len(warm_calls[0]) == 200
    order = np.random.default_rng(0).permutation(400)
    first = dataset.prompts[order[0]]
    assert warm_calls[0][0].qualities == {m: first.outcomes[m].quality for m in dataset.model_names}
    assert np.array_equal(warm_calls[0][0].embedding, vectors[order[0]])
    assert len(learned) == 200  # only the routed part, online
    cold = replay_pass(dataset, vectors, "thompson", 0, train=train)
    assert warm.routed.tolist() == cold.routed.tolist() == order[200:].tolist()


def test_warm_start_flag_is_reported_and_needs_a_history_part(tmp_path, capsys):
    from router.cli import main

    data = _unseen(tmp_path)
    assert main(["replay", "--data", str(data), "--policy", "thompson", "--warm-start", "--out", str(tmp_path / "x")]) == 2
    assert "--warm-start needs --train-fraction" in capsys.readouterr().err
    assert main(["replay", "--data", str(data), "--policy", "thompson,elo", "--train-fraction", "0.5", "--warm-start",
                 "--out", str(tmp_path / "warm")]) == 0
    report = json.loads((tmp_path / "warm" / "elo" / "report.json").read_text())
    assert report["warm_start"] is True and "warm start" in report["history_use"]
    assert main(["replay", "--data", str(data), "--policy", "thompson", "--train-fraction", "0.5", "--out", str(tmp_path / "cold")]) == 0
    cold = json.loads((tmp_path / "cold" / "report.json").read_text())
    assert cold["warm_start"] is False and "cold" in cold["history_use"]


def test_a_budget_sweep_with_a_history_part_routes_the_part_after_it(tmp_path, capsys):
    """Single-call policies' cost-quality curves on the same routed prompts as a cascade's (whose sweep
    needs the history part): `--budgets` with `--train-fraction`."""
    from router.cli import main

    data = _unseen(tmp_path)
    out = tmp_path / "sweep"
    assert main(["replay", "--data", str(data), "--policy", "thompson", "--train-fraction", "0.5", "--warm-start",
                 "--budgets", "6e-6,1e-3", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["train_fraction"] == 0.5 and report["n_routed"] == 20
    tight, loose = report["budget_sweep"]
    assert (tight["budget_usd"], loose["budget_usd"]) == (6e-6, 1e-3)
    # warm-started, thompson knows b is better; only the loose budget pays for it
    assert tight["mean_cost_usd"] < loose["mean_cost_usd"] and tight["shares"]["a"] > loose["shares"]["a"]
    assert report["aiq"] > 0


def test_mf_trains_on_the_history_part_and_routes_the_rest(tmp_path, embedder):
    sample = Path(__file__).parent.parent / "data" / "llmrouter_sample.jsonl"
    reports = run(sample, ["mf", "thompson"], [0], None, tmp_path / "out", embedder, cache_dir=tmp_path, train=TrainFraction(0.5))
    stats = {r["policy"]: r for r in reports}
    assert stats["mf"]["n_routed"] == 200
    # the factorisation decided (a fallback-only mf would repeat thompson's choices and numbers)
    assert stats["mf"]["mean_cost_usd"] != stats["thompson"]["mean_cost_usd"]


def test_per_call_costs_make_a_budget_a_share_of_strong_calls():
    from router.replay.report import Evaluation, per_call_costs

    dataset, _, _ = _synthetic(50)
    flat = per_call_costs(dataset)
    for name in dataset.model_names:
        costs = {p.outcomes[name].cost_usd for p in flat.prompts}
        assert len(costs) == 1 and costs.pop() == pytest.approx(np.mean([p.outcomes[name].cost_usd for p in dataset.prompts]))
    assert len({p.prompt_tokens for p in flat.prompts}) == 1
    assert [p.outcomes["small"].quality for p in flat.prompts] == [p.outcomes["small"].quality for p in dataset.prompts]
    two = Dataset("two", [Prompt(p.id, p.prompt, p.prompt_tokens, {m: p.outcomes[m] for m in ("small", "large")}) for p in dataset.prompts],
                  [MODELS[0], MODELS[2]])
    lambdas = Evaluation(two, np.zeros((50, 4)), [0]).call_share_lambdas()
    # a strong call costs lambda * (2e-4 - 1e-5) / mean(1e-5, 2e-4): the quality gain it must bring
    assert [lam * (2e-4 - 1e-5) / 1.05e-4 for lam in lambdas] == pytest.approx(list(__import__("router.replay.report", fromlist=["x"]).CALL_SHARE_GAINS))


def test_two_models_report_apgr_over_the_strong_call_share_and_flag_random_level(tmp_path, unique_vectors):
    """RouteLLM's evaluation: per-call costs, a sweep of the strong-call threshold, APGR per seed, and a
    router at random's level (APGR ~0.5) says so in its report and in the table."""
    dataset, _, picks = _synthetic(300)
    path = _write(dataset, tmp_path / "two_routing.jsonl")
    np.save(tmp_path / "vectors.npy", unique_vectors[picks])

    class Cached:  # the replay's embedder: the real MiniLM vectors of these prompts
        name, fingerprint = "cached", "0" * 16

        def embed(self, texts):
            return np.load(tmp_path / "vectors.npy")

    reports = run(path, ["random", "qlearning"], [0, 1], None, tmp_path / "out", Cached(), models=["small", "large"], cache_dir=tmp_path)
    by = {r["policy"]: r for r in reports}
    for r in reports:
        assert r["weak_model"] == "small" and r["strong_model"] == "large"
        assert r["apgr_sweep"].startswith("strong-call threshold") and len(r["apgr_per_seed"]) == 2
        assert r["apgr_random"] == 0.5 and r["apgr_vs_random"] == pytest.approx(r["apgr"] - 0.5)
        assert len(r["budget_sweep"]) == 9 and all(len(p["per_seed"]) == 2 for p in r["budget_sweep"])
    assert by["random"]["apgr_at_random_level"] is True
    table = (tmp_path / "out" / "comparison.md").read_text()
    random_row = next(line for line in table.splitlines() if line.startswith("| random |"))
    assert "(random level)" in random_row and "APGR swept over the strong-call threshold" in table
