"""The predictor models in use, swapped in whole when training promotes a new version.

A batch reads the model references once, so a swap in the middle of it changes nothing for it and no
request waits for a load: the new model is loaded off the event loop, then assigned. The service runs
`predict` through a `TextBatcher`, so concurrent queries share one forward pass per model. `score` rates
answers with the answer scorer (the answer-aware modes), None while no scorer is trained.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from policies import Predictions
from router.predictors import KINDS, AnswerScorer, ArtifactStore, ForcPredictor, HybridPredictor

log = logging.getLogger("llm_router")


class PredictorSet:
    def __init__(self, artifacts_dir: str, backends: list[str]) -> None:
        self.store = ArtifactStore(artifacts_dir)
        self.backends = backends
        self.forc: ForcPredictor | None = None
        self.hybrid: HybridPredictor | None = None
        self.scorer: AnswerScorer | None = None
        self.versions: dict[str, str | None] = dict.fromkeys(KINDS)

    def reload(self) -> dict[str, str | None]:
        """Load the current version of each model (a missing or broken one leaves None, logged by the store)."""
        for kind in KINDS:
            version = self.store.current(kind)
            name = version.name if version else None
            if name == self.versions[kind] and getattr(self, kind) is not None:
                continue
            predictor = self.store.load_current(kind, self.backends)
            setattr(self, kind, predictor)
            self.versions[kind] = name if predictor is not None else None
            if predictor is not None:
                log.info("%s model %s in use", kind, name)
        return dict(self.versions)

    @property
    def ready(self) -> bool:
        """Whether a predictor policy's model is loaded (the scorer does not route)."""
        return self.forc is not None or self.hybrid is not None

    def score(self, query: str, answers: Sequence[str], backends: Sequence[str | None] | None = None) -> list[float] | None:
        """The scorer's value in [0,1] for each answer to `query` (higher is better); None while no scorer is
        loaded. `backends` (optional, one per answer) adds the scorer's learned prior of each backend."""
        scorer = self.scorer
        return None if scorer is None else scorer.score(query, answers, backends)

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
        for kind in KINDS:
            version = self.store.current(kind) if self.versions[kind] else None
            described[kind] = {"version": self.versions[kind]}
            if version is not None:
                try:
                    metadata = self.store.metadata(version)
                    described[kind] |= {"validation_loss": metadata.validation_loss, "baseline_loss": metadata.baseline_loss,
                                        "samples": metadata.samples.model_dump(), "predictor": metadata.predictor.model_dump()}
                except (OSError, ValueError):
                    pass
        return described
