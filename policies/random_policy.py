"""`random`: uniform choice among the candidates (the Blending baseline, and a source of clean logs)."""

from __future__ import annotations

from policies.base import Choice, Context, Feedback, Policy, registry


@registry.register
class RandomPolicy(Policy):
    name = "random"
    contextual = False

    def _choose(self, context: Context) -> Choice:
        arms = context.arm_names
        probability = 1.0 / len(arms)
        uniform = {a: probability for a in arms}
        return Choice(arm=self._rng.choice(arms), probabilities=uniform, scores=dict(uniform))

    def _learn(self, feedback: Feedback) -> None:
        return None
