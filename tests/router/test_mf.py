"""RouteLLM's matrix factorisation (`router.predictors.mf`): learning which backend wins where, win
probabilities, validation and promotion through its artifact store, the scheduled job's part from a
database of imported history, and the `mf` policy deciding from its estimates."""

import logging
from pathlib import Path

import numpy as np
import pytest

from policies import Arm, Context, Predictions, registry
from router.db import create_db_engine, migrate
from router.history import import_file
from router.predictors.mf import (
    MfArtifactStore,
    MfPredictor,
    MfSample,
    MfSettings,
    mf_validation_loss,
    should_promote_mf,
    train_mf,
    train_mf_job,
)

SAMPLE = Path(__file__).parents[1] / "data" / "llmrouter_sample.jsonl"
BACKENDS = ["math-expert", "code-expert", "generalist"]


def _unit(rng, dim=16):
    v = rng.normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _samples(n=400, seed=0, full=True):
    """Two kinds of query (two directions of the embedding space): each expert wins its kind."""
    rng = np.random.default_rng(seed)
    math_dir, code_dir = _unit(rng), _unit(rng)
    samples = []
    for i in range(n):
        kind = i % 2
        embedding = (math_dir if kind == 0 else code_dir) + 0.3 * _unit(rng)
        embedding /= np.linalg.norm(embedding)
        best = "math-expert" if kind == 0 else "code-expert"
        qualities = {b: float(rng.random() < (0.9 if b == best else 0.5 if b == "generalist" else 0.1)) for b in BACKENDS}
        if not full:  # a logged decision: one backend's reward
            one = BACKENDS[i % 3]
            qualities = {one: qualities[one]}
        samples.append(MfSample(embedding, qualities, (), float(i)))
    return samples, math_dir, code_dir


def test_learns_which_backend_wins_for_which_kind_of_query():
    samples, math_dir, code_dir = _samples()
    result = train_mf(samples, BACKENDS, MfSettings(dim=8, epochs=150))
    assert result.validation_loss < result.baseline_loss
    assert result.samples.train + result.samples.validation == 400
    quality = result.predictor.quality(np.stack([math_dir, code_dir]))
    assert max(quality[0], key=quality[0].get) == "math-expert"
    assert max(quality[1], key=quality[1].get) == "code-expert"
    wins = result.predictor.win_probability(np.stack([math_dir]))[0]
    assert wins["math-expert"] > 0.5 > wins["code-expert"]
    assert sum(wins.values()) == pytest.approx(1.5)  # three backends: each pair's probabilities sum to 1


def test_learns_from_logged_rewards_and_preferences_alone():
    samples, math_dir, _ = _samples(full=False)
    preferences = [MfSample(s.embedding, {}, (("math-expert", "generalist"),), 1000.0 + i) for i, s in enumerate(samples[::2][:50])]
    result = train_mf(samples + preferences, BACKENDS, MfSettings(dim=8, epochs=150))
    quality = result.predictor.quality(math_dir)[0]
    assert max(quality, key=quality.get) == "math-expert"


def test_save_load_promote_and_refuse_a_broken_artifact(tmp_path, caplog):
    samples, math_dir, _ = _samples()
    settings = MfSettings(dim=8, epochs=60)
    store = MfArtifactStore(tmp_path)
    assert store.load_mf(BACKENDS) is None
    first = train_mf(samples, BACKENDS, settings)
    promotion = should_promote_mf(first, store.load_mf(BACKENDS))
    assert promotion.promote and promotion.reason == "no current model"
    version = store.save_mf(first)
    store.promote(version)
    loaded = store.load_mf(BACKENDS)
    assert isinstance(loaded, MfPredictor) and version.name == "v0001"
    assert loaded.quality(math_dir)[0] == pytest.approx(first.predictor.quality(math_dir)[0])
    assert store.mf_metadata(version).validation_loss == pytest.approx(first.validation_loss)
    # a worse candidate (barely trained) is saved but not promoted
    worse = train_mf(samples, BACKENDS, MfSettings(dim=8, epochs=1, learning_rate=1e-4))
    decision = should_promote_mf(worse, loaded)
    assert not decision.promote and decision.current_loss == pytest.approx(mf_validation_loss(loaded, worse.validation))
    with caplog.at_level(logging.WARNING, logger="llm_router"):
        assert store.load_mf(BACKENDS + ["new-backend"]) is None
        assert "does not score backends" in caplog.text
        (version.path / "mf.npz").write_bytes(b"not a model")
        assert store.load_mf(BACKENDS) is None
        assert "cannot load mf model" in caplog.text


