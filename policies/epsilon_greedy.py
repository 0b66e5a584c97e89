"""`epsilon_greedy`: per-backend mean reward, exploit the best, explore uniformly with probability epsilon.

Arms never rewarded score `optimistic_value`, so a new backend is tried soon after it appears.
"""

from __future__ import annotations

from typing import Any

from policies.base import Choice, Context, Feedback, Policy, PolicyError, registry


@registry.register
class EpsilonGreedyPolicy(Policy):
    name = "epsilon_greedy"

    def __init__(self, seed: int | None = None, epsilon: float = 0.1, optimistic_value: float = 1.0) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise PolicyError(f"epsilon must be in [0, 1], got {epsilon}")
        super().__init__(seed)
        self.epsilon = float(epsilon)
        self.optimistic_value = float(optimistic_value)
        self._values: dict[str, tuple[int, float]] = {}

    def _value(self, arm: str) -> float:
        count, mean = self._values.get(arm, (0, 0.0))
        return mean if count else self.optimistic_value

    def _choose(self, context: Context) -> Choice:
        arms = context.arm_names
        scores = {arm: self._value(arm) for arm in arms}
        best = max(scores.values())
        greedy = [arm for arm in arms if scores[arm] == best]
        explore = self._rng.random() < self.epsilon
        arm = self._rng.choice(arms if explore else greedy)
        propensity = self.epsilon / len(arms) + ((1.0 - self.epsilon) / len(greedy) if arm in greedy else 0.0)
        return Choice(arm=arm, propensity=propensity, scores=scores)

    def _learn(self, feedback: Feedback) -> None:
        count, mean = self._values.get(feedback.arm, (0, 0.0))
        count += 1
        self._values[feedback.arm] = (count, mean + (feedback.reward - mean) / count)

    def _snapshot(self) -> dict[str, Any]:
        return {"values": {arm: list(v) for arm, v in self._values.items()}}

    def _restore(self, state: dict[str, Any]) -> None:
        self._values = {arm: (int(c), float(m)) for arm, (c, m) in state["values"].items()}

    def _internals(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "q_values": {arm: mean for arm, (_, mean) in sorted(self._values.items())},
        }
