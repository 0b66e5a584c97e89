"""Training both predictors, scoring a model on outcomes, and the rule for promoting a new one."""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

import torch
from pydantic import Field

from router.embedding import packaged_minilm_path
from router.predictors.data import ForcRows, Outcome, PairRows, Rows, split_by_time
from router.predictors.models import ForcPredictor, HybridPredictor, Network, Predictor, StrictModel, TextModel
from router.progress import bar

P = TypeVar("P", ForcPredictor, HybridPredictor)


class TrainSettings(StrictModel):
    """How to train. The defaults fit the packaged MiniLM (6 layers). bench/train.py, FORC on 3,000 prompts
    x 9 backends, 2 threads on a 2-core machine busy with other work (load 3-4): the top 3 layers trained
    took 418 s (440 s CPU) for validation loss 0.530 against the constant 0.627; all layers 525 s (571 s
    CPU) for 0.527. Hence the default: the same loss for a quarter less CPU."""

    backbone: str = Field(default="", description="AutoModel/AutoTokenizer directory; empty: the packaged MiniLM.")
    max_length: int = Field(default=128, ge=8, le=4096, description="Tokens kept per prompt.")
    epochs: int = Field(default=2, ge=0)
    batch_size: int = Field(default=32, ge=1)
    learning_rate: float = Field(default=5e-5, ge=0, description="Encoder learning rate (AdamW, linear decay to 0).")
    head_learning_rate: float = Field(default=1e-3, ge=0, description="Higher: the head's last layer starts at zero.")
    trainable_layers: int | None = Field(
        default=3, ge=0, description="Train only the top N encoder layers (embeddings frozen); None: all of it."
    )
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    threads: int = Field(default=1, ge=1, description="torch threads while training; the service shares its cores.")
    seed: int = 0
    max_samples: int | None = Field(default=None, ge=2, description="Use at most this many latest prompts.")


class SampleCounts(StrictModel):
    """Prompts (rows) in each split, and the outcomes they hold."""

    train: int
    validation: int
    outcomes: int


@dataclass(frozen=True)
class TrainingResult(Generic[P]):
    """A trained candidate, how it scored, and the validation outcomes it was scored on."""

    predictor: P
    samples: SampleCounts
    validation_loss: float
    baseline_loss: float  # a constant predictor (the training means) on the same validation split
    duration_s: float
    backbone: str  # the directory actually used
    settings: TrainSettings
    validation: list[Outcome]


def train_forc(
    outcomes: Sequence[Outcome], backends: Sequence[str], settings: TrainSettings | None = None
) -> TrainingResult[ForcPredictor]:
    """FORC on the outcomes of `backends` (others are left out); the latest prompts validate."""
    settings = settings or TrainSettings()
    rows = ForcRows.build(outcomes, backends)
    train, validation = split_by_time(rows, settings.validation_fraction, settings.max_samples)
    lengths_seen = train.tokens_mask.any(0).tolist()
    return _train(
        train, validation, 2 * len(backends), settings, lambda model, _: ForcPredictor(model, list(backends), lengths_seen)
    )


def train_hybrid(
    outcomes: Sequence[Outcome], small: str, large: str, tolerance: float, target_large_share: float,
    settings: TrainSettings | None = None,
) -> TrainingResult[HybridPredictor]:
    """The Hybrid-LLM classifier, on the prompts that have outcomes of both backends; its threshold is then
    calibrated on the validation prompts so that `target_large_share` of them would go to `large`."""
    if not 0 <= target_large_share <= 1:
        raise ValueError(f"target_large_share {target_large_share} is not in [0, 1]")
    settings = settings or TrainSettings()
    rows = PairRows.build(outcomes, small, large, tolerance)
    train, validation = split_by_time(rows, settings.validation_fraction, settings.max_samples)

    def calibrated(model: TextModel, validation_outputs: torch.Tensor) -> HybridPredictor:
        probabilities = torch.sigmoid(validation_outputs[:, 0]).tolist()
        threshold = calibrate_threshold(probabilities, target_large_share)
        share = sum(probability < threshold for probability in probabilities) / len(probabilities)
        return HybridPredictor(model, small, large, tolerance, threshold, share)

    return _train(train, validation, 1, settings, calibrated)


def calibrate_threshold(probabilities: Sequence[float], target_large_share: float) -> float:
    """The t for which the share of `probabilities` below t is as near `target_large_share` as ties allow."""
    ordered = sorted(probabilities)
    below = round(target_large_share * len(ordered))
    if below == 0:
        return ordered[0]
    if below == len(ordered):
        return math.nextafter(ordered[-1], math.inf)
    return (ordered[below - 1] + ordered[below]) / 2


