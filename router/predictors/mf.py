"""RouteLLM's matrix factorisation router (Ong et al., 2024, "RouteLLM"), for N backends.

RouteLLM scores a (query, model) pair as s(m, q) = w^T (v_m * (W e_q)): e_q is a fixed text embedding of
the query, W projects it, v_m is a learned embedding of the model, and P(a beats b | q) =
sigmoid(s(a, q) - s(b, q)), trained on pairwise battles. Here e_q is the router's own query embedding
(MiniLM, the one the service already computes for every query and FAISS memory: no extra encoder pass),
there are N backends, not two, and each backend gets a bias b_m, so s(m, q) = w^T (v_m * (W e_q)) + b_m.

Training data: every outcome the router knows, as `MfSample`s.
- Imported history (`llm-router import`: every model's outcome per prompt) gives pairwise games: on a
  prompt, backend a beats b with the soft score 0.5 + (q_a - q_b) / 2 (the rule the `elo` policy uses),
  and one quality per backend.
- Logged rewards give one backend's quality on a prompt; logged preferences one game won outright.
Loss: the pairwise Bradley-Terry cross-entropy of sigmoid(s_a - s_b) against the soft score (RouteLLM's
loss) plus the pointwise cross-entropy of sigmoid(s_m) against the quality, so that sigmoid(s_m) is a
quality estimate in reward units, comparable with lambda * cost (the policy's decision: best
sigmoid(s_m) - lambda * cost). Win probability of a backend: its mean sigmoid(s_m - s_b) over the others.

Validation and promotion like the other predictors: the latest `validation_fraction` of the prompts
validate; the constant predictor (each backend's training mean) is the baseline; a candidate is saved as
a new version (`MfArtifactStore`, the `ArtifactStore` layout under `<artifacts_dir>/mf/`) and promoted
when its validation loss is no worse than the current model's on the same split. Numpy at inference
(a 384 x d matrix product per query), torch only to train (seconds on CPU for thousands of prompts).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from router.config import EmbedderConfig
from router.predictors.artifacts import METADATA_FILE, ArtifactStore, Version
from router.predictors.data import latest_validate
from router.predictors.models import StrictModel
from router.predictors.training import Promotion, SampleCounts

log = logging.getLogger("llm_router")

KIND = "mf"
WEIGHTS_FILE = "mf.npz"
QUALITY_CLAMP = 1e-4


@dataclass(frozen=True)
class MfSample:
    """What is known about one prompt: its embedding, the quality of the backends observed on it, and the
    preferences posted for it. `observed_at` orders prompts in time (the latest validate)."""

    embedding: np.ndarray
    qualities: dict[str, float] = field(default_factory=dict)
    preferences: tuple[tuple[str, str], ...] = ()
    observed_at: float = 0.0


class MfSettings(StrictModel):
    dim: int = Field(default=64, ge=1, le=1024, description="Width of the projected query and backend embeddings.")
    epochs: int = Field(default=200, ge=1, description="Full-batch passes (Adam).")
    learning_rate: float = Field(default=0.01, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    pairwise_weight: float = Field(default=1.0, ge=0, description="Weight of the Bradley-Terry loss against the pointwise one.")
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    max_samples: int | None = Field(default=None, ge=2, description="Use at most this many latest prompts.")
    seed: int = 0
    threads: int = Field(default=1, ge=1)


class MfConfig(StrictModel):
    kind: Literal["mf"] = "mf"
    backends: list[str] = Field(min_length=1)
    dim: int
    input_dim: int


class MfMetadata(StrictModel):
    kind: Literal["mf"] = "mf"
    version: int
    created_at: float
    samples: SampleCounts
    validation_loss: float
    baseline_loss: float
    settings: MfSettings
    duration_s: float
    predictor: MfConfig


class MfPredictor:
    """The trained factorisation: per backend a quality estimate and a win probability for a query."""

    kind = KIND

    def __init__(self, backends: list[str], projection: np.ndarray, backend_vectors: np.ndarray, output: np.ndarray,
                 bias: np.ndarray) -> None:
        self.backends = list(backends)
        self.projection = np.asarray(projection, dtype=np.float32)  # input_dim x dim (W)
        self.backend_vectors = np.asarray(backend_vectors, dtype=np.float32)  # backends x dim (v_m)
        self.output = np.asarray(output, dtype=np.float32)  # dim (w)
        self.bias = np.asarray(bias, dtype=np.float32)  # backends (b_m)

    @property
    def config(self) -> MfConfig:
        return MfConfig(backends=self.backends, dim=int(self.projection.shape[1]), input_dim=int(self.projection.shape[0]))

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """s(m, q) for each query (rows) and backend (columns)."""
        projected = np.atleast_2d(np.asarray(embeddings, dtype=np.float32)) @ self.projection
        return (projected[:, None, :] * self.backend_vectors[None, :, :]) @ self.output + self.bias

    def quality(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """Per query: backend -> estimated quality, sigmoid(s_m)."""
        values = _sigmoid(self.logits(embeddings))
        return [dict(zip(self.backends, row.tolist())) for row in values]

    def win_probability(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """Per query: backend -> mean over the other backends of P(it beats them), sigmoid(s_m - s_b)."""
        logits = self.logits(embeddings)
        n = logits.shape[1]
        pairwise = _sigmoid(logits[:, :, None] - logits[:, None, :])
        wins = (pairwise.sum(axis=2) - 0.5) / max(n - 1, 1)
        return [dict(zip(self.backends, row.tolist())) for row in wins]

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / WEIGHTS_FILE, projection=self.projection, backend_vectors=self.backend_vectors,
                 output=self.output, bias=self.bias)
        (directory / "predictor.json").write_text(self.config.model_dump_json(indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> MfPredictor:
        directory = Path(directory)
        config = MfConfig.model_validate_json((directory / "predictor.json").read_text())
        with np.load(directory / WEIGHTS_FILE) as weights:
            predictor = cls(config.backends, weights["projection"], weights["backend_vectors"], weights["output"], weights["bias"])
        if predictor.config != config:
            raise ValueError("predictor.json and the weights disagree")
        return predictor


@dataclass(frozen=True)
class MfResult:
    predictor: MfPredictor
    samples: SampleCounts
    validation_loss: float
    baseline_loss: float
    duration_s: float
    settings: MfSettings
    validation: list[MfSample]


# --- data ------------------------------------------------------------------------------------------------


@dataclass
class _Tensors:
    embeddings: Any  # torch tensors
    quality: Any
    mask: Any
    pairs: Any  # (row, a, b, target) rows
    n: int


def _tensors(samples: Sequence[MfSample], backends: Sequence[str]) -> _Tensors:
    import torch

    column = {b: i for i, b in enumerate(backends)}
    quality = np.zeros((len(samples), len(backends)), dtype=np.float32)
    mask = np.zeros_like(quality, dtype=bool)
    pairs: list[tuple[int, int, int, float]] = []
    for row, sample in enumerate(samples):
        known = [(column[b], q) for b, q in sample.qualities.items() if b in column]
        for index, q in known:
            quality[row, index], mask[row, index] = q, True
        for i, (a, qa) in enumerate(known):
            for b, qb in known[i + 1 :]:
                pairs.append((row, a, b, 0.5 + 0.5 * (qa - qb)))
        for winner, loser in sample.preferences:
            if winner in column and loser in column:
                pairs.append((row, column[winner], column[loser], 1.0))
    embeddings = np.stack([np.asarray(s.embedding, dtype=np.float32) for s in samples]) if samples else np.zeros((0, 1), np.float32)
    return _Tensors(torch.from_numpy(embeddings), torch.from_numpy(quality), torch.from_numpy(mask),
                    torch.tensor(pairs, dtype=torch.float32).reshape(-1, 4), len(samples))


def _loss(logits: Any, data: _Tensors, pairwise_weight: float) -> Any:
    import torch
    from torch.nn.functional import binary_cross_entropy_with_logits as bce

    pointwise = bce(logits[data.mask], data.quality[data.mask]) if bool(data.mask.any()) else logits.sum() * 0.0
    if len(data.pairs) and pairwise_weight > 0:
        rows, a, b = data.pairs[:, 0].long(), data.pairs[:, 1].long(), data.pairs[:, 2].long()
        pairwise = bce(logits[rows, a] - logits[rows, b], data.pairs[:, 3])
    else:
        pairwise = torch.zeros(())
    return pointwise + pairwise_weight * pairwise


def _split(samples: Sequence[MfSample], fraction: float, max_samples: int | None) -> tuple[list[MfSample], list[MfSample]]:
    train, validation = latest_validate([s.observed_at for s in samples], fraction, max_samples)
    return [samples[i] for i in train], [samples[i] for i in validation]


# --- training --------------------------------------------------------------------------------------------


def train_mf(samples: Sequence[MfSample], backends: Sequence[str], settings: MfSettings | None = None) -> MfResult:
    """Fit the factorisation on `samples` (the latest validate) for `backends`; full-batch Adam."""
    import torch

    settings = settings or MfSettings()
    started = time.monotonic()
    samples = [s for s in samples if any(b in backends for b in s.qualities) or s.preferences]
    train, validation = _split(samples, settings.validation_fraction, settings.max_samples)
    # early stopping watches the latest tenth of the training part, never the validation split it is judged on
    fit, watch = _split(train, 0.1, None) if len(train) >= 20 else (train, train)
    data, stop, held = _tensors(fit, backends), _tensors(watch, backends), _tensors(validation, backends)
    means = _column_means(data)
    previous = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(settings.seed)
            dim_in = data.embeddings.shape[1]
            projection = torch.nn.Parameter(torch.randn(dim_in, settings.dim) / math.sqrt(dim_in))
            vectors = torch.nn.Parameter(torch.randn(len(backends), settings.dim) * 0.1)
            output = torch.nn.Parameter(torch.randn(settings.dim) / math.sqrt(settings.dim))
            bias = torch.nn.Parameter(torch.logit(means.clamp(QUALITY_CLAMP, 1 - QUALITY_CLAMP)))
            parameters = [projection, vectors, output, bias]
            optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)

            def logits(x: Any) -> Any:
                return ((x @ projection)[:, None, :] * vectors[None, :, :]) @ output + bias

            best_loss, best_state = math.inf, None
            for epoch in range(settings.epochs + 1):
                if epoch:
                    optimizer.zero_grad()
                    loss = _loss(logits(data.embeddings), data, settings.pairwise_weight)
                    loss.backward()
                    optimizer.step()
                # keep the epoch that does best on the watched part (early stopping); epoch 0, the backends'
                # means (the factors start near zero), when nothing learnt generalises
                with torch.no_grad():
                    watched = _loss(logits(stop.embeddings), stop, settings.pairwise_weight).item()
                if watched < best_loss:
                    best_loss, best_state = watched, [p.detach().clone() for p in parameters]
            assert best_state is not None
            predictor = MfPredictor(list(backends), *(p.numpy() for p in best_state))
            with torch.no_grad():
                validation_loss = _loss(torch.from_numpy(predictor.logits(held.embeddings.numpy())), held, settings.pairwise_weight).item()
    finally:
        torch.set_num_threads(previous)
    baseline = _loss(torch.logit(means.clamp(QUALITY_CLAMP, 1 - QUALITY_CLAMP)).expand(held.n, -1), held, settings.pairwise_weight).item()
    outcomes = sum(len(s.qualities) + len(s.preferences) for s in train + validation)
    return MfResult(predictor, SampleCounts(train=len(train), validation=len(validation), outcomes=outcomes),
                    validation_loss, baseline, time.monotonic() - started, settings, validation)


def _column_means(data: _Tensors) -> Any:
    import torch

    counts = data.mask.sum(0)
    sums = (data.quality * data.mask).sum(0)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, 0.5))


def mf_validation_loss(predictor: MfPredictor, samples: Sequence[MfSample], pairwise_weight: float = 1.0) -> float:
    import torch

    data = _tensors(samples, predictor.backends)
    return _loss(torch.from_numpy(predictor.logits(data.embeddings.numpy())), data, pairwise_weight).item()


def should_promote_mf(candidate: MfResult, current: MfPredictor | None) -> Promotion:
    """Promote when no worse than the current model on the candidate's validation split (or when the current
    one cannot be scored there: none, or other backends, or another embedding width)."""
    if current is None:
        return Promotion(True, "no current model", None)
    new = candidate.predictor
    if not set(new.backends) <= set(current.backends) or current.config.input_dim != new.config.input_dim:
        return Promotion(True, "the current model predicts something else", None)
    current_loss = mf_validation_loss(current, candidate.validation, candidate.settings.pairwise_weight)
    relation = "<=" if candidate.validation_loss <= current_loss else ">"
    reason = f"validation loss {candidate.validation_loss:.4f} {relation} current model's {current_loss:.4f}"
    return Promotion(relation == "<=", reason, current_loss)


class MfArtifactStore(ArtifactStore):
    """`ArtifactStore`'s layout and atomic promotion (`<root>/mf/v0001/`, `<root>/mf/current`) for MF models."""

    def save_mf(self, result: MfResult) -> Version:
        return self.save_version(KIND, result.predictor.save, lambda number: MfMetadata(
            version=number, created_at=time.time(), samples=result.samples, validation_loss=result.validation_loss,
            baseline_loss=result.baseline_loss, settings=result.settings, duration_s=result.duration_s,
            predictor=result.predictor.config,
        ))

    def mf_metadata(self, version: Version) -> MfMetadata:
        return MfMetadata.model_validate_json((version.path / METADATA_FILE).read_text())

    def load_mf(self, backends: Sequence[str] | None = None) -> MfPredictor | None:
        """The current MF model, or None (with a WARNING saying why when one exists but cannot be used)."""
        version = self.current(KIND)  # type: ignore[arg-type]
        if version is None:
            return None
        try:
            metadata = self.mf_metadata(version)
            if metadata.version != version.number:
                raise ValueError(f"it describes v{metadata.version}")
            predictor = MfPredictor.load(version.path)
            if predictor.config != metadata.predictor:
                raise ValueError(f"predictor.json and {METADATA_FILE} disagree")
        except Exception as exc:  # noqa: BLE001 - an unreadable artifact means "no model", never a crash
            log.warning("cannot load mf model %s: %s: %s", version.path, type(exc).__name__, exc)
            return None
        missing = set(backends or ()) - set(predictor.backends)
        if missing:
            log.warning("cannot use mf model %s: it does not score backends %s", version.path, sorted(missing))
            return None
        return predictor


