"""Learned predictors for two routing methods and an answer scorer, trained from logged outcomes; no
database, no web.

FORC (arXiv 2308.06077): a transformer encoder with one multi-output head predicts, per backend, the
quality in [0,1] and the output length of a prompt; the caller turns length into cost with its prices.
Hybrid-LLM (ICLR'24): the same kind of encoder predicts P(quality(small) >= quality(large) - tolerance);
the threshold below which a prompt goes to the large model is calibrated on validation data so that a
target share goes there (as RouteLLM does), and the share actually reached is reported.
The answer scorer (a cross-encoder over (query, answer), trained to rank answers to the same prompt) scores
answers for the answer-aware modes: cascade, parallel selection.

- `data`: outcomes, grouped by prompt into rows with masks, the losses, the split by time.
- `models`: encoder + mean pooling + head, the two predictors, tiny test backbones.
- `training`: training, scoring a model on outcomes, the promotion rule.
- `scorer`: the answer scorer, its data, training, validation and promotion rule.
- `artifacts`: versioned model directories with an atomic `current` pointer.
"""

from router.predictors.artifacts import ArtifactMetadata, ArtifactStore, Version
from router.predictors.data import LENGTH_LOSS_WEIGHT, Outcome, outcomes_from_jsonl
from router.predictors.models import (
    KINDS,
    ForcPredictor,
    HybridPredictor,
    Kind,
    Prediction,
    Predictor,
    build_tiny_backbone,
)
from router.predictors.scorer import AnswerSample, AnswerScorer, length_scores, should_promote_scorer, train_scorer
from router.predictors.training import (
    Promotion,
    SampleCounts,
    TrainingResult,
    TrainSettings,
    calibrate_threshold,
    should_promote,
    train_forc,
    train_hybrid,
    validation_loss,
)

__all__ = [
    "KINDS",
    "LENGTH_LOSS_WEIGHT",
    "AnswerSample",
    "AnswerScorer",
    "ArtifactMetadata",
    "ArtifactStore",
    "ForcPredictor",
    "HybridPredictor",
    "Kind",
    "Outcome",
    "Prediction",
    "Predictor",
    "Promotion",
    "SampleCounts",
    "TrainSettings",
    "TrainingResult",
    "Version",
    "build_tiny_backbone",
    "calibrate_threshold",
    "length_scores",
    "outcomes_from_jsonl",
    "should_promote",
    "should_promote_scorer",
    "train_forc",
    "train_hybrid",
    "train_scorer",
    "validation_loss",
]
