"""The predictor models in use, swapped in whole when training promotes a new version.

A batch reads the model references once, so a swap in the middle of it changes nothing for it and no
request waits for a load: the new model is loaded off the event loop, then assigned. The service runs
`predict` through a `TextBatcher`, so concurrent queries share one forward pass per model. `score` rates
answers with the answer scorer (the answer-aware modes), None while no scorer is trained. `with_mf` adds
RouteLLM's matrix factorisation's estimates from the query embedding the service computes anyway (a small
matrix product, no encoder pass).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from policies import Predictions
from router.config import PREDICTOR_KINDS
from router.predictors import AnswerScorer, ForcPredictor, HybridPredictor
from router.predictors.mf import KIND as MF
from router.predictors.mf import MfArtifactStore, MfPredictor

log = logging.getLogger("llm_router")


class PredictorSet:
    def __init__(self, artifacts_dir: str, backends: list[str], policies: Collection[str] = PREDICTOR_KINDS) -> None:
        """`policies`: the configured policies; only the models they decide with are loaded (and only those
        cost an encoder pass per query), plus the answer scorer, which the answer-aware modes use."""
        self.store = MfArtifactStore(artifacts_dir)
        self.backends = backends
        self.kinds = [kind for kind in PREDICTOR_KINDS if kind == "scorer" or kind in policies]
        self.forc: ForcPredictor | None = None
        self.hybrid: HybridPredictor | None = None
        self.scorer: AnswerScorer | None = None
        self.mf: MfPredictor | None = None
        self._mf_refused: str | None = None  # the mf version whose embedding width is not the embedder's (warned once)
        self.versions: dict[str, str | None] = dict.fromkeys(PREDICTOR_KINDS)

    def reload(self) -> dict[str, str | None]:
        """Load the current version of each model (a missing or broken one leaves None, logged by the store)."""
        for kind in self.kinds:
            version = self.store.current(kind)  # type: ignore[arg-type]
            name = version.name if version else None
            if name == self.versions[kind] and getattr(self, kind) is not None:
                continue
            predictor = self.store.load_mf(self.backends) if kind == MF else self.store.load_current(kind, self.backends)  # type: ignore[arg-type]
            setattr(self, kind, predictor)
            self.versions[kind] = name if predictor is not None else None
            if predictor is not None:
                log.info("%s model %s in use", kind, name)
        return dict(self.versions)

    @property
    def ready(self) -> bool:
        """Whether a model that reads the query's text is loaded, FORC or Hybrid (the scorer does not route;
        `mf` reads the embedding, see `with_mf`)."""
        return self.forc is not None or self.hybrid is not None

    def score(self, query: str, answers: Sequence[str], backends: Sequence[str | None] | None = None) -> list[float] | None:
        """The scorer's value in [0,1] for each answer to `query` (higher is better); None while no scorer is
        loaded. `backends` (optional, one per answer) adds the scorer's learned prior of each backend."""
        scorer = self.scorer
        return None if scorer is None else scorer.score(query, answers, backends)

    def with_mf(self, predictions: Predictions | None, embedding: np.ndarray) -> Predictions | None:
        """`predictions` with the `mf` model's quality estimate per backend for the query's embedding; as
        they were while no model is loaded, or when the model was trained on embeddings of another width."""
        mf = self.mf  # read once: a swap in the middle changes nothing for this query
        if mf is None:
            return predictions
        if embedding.shape[-1] != mf.config.input_dim:  # trained with another embedder: the next run retrains it
            if self._mf_refused != self.versions[MF]:
                self._mf_refused = self.versions[MF]
                log.warning("cannot use mf model %s: it reads %d-dimensional embeddings, the embedder gives %d",
                            self.versions[MF], mf.config.input_dim, embedding.shape[-1])
            return predictions
        return dataclasses.replace(predictions or Predictions(), mf_quality=mf.quality(embedding)[0])

    def predict(self, texts: list[str]) -> list[Predictions]:
        """Each model's view of each text; a field stays None while its model is missing."""
        forc, hybrid = self.forc, self.hybrid
        fields: list[dict[str, Any]] = [{} for _ in texts]
        if forc is not None:
            for row, per_backend in zip(fields, forc.predict(texts), strict=True):
                row["quality"] = {b: p.quality for b, p in per_backend.items()}
                row["output_tokens"] = {b: p.output_tokens for b, p in per_backend.items()}
        if hybrid is not None:
            for row, small_ok in zip(fields, hybrid.prob_small_ok(texts), strict=True):
                row |= {"small_ok": small_ok, "small": hybrid.small, "large": hybrid.large, "threshold": hybrid.threshold}
        return [Predictions(**row) for row in fields]

    def describe(self) -> dict[str, Any]:
        described: dict[str, Any] = {}
        for kind in PREDICTOR_KINDS:
            version = self.store.current(kind) if self.versions[kind] else None  # type: ignore[arg-type]
            described[kind] = {"version": self.versions[kind]}
            if version is not None:
                try:
                    metadata = self.store.mf_metadata(version) if kind == MF else self.store.metadata(version)
                    described[kind] |= {"validation_loss": metadata.validation_loss, "baseline_loss": metadata.baseline_loss,
                                        "samples": metadata.samples.model_dump(), "predictor": metadata.predictor.model_dump()}
                except (OSError, ValueError):
                    pass
        return described