# --- the scheduled job's part ----------------------------------------------------------------------------


def mf_samples_from_db(db: Any, backends: list[str], embed: Any) -> list[MfSample]:
    """Every prompt with an outcome of one of `backends` (imported history and rewarded decisions, via
    `router.history.training_outcomes`) and every logged preference, grouped by prompt text, embedded with
    `embed(texts) -> array`."""
    from sqlmodel import Session, select

    from router.history import training_outcomes
    from router.predictors.data import by_prompt
    from router.tables import DecisionRow, Preference

    outcomes = {prompt.text: prompt for prompt in by_prompt(training_outcomes(db, backends))}
    preferences: dict[str, list[tuple[str, str]]] = {}
    latest = {text: prompt.observed_at for text, prompt in outcomes.items()}
    with Session(db) as session:
        rows = session.execute(
            select(DecisionRow.query, Preference.winner, Preference.loser, Preference.created_at)
            .join(Preference, Preference.decision_id == DecisionRow.id)
            .order_by(Preference.id)
        ).all()
    for text, winner, loser, at in rows:
        preferences.setdefault(text, []).append((winner, loser))
        latest[text] = max(latest.get(text, 0.0), at.timestamp() if hasattr(at, "timestamp") else float(at))
    texts = list(latest)
    if not texts:
        return []
    vectors = embed(texts)
    return [MfSample(vector, dict(outcomes[text].qualities) if text in outcomes else {}, tuple(preferences.get(text, ())), latest[text])
            for text, vector in zip(texts, vectors)]


