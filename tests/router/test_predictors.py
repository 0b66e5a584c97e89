"""FORC and Hybrid-LLM predictors trained for real (tiny DistilBERT and DeBERTa-v2 encoders built from
config, the packaged MiniLM tokenizer) on real recorded outcomes from ../shared/data, and their artifacts."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest

from router.predictors import (
    ArtifactStore,
    ForcPredictor,
    HybridPredictor,
    Outcome,
    TrainingResult,
    TrainSettings,
    build_tiny_backbone,
    outcomes_from_jsonl,
    should_promote,
    train_forc,
    train_hybrid,
    validation_loss,
)
from tests.conftest import shared_data_dir, unavailable

DATA = shared_data_dir()
# llmrouter: 0/1 correctness on 14 tasks, no output lengths; this pair's label (chatqa-70b at least as good
# as nemotron-51b) holds on 53% of prompts and depends strongly on the task, which the prompt shows
SMALL, LARGE = "llama3-chatqa-1.5-70b", "llama-3.1-nemotron-51b-instruct"
TARGET_LARGE_SHARE = 0.3


def tiny_settings(backbone: Path, **changes: object) -> TrainSettings:
    fields = {"backbone": str(backbone), "max_length": 64, "epochs": 5, "batch_size": 16, "learning_rate": 1e-3,
              "head_learning_rate": 1e-3, "trainable_layers": None, "threads": 2}
    return TrainSettings(**(fields | changes))


def data_file(name: str) -> Path:
    path = DATA / name
    if not path.is_file():
        unavailable(f"shared routing data {path} not found")
    return path


@pytest.fixture(scope="module")
def backbones(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backbones")
    return {kind: build_tiny_backbone(kind, root / kind) for kind in ("distilbert", "deberta-v2")}


@pytest.fixture(scope="module")
def alpaca() -> list[Outcome]:
    """400 prompts x 12 models, with qualities in [0,1] and output lengths."""
    return outcomes_from_jsonl(data_file("alpaca_eval_routing.jsonl"), prompts=400, seed=1)


@pytest.fixture(scope="module")
def llmrouter_lines() -> list[str]:
    return [line for line in data_file("llmrouter_routing.jsonl").read_text().split("\n") if line.strip()]


@pytest.fixture(scope="module")
def llmrouter() -> list[Outcome]:
    return outcomes_from_jsonl(data_file("llmrouter_routing.jsonl"), prompts=800, seed=1)


@pytest.fixture(scope="module")
def forc(backbones, alpaca) -> TrainingResult[ForcPredictor]:
    backends = sorted({outcome.backend for outcome in alpaca})
    return train_forc(alpaca, backends, tiny_settings(backbones["distilbert"]))


@pytest.fixture(scope="module")
def hybrid(backbones, llmrouter) -> TrainingResult[HybridPredictor]:
    # 3 epochs: on 640 prompts a random 1-layer encoder overfits the noisy 0/1 labels after that
    settings = tiny_settings(backbones["deberta-v2"], epochs=3)
    return train_hybrid(llmrouter, SMALL, LARGE, 0.0, TARGET_LARGE_SHARE, settings)


def test_forc_beats_a_constant_predictor(forc, alpaca):
    assert (forc.samples.train, forc.samples.validation, forc.samples.outcomes) == (320, 80, 400 * 12)
    assert forc.validation_loss < 0.97 * forc.baseline_loss, (forc.validation_loss, forc.baseline_loss)
    # validation_loss() is the training definition: it reproduces the figure from the outcomes alone
    assert validation_loss(forc.predictor, forc.validation) == pytest.approx(forc.validation_loss, rel=1e-5)
    [prediction] = forc.predictor.predict(["Write a long story about a dragon."])
    assert set(prediction) == {outcome.backend for outcome in alpaca}
    for quality, tokens in prediction.values():
        assert 0 < quality < 1 and tokens is not None and 1 < tokens < 5000


def test_hybrid_beats_a_constant_predictor_and_sends_the_target_share_to_the_large_model(hybrid, llmrouter_lines):
    assert hybrid.samples.train == 640 and hybrid.samples.validation == 160
    assert hybrid.validation_loss < 0.95 * hybrid.baseline_loss, (hybrid.validation_loss, hybrid.baseline_loss)
    predictor = hybrid.predictor
    assert predictor.large_share == pytest.approx(TARGET_LARGE_SHARE, abs=0.01)
    # the threshold carries over to prompts it was not calibrated on
    seen = {outcome.text for outcome in hybrid.validation}
    unseen = [prompt for line in random.Random(2).sample(llmrouter_lines, 600)
              if (prompt := json.loads(line)["prompt"]) not in seen][:400]
    share = sum(predictor.use_large(unseen)) / len(unseen)
    assert abs(share - TARGET_LARGE_SHARE) < 0.1, share


def test_save_and_load_give_identical_predictions(forc, hybrid, tmp_path):
    texts = ["What is 17 * 23?", "Translate 'good morning' into French.", "def add(a, b):"]
    forc.predictor.save(tmp_path / "forc")
    hybrid.predictor.save(tmp_path / "hybrid")
    assert ForcPredictor.load(tmp_path / "forc").predict(texts) == forc.predictor.predict(texts)
    loaded = HybridPredictor.load(tmp_path / "hybrid")
    assert loaded.prob_small_ok(texts) == hybrid.predictor.prob_small_ok(texts)
    assert (loaded.threshold, loaded.large_share) == (hybrid.predictor.threshold, hybrid.predictor.large_share)


def test_a_backend_without_recorded_lengths_gets_no_length_estimate(backbones, llmrouter):
    untrained = train_forc(llmrouter, [SMALL, LARGE], tiny_settings(backbones["distilbert"], epochs=0))
    [prediction] = untrained.predictor.predict(["What is the capital of France?"])
    assert prediction[SMALL].output_tokens is None and 0 < prediction[SMALL].quality < 1


def test_the_store_serves_only_promoted_versions(forc, hybrid, tmp_path):
    store = ArtifactStore(tmp_path)
    first = store.save_candidate(forc)
    assert store.load_current("forc") is None  # saved, not promoted
    store.promote(first)
    second = store.save_candidate(forc)
    (tmp_path / "forc" / ".partial-crashed").mkdir()  # left by a crash mid-save: never a version
    assert [version.name for version in store.versions("forc")] == ["v0001", "v0002"]
    assert store.current("forc") == first != second
    texts = ["Name three prime numbers."]
    assert store.load_current("forc").predict(texts) == forc.predictor.predict(texts)
    metadata = store.metadata(first)
    assert (metadata.kind, metadata.samples, metadata.validation_loss) == ("forc", forc.samples, forc.validation_loss)
    assert metadata.predictor.backends == forc.predictor.backends and metadata.settings == forc.settings

    store.promote(store.save_candidate(hybrid))
    loaded = store.load_current("hybrid", backends=[SMALL, LARGE, "another"])
    assert loaded is not None and loaded.threshold == hybrid.predictor.threshold


def corrupt_weights(version_dir: Path) -> None:
    weights = version_dir / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def corrupt_metadata(version_dir: Path) -> None:
    (version_dir / "metadata.json").write_text("{not json")


def remove_version(version_dir: Path) -> None:
    shutil.rmtree(version_dir)


@pytest.mark.parametrize(
    ("damage", "reasons"),
    [
        (corrupt_weights, ("weights.safetensors", "SafetensorError")),
        (corrupt_metadata, ("metadata.json: ValidationError", "Invalid JSON")),
        (remove_version, ("metadata.json: FileNotFoundError",)),
    ],
)
def test_a_broken_current_model_is_refused_with_a_warning(forc, tmp_path, caplog, damage, reasons):
    store = ArtifactStore(tmp_path)
    version = store.save_candidate(forc)
    store.promote(version)
    damage(version.path)
    with caplog.at_level(logging.WARNING, logger="llm_router"):
        assert store.load_current("forc") is None
    [record] = [record for record in caplog.records if record.name == "llm_router"]
    assert record.levelno == logging.WARNING and str(version.path) in record.message
    assert all(reason in record.message for reason in reasons), record.message


def test_a_model_for_other_backends_is_refused_with_a_warning(forc, tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    store.promote(store.save_candidate(forc))
    with caplog.at_level(logging.WARNING, logger="llm_router"):
        assert store.load_current("forc", backends=["gpt-3.5-turbo-1106", "new-backend"]) is None
    assert "new-backend" in caplog.text
    assert store.load_current("forc", backends=["gpt-3.5-turbo-1106"]) is not None


def test_a_worse_model_is_not_promoted(forc, backbones, alpaca):
    backends = forc.predictor.backends
    untrained = train_forc(alpaca, backends, tiny_settings(backbones["distilbert"], epochs=0))
    # no training step: the head's starting bias is the training means, exactly the constant baseline
    assert untrained.validation_loss == pytest.approx(untrained.baseline_loss, rel=1e-6)
    assert untrained.validation == forc.validation  # same data and settings: the same split
    kept = should_promote(untrained, forc.predictor)
    assert not kept.promote and kept.current_loss == pytest.approx(forc.validation_loss, rel=1e-5)
    assert should_promote(forc, untrained.predictor).promote
    assert should_promote(forc, None).promote


@pytest.mark.parametrize("trainable_layers", [0, 1])
def test_frozen_parts_of_the_encoder_keep_their_weights(backbones, alpaca, trainable_layers):
    from transformers import AutoModel

    original = AutoModel.from_pretrained(backbones["distilbert"]).state_dict()
    settings = tiny_settings(backbones["distilbert"], epochs=1, trainable_layers=trainable_layers)
    trained = train_forc(alpaca, ["gemma-2b-it"], settings).predictor.model.network.backbone.state_dict()
    changed = {name for name, tensor in trained.items() if not tensor.equal(original[name])}
    assert not any(name.startswith("embeddings.") for name in changed)
    assert any(name.startswith("transformer.layer.0.") for name in changed) == (trainable_layers == 1)
