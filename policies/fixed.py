"""`fixed`: always the same backend (the single-model baseline); the cheapest when it is not a candidate."""

from __future__ import annotations

from typing import Any

from policies.base import Choice, Context, Feedback, Policy, registry


@registry.register
class FixedPolicy(Policy):
    name = "fixed"
    contextual = False

    def __init__(self, seed: int | None = None, backend: str | None = None) -> None:
        super().__init__(seed)
        self.backend = backend

    def _choose(self, context: Context) -> Choice:
        names = context.arm_names
        if self.backend in names:
            arm = self.backend
        else:
            arm = min(context.arms, key=lambda a: a.predicted_cost_usd).name
        return Choice(arm=arm, probabilities={a: float(a == arm) for a in names}, scores={a: float(a == arm) for a in names})

    def _learn(self, feedback: Feedback) -> None:
        return None

    def _internals(self) -> dict[str, Any]:
        return {"backend": self.backend}