def _train(
    train: Rows, validation: Rows, outputs: int, settings: TrainSettings,
    finish: Callable[[TextModel, torch.Tensor], P],
) -> TrainingResult[P]:
    started = time.monotonic()
    backbone = settings.backbone or packaged_minilm_path()
    with _torch_threads(settings.threads), torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        model = TextModel.from_backbone(backbone, outputs, settings.max_length)
        baseline = train.means()
        with torch.no_grad():
            model.network.head[-1].bias.copy_(baseline)
        _fit(model, train, settings)
        validation_outputs = model.outputs(validation.texts)
        predictor = finish(model, validation_outputs)
    return TrainingResult(
        predictor=predictor,
        samples=SampleCounts(
            train=len(train.texts), validation=len(validation.texts),
            outcomes=sum(len(group) for group in train.outcomes + validation.outcomes),
        ),
        validation_loss=validation.loss(validation_outputs).item(),
        baseline_loss=validation.loss(baseline.expand(len(validation.texts), -1)).item(),
        duration_s=time.monotonic() - started, backbone=backbone, settings=settings,
        validation=[outcome for group in validation.outcomes for outcome in group],
    )


def _fit(model: TextModel, rows: Rows, settings: TrainSettings) -> None:
    """AdamW with a linear decay to zero, gradient norm clipped at 1, batches of similar token length."""
    network = model.network
    optimizer = torch.optim.AdamW(
        [
            {"params": _trainable_backbone_parameters(network, settings.trainable_layers), "lr": settings.learning_rate},
            {"params": list(network.head.parameters()), "lr": settings.head_learning_rate},
        ],
        weight_decay=0.01,
    )
    ids = model.token_ids(rows.texts)
    steps = settings.epochs * math.ceil(len(ids) / settings.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    generator = random.Random(settings.seed)
    network.train()
    with bar("training predictor", steps, unit="batch") as update:
        for _ in range(settings.epochs):
            for batch in _length_batches([len(row) for row in ids], settings.batch_size, generator):
                loss = rows.subset(batch).loss(network(*model.collate([ids[index] for index in batch])))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                update(1)
    network.eval()


def _trainable_backbone_parameters(network: Network, trainable_layers: int | None) -> list[torch.nn.Parameter]:
    """All backbone parameters, or those of its top `trainable_layers` layers with the rest frozen
    (no gradient, so the backward pass stops there: faster on CPU)."""
    named = list(network.backbone.named_parameters())
    if trainable_layers is None:
        return [parameter for _, parameter in named]
    layer_of = {name: int(match.group(1)) for name, _ in named if (match := re.search(r"\blayer\.(\d+)\.", name))}
    if not layer_of:
        raise ValueError("trainable_layers: the backbone has no 'layer.N.' parameters to choose from")
    first = max(layer_of.values()) + 1 - trainable_layers
    for name, parameter in named:
        parameter.requires_grad_(layer_of.get(name, -1) >= first)
    return [parameter for _, parameter in named if parameter.requires_grad]


def _length_batches(lengths: list[int], batch_size: int, generator: random.Random) -> list[list[int]]:
    """Shuffled batches of texts of similar length, so little compute goes into padding."""
    order = list(range(len(lengths)))
    generator.shuffle(order)
    pool = batch_size * 16
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start : start + pool], key=lengths.__getitem__)
        batches.extend(chunk[index : index + batch_size] for index in range(0, len(chunk), batch_size))
    generator.shuffle(batches)
    return batches


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def validation_loss(predictor: Predictor, outcomes: Sequence[Outcome]) -> float:
    """The predictor's loss on `outcomes`, as defined in training, so two models compare on one split."""
    rows: ForcRows | PairRows
    if isinstance(predictor, ForcPredictor):
        unknown = {outcome.backend for outcome in outcomes} - set(predictor.backends)
        if unknown:
            raise ValueError(f"the predictor does not score backends {sorted(unknown)}")
        rows = ForcRows.build(outcomes, predictor.backends)
    else:
        rows = PairRows.build(outcomes, predictor.small, predictor.large, predictor.tolerance)
    if not rows.texts:
        raise ValueError("no outcomes to score")
    return rows.loss(predictor.model.outputs(rows.texts)).item()


class Promotion(NamedTuple):
    promote: bool
    reason: str
    current_loss: float | None  # the current model on the candidate's validation split; None: not scored


def should_promote(candidate: TrainingResult[P], current: Predictor | None) -> Promotion:
    """Promote when the candidate's validation loss is no worse than the current model's on the same split,
    or when the current model cannot be scored there (none, other backends, pair or tolerance)."""
    if current is None:
        return Promotion(True, "no current model", None)
    new = candidate.predictor
    if isinstance(new, ForcPredictor) and isinstance(current, ForcPredictor):
        comparable = set(new.backends) <= set(current.backends)
    elif isinstance(new, HybridPredictor) and isinstance(current, HybridPredictor):
        comparable = (new.small, new.large, new.tolerance) == (current.small, current.large, current.tolerance)
    else:
        comparable = False
    if not comparable:
        return Promotion(True, "the current model predicts something else", None)
    current_loss = validation_loss(current, candidate.validation)
    relation = "<=" if candidate.validation_loss <= current_loss else ">"
    reason = f"validation loss {candidate.validation_loss:.4f} {relation} current model's {current_loss:.4f}"
    return Promotion(relation == "<=", reason, current_loss)
