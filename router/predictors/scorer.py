"""The answer scorer: a cross-encoder over (query, answer) that ranks answers to the same query.

What it is (the third predictor kind, "scorer", next to FORC and Hybrid-LLM):
- The query and the answer go through the same kind of transformer encoder as FORC's, as a text pair
  (`[CLS] query [SEP] answer [SEP]`, token types where the backbone has them). When the pair is longer than
  `max_length`, the query is cut first (down to `QUERY_MIN_TOKENS`, at most half the room), then the answer's tail.
- Mean pooling, then a head over the pooled vector and a few cheap features of the whole answer (log
  length in characters and lines, share of list lines, log query length; the encoder sees only the
  answer's start, the features see all of it) and, when the caller says who wrote each answer, a one-hot
  of the backend (a learned prior per backend seen in training; none for others), plus a direct linear
  term on those features. One output: a logit; `sigmoid(logit)` is the estimated quality in [0,1].
- Trained to RANK answers to the same prompt, as LLM-Blender's ranker: per prompt, a listwise softmax
  cross-entropy between softmax(scores) and softmax(quality / RANK_TEMPERATURE) over its answers (prompts
  with one answer have no ranking term), plus ABSOLUTE_WEIGHT x the binary cross-entropy of
  sigmoid(score) against the quality. The linear part (features, backend prior, bias) starts at the linear
  model that minimises that loss; the encoder then learns the rest. On the shared alpaca_eval (linear
  part alone, 5 splits) a weight of 0.5 on the absolute term cost a third of the selection gain over the
  best single model (+0.012 against +0.018 at 0), 0.1 almost nothing (+0.017). So the absolute estimate
  comes from Platt scaling instead, fitted on the validation answers after training: sigmoid(a * score +
  b), monotone, is the quality estimate a cascade's fixed threshold compares with.
- Validation (`validation_loss` below, lower is better, so `should_promote_scorer` keeps the rule of
  `should_promote`): the mean selection regret over the validation prompts with two or more answers,
  i.e. best quality minus the quality of the top-scored answer (ties share the pick). Where the split has
  no such prompt, the binary cross-entropy of sigmoid(score) against the qualities instead. The baseline
  loss is a constant scorer's (ties everywhere: a uniform pick; the training-mean quality for the BCE).
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_model, save_model
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

from router.embedding import packaged_minilm_path
from router.predictors.data import latest_validate
from router.predictors.models import ENCODER_DIR, PREDICTOR_FILE, WEIGHTS_FILE, StrictModel
from router.predictors.training import (
    Promotion,
    SampleCounts,
    TrainingResult,
    TrainSettings,
    _torch_threads,
    _trainable_backbone_parameters,
)
from router.progress import bar

RANK_TEMPERATURE = 0.1  # quality 0.1 apart: target odds e:1 in the listwise term
ABSOLUTE_WEIGHT = 0.1  # weight of the BCE term next to the listwise one (more costs ranking: see train_scorer)
LINEAR_L2 = 1e-3  # ridge penalty of the linear start
QUERY_MIN_TOKENS = 32  # a long pair keeps at least this much of the query
FEATURES = ("log_answer_chars", "log_answer_lines", "list_line_share", "log_query_chars")
QUALITY_CLAMP = 1e-4


@dataclass(frozen=True)
class AnswerSample:
    """One answer to one prompt and how good it was (imported history, or a rewarded delivered answer)."""

    prompt: str
    backend: str
    answer: str
    quality: float  # in [0,1]
    at: float  # unix seconds (or any order); the latest prompts validate


def answer_features(query: str, answer: str) -> list[float]:
    """The cheap features of FEATURES, each scaled to about [0, 1]."""
    lines = [line.strip() for line in answer.split("\n") if line.strip()]
    listed = sum(1 for line in lines if line[:1] in "-*•" or (line[:1].isdigit() and line[1:3].lstrip("0123456789")[:1] in ".)"))
    return [
        math.log1p(len(answer)) / 8.0,
        math.log1p(len(lines)) / 4.0,
        listed / len(lines) if lines else 0.0,
        math.log1p(len(query)) / 8.0,
    ]


def length_scores(answers: Sequence[str]) -> list[float]:
    """The length-only scorer (a baseline): sigmoid of the answer's log length around 1,000 characters."""
    return [1.0 / (1.0 + math.exp(-(math.log1p(len(answer)) - math.log(1000.0)))) for answer in answers]


