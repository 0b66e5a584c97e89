"""`random`: uniform choice among the candidates (the Blending baseline, and a source of clean logs)."""

from __future__ import annotations

from policies.base import Choice, Context, Feedback, Policy, registry


@registry.register
class RandomPolicy(Policy):
    name = "random"

    def _choose(self, context: Context) -> Choice:
        arms = context.arm_names
        probability = 1.0 / len(arms)
        return Choice(arm=self._rng.choice(arms), propensity=probability, scores={a: probability for a in arms})

    def _learn(self, feedback: Feedback) -> None:
        return None
