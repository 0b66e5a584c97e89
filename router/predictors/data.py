"""Outcomes, grouped by prompt into training rows, and the losses.

Outcomes give only some (prompt, backend) pairs (a logged decision has one backend per prompt, imported
history has them all), so they are grouped by prompt text into one row with masks, and the losses count
only the observed entries. Each loss has one definition for every model, so two models can be compared
on the same validation split:
- FORC: mean binary cross-entropy of the quality logits against the observed qualities (soft targets),
  plus LENGTH_LOSS_WEIGHT x mean squared error of log1p(output tokens). On the shared data a constant
  predictor scores 0.15-0.7 on the first term and about 1 (the per-backend variance of log length) on
  the second, so a weight of 0.25 keeps either term from drowning the other.
- Hybrid: binary cross-entropy of the logit against the 0/1 label "small is good enough".
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

LENGTH_LOSS_WEIGHT = 0.25
QUALITY_CLAMP = 1e-4  # a mean quality of exactly 0 or 1 would make the starting logit infinite


@dataclass(frozen=True)
class Outcome:
    """One observed result of one backend on one prompt."""

    text: str
    backend: str
    quality: float  # in [0,1]
    output_tokens: int | None  # None where the source did not record a length
    observed_at: float  # unix seconds; the latest prompts become the validation split


@dataclass(frozen=True)
class PromptOutcomes:
    """Everything observed on one prompt text: per backend the mean quality, and the mean answer length
    where one was recorded; `observed_at` is the latest observation."""

    text: str
    qualities: dict[str, float]
    output_tokens: dict[str, float]
    observed_at: float


def by_prompt(outcomes: Iterable[Outcome]) -> list[PromptOutcomes]:
    """Outcomes grouped by prompt text (in order of first appearance); repeated observations of a
    (prompt, backend) pair are averaged. What the `mf` model trains on and what warm starts learn from."""
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[outcome.text].append(outcome)
    grouped = []
    for text, group in groups.items():
        qualities: dict[str, list[float]] = defaultdict(list)
        lengths: dict[str, list[int]] = defaultdict(list)
        for outcome in group:
            qualities[outcome.backend].append(outcome.quality)
            if outcome.output_tokens is not None:
                lengths[outcome.backend].append(outcome.output_tokens)
        grouped.append(PromptOutcomes(
            text, {b: sum(q) / len(q) for b, q in qualities.items()}, {b: sum(n) / len(n) for b, n in lengths.items()},
            max(outcome.observed_at for outcome in group),
        ))
    return grouped


@dataclass(frozen=True)
class ForcRows:
    """One row per prompt text, one column per backend; repeated observations of a pair are averaged."""

    texts: list[str]
    times: list[float]  # the latest observation of the row
    quality: torch.Tensor
    quality_mask: torch.Tensor
    log_tokens: torch.Tensor
    tokens_mask: torch.Tensor
    outcomes: list[list[Outcome]]

    @classmethod
    def build(cls, outcomes: Sequence[Outcome], backends: Sequence[str]) -> ForcRows:
        """Rows of the outcomes of `backends`; outcomes of other backends are left out."""
        column = {backend: index for index, backend in enumerate(backends)}
        by_text: dict[str, list[Outcome]] = defaultdict(list)
        for outcome in outcomes:
            if outcome.backend in column:
                by_text[outcome.text].append(outcome)
        shape = (len(by_text), len(backends))
        quality_sum, quality_count = torch.zeros(shape), torch.zeros(shape)
        tokens_sum, tokens_count = torch.zeros(shape), torch.zeros(shape)
        for row, group in enumerate(by_text.values()):
            for outcome in group:
                cell = (row, column[outcome.backend])
                quality_sum[cell] += outcome.quality
                quality_count[cell] += 1
                if outcome.output_tokens is not None:
                    tokens_sum[cell] += math.log1p(outcome.output_tokens)
                    tokens_count[cell] += 1
        return cls(
            texts=list(by_text),
            times=[max(outcome.observed_at for outcome in group) for group in by_text.values()],
            quality=quality_sum / quality_count.clamp(min=1), quality_mask=quality_count > 0,
            log_tokens=tokens_sum / tokens_count.clamp(min=1), tokens_mask=tokens_count > 0,
            outcomes=list(by_text.values()),
        )

    def subset(self, rows: Sequence[int]) -> ForcRows:
        return ForcRows(
            [self.texts[row] for row in rows], [self.times[row] for row in rows], self.quality[rows],
            self.quality_mask[rows], self.log_tokens[rows], self.tokens_mask[rows], [self.outcomes[row] for row in rows],
        )

    def loss(self, outputs: torch.Tensor) -> torch.Tensor:
        """`outputs`: per row, the quality logit of each backend, then the log1p(tokens) of each."""
        count = self.quality.shape[1]
        quality = torch.nn.functional.binary_cross_entropy_with_logits(outputs[:, :count], self.quality, reduction="none")
        length = (outputs[:, count:] - self.log_tokens) ** 2
        return _masked_mean(quality, self.quality_mask) + LENGTH_LOSS_WEIGHT * _masked_mean(length, self.tokens_mask)

    def means(self) -> torch.Tensor:
        """Per backend the logit of the mean quality and the mean log length (the overall one where a
        backend has no length): the constant baseline, and the head's starting bias."""
        quality = _column_means(self.quality, self.quality_mask, 0.5).clamp(QUALITY_CLAMP, 1 - QUALITY_CLAMP)
        overall_length = self.log_tokens[self.tokens_mask].mean().item() if self.tokens_mask.any() else 0.0
        return torch.cat([torch.logit(quality), _column_means(self.log_tokens, self.tokens_mask, overall_length)])


