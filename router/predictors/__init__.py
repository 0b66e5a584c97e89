"""Learned predictors for two routing methods, trained from logged outcomes; no database, no web.

FORC (arXiv 2308.06077): a transformer encoder with one multi-output head predicts, per backend, the
quality in [0,1] and the output length of a prompt; the caller turns length into cost with its prices.
Hybrid-LLM (ICLR'24): the same kind of encoder predicts P(quality(small) >= quality(large) - tolerance);
the threshold below which a prompt goes to the large model is calibrated on validation data so that a
target share goes there (as RouteLLM does), and the share actually reached is reported.

- `data`: outcomes, grouped by prompt into rows with masks, the losses, the split by time.
- `models`: encoder + mean pooling + head, the two predictors, tiny test backbones.
- `training`: training, scoring a model on outcomes, the promotion rule.
- `artifacts`: versioned model directories with an atomic `current` pointer.
"""

from router.predictors.artifacts import ArtifactMetadata, ArtifactStore, Version
from router.predictors.data import LENGTH_LOSS_WEIGHT, Outcome, outcomes_from_jsonl
from router.predictors.models import (
    ForcPredictor,
    HybridPredictor,
    Kind,
    Prediction,
    Predictor,
    build_tiny_backbone,
)
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
    "LENGTH_LOSS_WEIGHT",
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
    "outcomes_from_jsonl",
    "should_promote",
    "train_forc",
    "train_hybrid",
    "validation_loss",
]