def train_mf_job(db: Any, artifacts_dir: str, backends: list[str], min_samples: int, settings: MfSettings,
                 embedder_config: EmbedderConfig | None = None) -> dict[str, Any]:
    """One MF run for the scheduled job: the fields of its `training_runs` row (status, samples, losses,
    promotion, version, details). Skipped below `min_samples` prompts. The prompts are embedded by the
    service's own embedder (`embedder_config`), since the model scores the service's query vectors."""
    from router.embedding import build_embedder

    fields: dict[str, Any] = {"status": "ok"}
    embedder = build_embedder(embedder_config or EmbedderConfig())
    samples = mf_samples_from_db(db, backends, embedder.embed)
    if len(samples) < min_samples:
        return {"status": "skipped", "error": f"{len(samples)} prompts with outcomes; {min_samples} needed"}
    store = MfArtifactStore(artifacts_dir)
    result = train_mf(samples, backends, settings)
    promotion = should_promote_mf(result, store.load_mf(backends))
    version = store.save_mf(result)
    if promotion.promote:
        store.promote(version)
    fields |= {
        "samples_train": result.samples.train, "samples_validation": result.samples.validation,
        "validation_loss": result.validation_loss, "baseline_loss": result.baseline_loss,
        "current_validation_loss": promotion.current_loss, "promoted": promotion.promote, "version": version.name,
        "details": {"reason": promotion.reason, "outcomes": result.samples.outcomes, "embedder": embedder.name,
                    "settings": json.loads(settings.model_dump_json())},
    }
    return fields


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