@dataclass(frozen=True)
class PairRows:
    """Prompts with outcomes of both the small and the large backend; label 1 where small is good enough."""

    texts: list[str]
    times: list[float]
    labels: torch.Tensor
    outcomes: list[list[Outcome]]

    @classmethod
    def build(cls, outcomes: Sequence[Outcome], small: str, large: str, tolerance: float) -> PairRows:
        """Label: mean quality(small) >= mean quality(large) - tolerance, per prompt text."""
        by_text: dict[str, dict[str, list[Outcome]]] = defaultdict(lambda: defaultdict(list))
        for outcome in outcomes:
            if outcome.backend in (small, large):
                by_text[outcome.text][outcome.backend].append(outcome)
        pairs = {text: group[small] + group[large] for text, group in by_text.items() if small in group and large in group}
        labels = [
            _mean_quality(by_text[text][small]) >= _mean_quality(by_text[text][large]) - tolerance for text in pairs
        ]
        return cls(
            texts=list(pairs), times=[max(outcome.observed_at for outcome in group) for group in pairs.values()],
            labels=torch.tensor(labels, dtype=torch.float32), outcomes=list(pairs.values()),
        )

    def subset(self, rows: Sequence[int]) -> PairRows:
        return PairRows(
            [self.texts[row] for row in rows], [self.times[row] for row in rows], self.labels[rows],
            [self.outcomes[row] for row in rows],
        )

    def loss(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(outputs[:, 0], self.labels)

    def means(self) -> torch.Tensor:
        return torch.logit(self.labels.mean().clamp(QUALITY_CLAMP, 1 - QUALITY_CLAMP)).reshape(1)


Rows = TypeVar("Rows", ForcRows, PairRows)


def latest_validate(times: Sequence[float], validation_fraction: float, max_samples: int | None,
                    what: str = "prompts") -> tuple[list[int], list[int]]:
    """Positions (train, validation) of prompts at `times`: the latest `validation_fraction` of the (latest
    `max_samples`) prompts validate. One rule for every predictor kind."""
    order = sorted(range(len(times)), key=times.__getitem__)
    if max_samples is not None:
        order = order[-max_samples:]
    validation = max(1, round(len(order) * validation_fraction))
    if len(order) - validation < 1:
        raise ValueError(f"{len(order)} {what} are too few to train and validate on")
    return order[:-validation], order[-validation:]


def split_by_time(rows: Rows, validation_fraction: float, max_samples: int | None) -> tuple[Rows, Rows]:
    """(train, validation) rows by `latest_validate`."""
    train, validation = latest_validate(rows.times, validation_fraction, max_samples)
    return rows.subset(train), rows.subset(validation)


def outcomes_from_jsonl(path: str | Path, prompts: int | None = None, seed: int = 0) -> list[Outcome]:
    """Outcomes from a routing-data file (one JSON object per prompt with every model's outcome, as in
    shared/data). `prompts` picks that many lines at random. The file has no times, so each prompt gets
    its place in the random order as its time: the split by time is then a random split (the files are
    sorted by task, and file order would validate on one task only)."""
    lines = [line for line in Path(path).read_text().split("\n") if line.strip()]  # not splitlines: prompts hold U+2028
    order = random.Random(seed).sample(range(len(lines)), len(lines) if prompts is None else prompts)
    outcomes = []
    for position, index in enumerate(order):
        record = json.loads(lines[index])
        outcomes.extend(
            Outcome(record["prompt"], backend, float(result["quality"]), result.get("output_tokens"), float(position))
            for backend, result in record["outcomes"].items()
        )
    return outcomes


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return values[mask].mean() if mask.any() else values.sum() * 0.0


def _column_means(values: torch.Tensor, mask: torch.Tensor, fallback: float) -> torch.Tensor:
    counts = mask.sum(0)
    means = (values * mask).sum(0) / counts.clamp(min=1)
    return torch.where(counts > 0, means, torch.full_like(means, fallback))


def _mean_quality(outcomes: Sequence[Outcome]) -> float:
    return sum(outcome.quality for outcome in outcomes) / len(outcomes)