def test_scheduled_job_trains_from_imported_history_and_promotes(tmp_path, embedder):
    db = create_db_engine(f"sqlite:///{tmp_path / 'router.db'}")
    migrate(db)
    import_file(db, SAMPLE)
    backends = ["gemma-2-9b-it", "llama-3.1-8b-instruct", "llama-3.1-nemotron-51b-instruct"]
    run = train_mf_job(db, str(tmp_path / "artifacts"), backends, min_samples=50, settings=MfSettings(dim=8, epochs=40))
    assert run["status"] == "ok" and run["promoted"] and run["version"] == "v0001"
    assert run["samples_train"] + run["samples_validation"] == 400
    assert MfArtifactStore(tmp_path / "artifacts").load_mf(backends) is not None
    skipped = train_mf_job(db, str(tmp_path / "artifacts"), backends, min_samples=10_000, settings=MfSettings(epochs=1))
    assert skipped["status"] == "skipped" and "10000 needed" in skipped["error"]


def test_mf_policy_decides_from_the_estimates_with_lambda_and_falls_back_without_them():
    policy = registry.create("mf", seed=0)
    arms = (Arm("cheap", 1, 1, 1e-6), Arm("dear", 1, 1, 1e-5))
    embedding = np.ones(4, np.float32) / 2
    estimates = Predictions(mf_quality={"cheap": 0.6, "dear": 0.7})
    choice = policy.choose(Context(embedding, 10, arms, predictions=estimates))
    assert choice.arm == "dear" and choice.propensity == 1.0
    paced = policy.choose(Context(embedding, 10, arms, predictions=estimates, cost_weight=1.0, cost_scale=5e-5))
    assert paced.arm == "cheap"  # 0.7 - 0.2 < 0.6 - 0.02
    capped = policy.choose(Context(embedding, 10, arms, predictions=estimates, max_cost_usd=5e-6))
    assert capped.arm == "cheap"
    policy.choose(Context(embedding, 10, arms))  # no model: the fallback bandit decides
    assert policy.stats()["internals"]["decided_by_fallback"] == 1
    partial = Predictions(mf_quality={"cheap": 0.6})
    policy.choose(Context(embedding, 10, arms, predictions=partial))
    assert policy.stats()["internals"]["decided_by_fallback"] == 2


def test_the_training_job_trains_mf_when_the_mf_policy_runs(tmp_path, embedder):
    import json

    from router.config import PREDICTOR_KINDS, load_config
    from router.predictors import build_tiny_backbone
    from router.training import run_training
    from tests.conftest import backend_table, free_port, write_config

    url = f"sqlite:///{tmp_path / 'router.db'}"
    db = create_db_engine(url)
    migrate(db)
    import_file(db, SAMPLE)
    backends = "".join(backend_table(name, free_port(), 0.1, 0.1)
                       for name in ("gemma-2-9b-it", "llama-3.1-8b-instruct", "llama-3.1-nemotron-51b-instruct"))
    predictors = {"backbone": str(build_tiny_backbone("distilbert", tmp_path / "tiny")), "artifacts_dir": str(tmp_path / "artifacts"),
                  "epochs": 1, "batch_size": 32, "schedule": "off", "min_samples": 50}
    section = "[predictors]\n" + "\n".join(f"{k} = {json.dumps(v)}" for k, v in predictors.items())
    with_mf = load_config(write_config(tmp_path / "mf.toml", url, backends, 'policies = ["mf", "thompson"]\n' + section))
    runs = {run["kind"]: run for run in run_training(with_mf, "cli")}
    assert set(runs) == set(PREDICTOR_KINDS), "one run per kind that `llm-router train` and `training_runs.kind` name"
    assert runs["mf"]["status"] == "ok" and runs["mf"]["promoted"] and runs["mf"]["version"] == "v0001"
    # 400 prompts x 3 backends is little data: the factors may add nothing to the backends' means
    assert runs["mf"]["validation_loss"] < 1.05 * runs["mf"]["baseline_loss"] and runs["mf"]["samples_train"] == 320
    without = load_config(write_config(tmp_path / "plain.toml", url, backends, 'policies = ["thompson"]\n' + section))
    assert "mf" not in {run["kind"] for run in run_training(without, "cli")}