class ScorerConfig(StrictModel):
    kind: Literal["scorer"] = "scorer"
    max_length: int
    features: list[str] = list(FEATURES)
    query_min_tokens: int = QUERY_MIN_TOKENS
    token_types: bool  # whether the pair's second segment gets token type 1 (BERT-like backbones)
    backends: list[str] = []  # backends with a learned prior (one-hot features); others (or none given) get none


def feature_row(query: str, answer: str, backend: str | None, backends: Sequence[str]) -> list[float]:
    """The cheap features, then the backend's one-hot over `backends` (all zero: unknown or not given)."""
    return answer_features(query, answer) + [1.0 if backend == known else 0.0 for known in backends]


class ScorerNetwork(torch.nn.Module):
    """Backbone, mean pooling, then a head over [pooled, features] plus a linear term on the features."""

    def __init__(self, backbone: torch.nn.Module, features: int, token_types: bool) -> None:
        super().__init__()
        hidden = int(backbone.config.hidden_size)
        self.backbone = backbone
        self.token_types = token_types
        self.head = torch.nn.Sequential(
            torch.nn.Linear(hidden + features, hidden), torch.nn.GELU(), torch.nn.Dropout(0.1), torch.nn.Linear(hidden, 1)
        )
        self.linear = torch.nn.Linear(features, 1, bias=False)
        torch.nn.init.zeros_(self.head[-1].weight)
        torch.nn.init.zeros_(self.linear.weight)
        # standardisation of the features, set from the training answers, and the Platt scaling (a, b) of the
        # output fitted on the validation answers (saved with the weights)
        self.register_buffer("feature_mean", torch.zeros(features))
        self.register_buffer("feature_scale", torch.ones(features))
        self.register_buffer("calibration", torch.tensor([1.0, 0.0]))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, types: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        extra = {"token_type_ids": types} if self.token_types else {}
        hidden = self.backbone(input_ids=ids, attention_mask=mask, **extra).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        features = (features - self.feature_mean) / self.feature_scale
        return (self.head(torch.cat([pooled, features], dim=1)) + self.linear(features))[:, 0]


