"""The shared shape of the predictor policies (`forc`, `hybrid`): a trained model decides, a bandit
stands in until one exists.

The models are trained off the request path from everything logged (see `router.training`); the
router puts their outputs on the context (`Context.predictions`). While a model is missing, the
fallback bandit decides. It learns from every reward either way, so it is warm whenever it is needed.
Decisions made by a model are deterministic: propensity 1 for the chosen arm.
"""

from __future__ import annotations

from typing import Any

from policies.base import Choice, Context, Feedback, HistoryPrompt, Policy, PolicyError, registry


class PredictedPolicy(Policy):
    """Base of the predictor policies: `_predict` returns the model's arm, or None to fall back."""

    contextual = False  # the query reaches them through the predictions, not the embedding or neighbours

    def __init__(self, seed: int | None = None, fallback: str = "thompson", fallback_options: dict[str, Any] | None = None) -> None:
        super().__init__(seed)
        if fallback == self.name or (fallback in registry.names() and issubclass(registry.get(fallback), PredictedPolicy)):
            raise PolicyError(f"fallback must be a bandit policy, not {fallback!r}")
        self.fallback = registry.create(fallback, seed=seed, **(fallback_options or {}))
        self._by_model = 0
        self._by_fallback = 0

    def _predict(self, context: Context) -> tuple[str, dict[str, float]] | None:
        raise NotImplementedError

    def _choose(self, context: Context) -> Choice:
        predicted = self._predict(context)
        if predicted is None:
            self._by_fallback += 1
            return self.fallback.score(context)
        self._by_model += 1
        arm, scores = predicted
        return Choice(arm, {a: float(a == arm) for a in context.arm_names}, scores)

    def _learn(self, feedback: Feedback) -> None:
        self.fallback.learn(feedback)

    def _learn_preference(self, context: Context, winner: str, loser: str) -> None:
        self.fallback.learn_preference(context, winner, loser)

    def _warm_start(self, history: list[HistoryPrompt]) -> int:
        return self.fallback.warm_start(history)

    def _snapshot(self) -> dict[str, Any]:
        return {"fallback": self.fallback.snapshot()}

    def _restore(self, state: dict[str, Any]) -> None:
        self.fallback.restore(state["fallback"])

    def _internals(self) -> dict[str, Any]:
        return {
            "decided_by_model": self._by_model,
            "decided_by_fallback": self._by_fallback,
            "fallback": {"name": self.fallback.name, **self.fallback.stats()["internals"]},
        }