class AnswerScorer:
    """Scores answers to a query: values in [0,1], higher is better, comparable within one query (and an
    estimate of the answer's quality, so a fixed threshold means the same across queries)."""

    kind = "scorer"

    def __init__(self, network: ScorerNetwork, tokenizer: PreTrainedTokenizerBase, max_length: int,
                 backends: Sequence[str] = ()) -> None:
        self.network = network
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backends = list(backends)

    @classmethod
    def from_backbone(cls, directory: str, max_length: int, backends: Sequence[str] = ()) -> AnswerScorer:
        backbone = AutoModel.from_pretrained(directory)
        token_types = int(getattr(backbone.config, "type_vocab_size", 0) or 0) >= 2
        network = ScorerNetwork(backbone, len(FEATURES) + len(backends), token_types)
        return cls(network, AutoTokenizer.from_pretrained(directory), max_length, backends)

    # -- inputs ---------------------------------------------------------------------------------------

    def encode(self, queries: Sequence[str], answers: Sequence[str], backends: Sequence[str | None] | None = None
               ) -> list[tuple[list[int], list[int], list[float]]]:
        """Per pair: token ids, token types and features, the query cut first when the pair is too long."""
        if not answers:
            return []
        tokenizer = self.tokenizer
        room = self.max_length - tokenizer.num_special_tokens_to_add(pair=True)

        def spans(texts: Sequence[str]) -> list[list[tuple[int, int]]]:
            return tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=room + 1,
                             return_offsets_mapping=True)["offset_mapping"]

        cut_queries, cut_answers = [], []
        for query, answer, q, a in zip(queries, answers, spans(queries), spans(answers), strict=True):
            keep_query = min(len(q), max(min(QUERY_MIN_TOKENS, room // 2), room - len(a)))
            keep_answer = max(0, room - keep_query)
            cut_queries.append(query[: q[keep_query - 1][1]] if 0 < keep_query < len(q) else query if keep_query else "")
            cut_answers.append(answer[: a[keep_answer - 1][1]] if 0 < keep_answer < len(a) else answer if keep_answer else "")
        pairs = tokenizer(cut_queries, cut_answers, truncation="longest_first", max_length=self.max_length)
        types = pairs.get("token_type_ids") or [[0] * len(ids) for ids in pairs["input_ids"]]
        sources = list(backends) if backends is not None else [None] * len(answers)
        return [
            (ids, kinds, feature_row(query, answer, backend, self.backends))
            for ids, kinds, query, answer, backend in zip(pairs["input_ids"], types, queries, answers, sources, strict=True)
        ]

    def collate(self, rows: Sequence[tuple[list[int], list[int], list[float]]]) -> tuple[torch.Tensor, ...]:
        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long)
        for index, (row, kinds, _) in enumerate(rows):
            ids[index, : len(row)] = torch.tensor(row)
            mask[index, : len(row)] = 1
            types[index, : len(kinds)] = torch.tensor(kinds)
        features = torch.tensor([f for _, _, f in rows], dtype=torch.float32)
        return ids, mask, types, features

    # -- scoring --------------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, queries: Sequence[str], answers: Sequence[str], backends: Sequence[str | None] | None = None,
               batch_size: int = 32) -> torch.Tensor:
        """Raw scores of (query, answer) pairs in eval mode, batched by token length."""
        self.network.eval()
        rows = self.encode(queries, answers, backends)
        order = sorted(range(len(rows)), key=lambda index: len(rows[index][0]))
        result = torch.zeros(len(rows))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            result[chunk] = self.network(*self.collate([rows[index] for index in chunk]))
        return result

    def score(self, query: str, answers: Sequence[str], backends: Sequence[str | None] | None = None) -> list[float]:
        """sigmoid(score) of each answer to `query`, in [0,1]; higher is better. `backends` (optional, one per
        answer): who wrote each, so the learned prior of a backend seen in training counts too."""
        if not answers:
            return []
        return self._calibrated(self.logits([query] * len(answers), list(answers), backends)).tolist()

    def score_pairs(self, queries: Sequence[str], answers: Sequence[str], backends: Sequence[str | None] | None = None) -> list[float]:
        """`score` for many (query, answer) pairs at once (one batched pass)."""
        return self._calibrated(self.logits(queries, answers, backends)).tolist() if answers else []

    def _calibrated(self, logits: torch.Tensor) -> torch.Tensor:
        """sigmoid(a * logit + b): monotone (a > 0), so the ranking within a query is the logits'."""
        a, b = self.network.calibration.tolist()
        return torch.sigmoid(a * logits + b)

    # -- files ----------------------------------------------------------------------------------------

    @property
    def config(self) -> ScorerConfig:
        return ScorerConfig(max_length=self.max_length, token_types=self.network.token_types, backends=self.backends)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.network.backbone.config.save_pretrained(directory / ENCODER_DIR)
        self.tokenizer.save_pretrained(directory / ENCODER_DIR)
        save_model(self.network, str(directory / WEIGHTS_FILE))
        (directory / PREDICTOR_FILE).write_text(self.config.model_dump_json(indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> AnswerScorer:
        directory = Path(directory)
        config = ScorerConfig.model_validate_json((directory / PREDICTOR_FILE).read_text())
        if config.features != list(FEATURES):
            raise ValueError(f"it was trained on features {config.features}, this code computes {list(FEATURES)}")
        backbone = AutoModel.from_config(AutoConfig.from_pretrained(directory / ENCODER_DIR))
        network = ScorerNetwork(backbone, len(FEATURES) + len(config.backends), config.token_types)
        load_model(network, str(directory / WEIGHTS_FILE), strict=True)
        return cls(network.eval(), AutoTokenizer.from_pretrained(directory / ENCODER_DIR), config.max_length, config.backends)


# -- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """The answers to one prompt, with who wrote each (repeated (backend, answer) pairs averaged)."""

    prompt: str
    at: float
    answers: list[str]
    backends: list[str]
    qualities: list[float]
    samples: list[AnswerSample]


def group_samples(samples: Sequence[AnswerSample]) -> list[Group]:
    by_prompt: dict[str, dict[tuple[str, str], list[AnswerSample]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        by_prompt[sample.prompt][(sample.backend, sample.answer)].append(sample)
    groups = []
    for prompt, by_answer in by_prompt.items():
        members = [sample for same in by_answer.values() for sample in same]
        groups.append(Group(
            prompt=prompt, at=max(sample.at for sample in members), answers=[answer for _, answer in by_answer],
            backends=[backend for backend, _ in by_answer],
            qualities=[sum(s.quality for s in same) / len(same) for same in by_answer.values()], samples=members,
        ))
    return groups


def split_groups(groups: list[Group], validation_fraction: float, max_samples: int | None) -> tuple[list[Group], list[Group]]:
    """(train, validation) by time, as FORC's split: the latest prompts validate."""
    train, validation = latest_validate([group.at for group in groups], validation_fraction, max_samples, "prompts with answers")
    return [groups[i] for i in train], [groups[i] for i in validation]


def ranking_loss(scores: torch.Tensor, qualities: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The training loss over consecutive groups of `sizes` answers: listwise + ABSOLUTE_WEIGHT x BCE."""
    absolute = torch.nn.functional.binary_cross_entropy_with_logits(scores, qualities)
    listwise = []
    start = 0
    for size in sizes:
        if size >= 2:
            target = torch.softmax(qualities[start : start + size] / RANK_TEMPERATURE, 0)
            listwise.append(-(target * torch.log_softmax(scores[start : start + size], 0)).sum())
        start += size
    ranked = torch.stack(listwise).mean() if listwise else scores.sum() * 0.0
    return ranked + ABSOLUTE_WEIGHT * absolute


def selection_regret(groups: Sequence[Group], scores: Sequence[Sequence[float]]) -> float | None:
    """Mean over groups with >= 2 answers of (best quality - quality of the top-scored answer), ties sharing
    the pick; None when no group has two answers."""
    regrets = []
    for group, values in zip(groups, scores, strict=True):
        if len(group.answers) < 2:
            continue
        top = max(values)
        picked = [q for q, v in zip(group.qualities, values, strict=True) if v >= top]
        regrets.append(max(group.qualities) - sum(picked) / len(picked))
    return sum(regrets) / len(regrets) if regrets else None


def _absolute_loss(groups: Sequence[Group], scores: Sequence[Sequence[float]]) -> float:
    """Binary cross-entropy of the scores (probabilities) against the qualities, over every answer."""
    total = count = 0.0
    for group, values in zip(groups, scores, strict=True):
        for quality, value in zip(group.qualities, values, strict=True):
            value = min(max(value, QUALITY_CLAMP), 1 - QUALITY_CLAMP)
            total -= quality * math.log(value) + (1 - quality) * math.log(1 - value)
            count += 1
    return total / count


def _loss(groups: Sequence[Group], scores: Sequence[Sequence[float]]) -> float:
    regret = selection_regret(groups, scores)
    return regret if regret is not None else _absolute_loss(groups, scores)


def group_scores(scorer: AnswerScorer, groups: Sequence[Group]) -> list[list[float]]:
    flat = scorer.score_pairs([g.prompt for g in groups for _ in g.answers], [a for g in groups for a in g.answers],
                              [b for g in groups for b in g.backends])
    out, start = [], 0
    for group in groups:
        out.append(flat[start : start + len(group.answers)])
        start += len(group.answers)
    return out


def validation_loss(scorer: AnswerScorer, samples: Sequence[AnswerSample]) -> float:
    """The scorer's validation loss on `samples` (see the module docstring), so two scorers compare on one split."""
    groups = group_samples(samples)
    if not groups:
        raise ValueError("no answers to score")
    return _loss(groups, group_scores(scorer, groups))


# -- training -----------------------------------------------------------------------------------------


def train_scorer(samples: Sequence[AnswerSample], settings: TrainSettings | None = None, *,
                 backend_prior: bool = True) -> TrainingResult[AnswerScorer]:
    """Train a scorer on `samples` grouped by prompt; the latest prompts (by `at`) validate.

    `settings.max_length` is the pair's length (query and answer together); `batch_size` counts answers
    (whole prompts are kept together in a batch, so a batch may hold more). `backend_prior`: the backends of
    the training answers become one-hot features (a learned prior per backend, used when the caller says
    who wrote each answer); without it the scorer sees the text and its cheap features only."""
    settings = settings or TrainSettings()
    started = time.monotonic()
    train, validation = split_groups(group_samples(samples), settings.validation_fraction, settings.max_samples)
    backbone = settings.backbone or packaged_minilm_path()
    with _torch_threads(settings.threads), torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        backends = sorted({b for group in train for b in group.backends}) if backend_prior else []
        scorer = AnswerScorer.from_backbone(backbone, settings.max_length, backends)
        qualities = [q for group in train for q in group.qualities]
        mean = min(max(sum(qualities) / len(qualities), QUALITY_CLAMP), 1 - QUALITY_CLAMP)
        _start_from_features(scorer, train, math.log(mean / (1 - mean)))
        _fit(scorer, train, settings)
        _calibrate(scorer, validation)
        scores = group_scores(scorer, validation)
    constant = [[mean] * len(group.answers) for group in validation]
    return TrainingResult(
        predictor=scorer,
        samples=SampleCounts(train=len(train), validation=len(validation),
                             outcomes=sum(len(group.answers) for group in train + validation)),
        validation_loss=_loss(validation, scores),
        baseline_loss=_loss(validation, constant),
        duration_s=time.monotonic() - started, backbone=backbone, settings=settings,
        validation=[sample for group in validation for sample in group.samples],  # type: ignore[misc]
    )


def _start_from_features(scorer: AnswerScorer, groups: Sequence[Group], bias: float) -> None:
    """Standardise the cheap features on the training answers (not the backends' one-hot) and start the
    linear term and the head's bias at the linear model that minimises the training loss (listwise +
    ABSOLUTE_WEIGHT x BCE, plus LINEAR_L2 x |w|^2; L-BFGS from w = 0 and b = the logit of the mean quality,
    `bias`): a length- and backend-aware linear ranker. Training then starts from it and the encoder learns
    what the features miss (the head's last layer starts at zero)."""
    network = scorer.network
    rows = [[feature_row(g.prompt, a, b, scorer.backends) for a, b in zip(g.answers, g.backends)] for g in groups]
    flat = torch.tensor([f for group in rows for f in group], dtype=torch.float64)
    cheap = len(FEATURES)
    mean, scale = torch.zeros(flat.shape[1], dtype=torch.float64), torch.ones(flat.shape[1], dtype=torch.float64)
    mean[:cheap], scale[:cheap] = flat[:, :cheap].mean(0), flat[:, :cheap].std(0).nan_to_num(1.0).clamp(min=1e-3)
    width = max(len(group) for group in rows)
    x = torch.zeros((len(rows), width, flat.shape[1]), dtype=torch.float64)
    quality = torch.zeros((len(rows), width), dtype=torch.float64)
    present = torch.zeros((len(rows), width), dtype=torch.bool)
    for index, (group, features) in enumerate(zip(groups, rows, strict=True)):
        x[index, : len(features)] = (torch.tensor(features, dtype=torch.float64) - mean) / scale
        quality[index, : len(features)] = torch.tensor(group.qualities, dtype=torch.float64)
        present[index, : len(features)] = True
    ranked = present.sum(1) >= 2
    target = torch.softmax((quality / RANK_TEMPERATURE).masked_fill(~present, -torch.inf), 1).nan_to_num(0.0)
    weights = torch.zeros(flat.shape[1], dtype=torch.float64, requires_grad=True)
    offset = torch.tensor([bias], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, offset], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        scores = x @ weights + offset
        listwise = -(target * torch.log_softmax(scores.masked_fill(~present, -torch.inf), 1).masked_fill(~present, 0.0)).sum(1)
        loss = listwise[ranked].mean() if ranked.any() else scores.sum() * 0.0
        absolute = torch.nn.functional.binary_cross_entropy_with_logits(scores[present], quality[present])
        loss = loss + ABSOLUTE_WEIGHT * absolute + LINEAR_L2 * (weights**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        network.feature_mean.copy_(mean.float())
        network.feature_scale.copy_(scale.float())
        network.linear.weight.copy_(weights.detach().float().reshape(1, -1))
        network.head[-1].bias.fill_(float(offset.detach()))


def _calibrate(scorer: AnswerScorer, groups: Sequence[Group]) -> None:
    """Platt scaling on held-out answers: (a, b) minimising the BCE of sigmoid(a * logit + b) against the
    qualities, a kept positive, so sigmoid is a quality estimate a fixed threshold can use (a cascade's)."""
    logits = scorer.logits([g.prompt for g in groups for _ in g.answers], [a for g in groups for a in g.answers],
                           [b for g in groups for b in g.backends]).double()
    quality = torch.tensor([q for g in groups for q in g.qualities], dtype=torch.float64)
    log_a = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_a, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(log_a.exp() * logits + b, quality)
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scorer.network.calibration.copy_(torch.tensor([float(log_a.exp()), float(b)]))


def _fit(scorer: AnswerScorer, groups: list[Group], settings: TrainSettings) -> None:
    """AdamW with a linear decay to zero, gradient norm clipped at 1; a batch holds whole prompts."""
    network = scorer.network
    optimizer = torch.optim.AdamW(
        [
            {"params": _trainable_backbone_parameters(network, settings.trainable_layers), "lr": settings.learning_rate},
            {"params": [*network.head.parameters(), *network.linear.parameters()], "lr": settings.head_learning_rate},
        ],
        weight_decay=0.01,
    )
    encoded = [scorer.encode([g.prompt] * len(g.answers), g.answers, g.backends) for g in groups]
    batches = _group_batches([len(rows) for rows in encoded], settings.batch_size)
    steps = settings.epochs * len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    generator = random.Random(settings.seed)
    network.train()
    with bar("training answer scorer", steps, unit="batch") as update:
        for _ in range(settings.epochs):
            order = list(range(len(groups)))
            generator.shuffle(order)
            for batch in _group_batches([len(encoded[index]) for index in order], settings.batch_size):
                members = [order[position] for position in batch]
                rows = [row for index in members for row in encoded[index]]
                target = torch.tensor([q for index in members for q in groups[index].qualities], dtype=torch.float32)
                loss = ranking_loss(network(*scorer.collate(rows)), target, [len(encoded[index]) for index in members])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                update(1)
    network.eval()


def _group_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive positions grouped so that each batch holds about `batch_size` answers (at least one group)."""
    batches: list[list[int]] = []
    current: list[int] = []
    count = 0
    for position, size in enumerate(sizes):
        if current and count + size > batch_size:
            batches.append(current)
            current, count = [], 0
        current.append(position)
        count += size
    if current:
        batches.append(current)
    return batches


def should_promote_scorer(candidate: TrainingResult[AnswerScorer], current: AnswerScorer | None) -> Promotion:
    """`should_promote`'s rule for scorers: promote when the candidate's validation loss is no worse than
    the current scorer's on the candidate's validation split (or when there is no current scorer)."""
    if current is None:
        return Promotion(True, "no current model", None)
    current_loss = validation_loss(current, candidate.validation)  # type: ignore[arg-type]
    relation = "<=" if candidate.validation_loss <= current_loss else ">"
    reason = f"validation loss {candidate.validation_loss:.4f} {relation} current model's {current_loss:.4f}"
    return Promotion(relation == "<=", reason, current_loss)
