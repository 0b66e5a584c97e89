"""`qlearning`: PickLLM's stateless epsilon-greedy Q-learning, one Q-table per query cluster.

Q(arm) moves toward each PickLLM reward (sample average by default, or a constant step `alpha`). A
cluster's estimate is shrunk toward the arm's global estimate by `prior_strength` pseudo-samples, so a
cluster with little data behaves like the global learner instead of guessing. Choice: epsilon-greedy on
Q - lambda * cost; an arm never rewarded scores `optimistic_value`, so new backends get tried.
"""

from __future__ import annotations

from typing import Any

from policies.base import Choice, Context, Feedback, HistoryPrompt, PolicyError, epsilon_greedy_probabilities, registry
from policies.pickllm import PickLLMPolicy

GLOBAL = "all"


@registry.register
class QLearningPolicy(PickLLMPolicy):
    name = "qlearning"

    def __init__(
        self,
        seed: int | None = None,
        epsilon: float = 0.1,
        alpha: float | None = None,
        optimistic_value: float = 1.0,
        prior_strength: float = 5.0,
        **pickllm: Any,
    ) -> None:
        if not 0.0 <= epsilon <= 1.0:
            raise PolicyError(f"epsilon must be in [0, 1], got {epsilon}")
        if alpha is not None and not 0.0 < alpha <= 1.0:
            raise PolicyError(f"alpha must be in (0, 1], got {alpha}")
        super().__init__(seed, **pickllm)
        self.epsilon = float(epsilon)
        self.alpha = alpha
        self.optimistic_value = float(optimistic_value)
        self.prior_strength = float(prior_strength)
        self._q: dict[str, dict[str, list[float]]] = {}  # cluster -> arm -> [weight, value]

    def _estimate(self, cluster: str, arm: str) -> float:
        weight_all, value_all = self._q.get(GLOBAL, {}).get(arm, (0.0, 0.0))
        if weight_all == 0.0:
            return self.optimistic_value
        weight, value = self._q.get(cluster, {}).get(arm, (0.0, 0.0))
        return (weight * value + self.prior_strength * value_all) / (weight + self.prior_strength)

    def _choose(self, context: Context) -> Choice:
        cluster = str(self.clusters.assign(context.embedding))
        scores = {arm.name: self._estimate(cluster, arm.name) - context.penalty(arm) for arm in context.arms}
        probabilities = epsilon_greedy_probabilities(scores, self.epsilon)
        arm = self._rng.choices(list(probabilities), weights=list(probabilities.values()))[0]
        return Choice(arm=arm, probabilities=probabilities, scores=scores)

    def _learn(self, feedback: Feedback) -> None:
        reward = self.pickllm_reward(feedback)
        cluster = str(self.clusters.observe(feedback.context.embedding))
        for key in ([cluster, GLOBAL] if self.clusters.n_clusters > 1 else [GLOBAL]):
            entry = self._q.setdefault(key, {}).setdefault(feedback.arm, [0.0, 0.0])
            entry[0] += feedback.weight
            step = feedback.weight / entry[0] if self.alpha is None else min(1.0, self.alpha * feedback.weight)
            entry[1] += step * (reward - entry[1])

    def _warm_start(self, history: list[HistoryPrompt]) -> int:
        """Q-values from imported history: every backend's reward on every prompt, in its cluster and globally."""
        for prompt in history:
            cluster = str(self.clusters.observe(prompt.embedding))
            for key in ([cluster, GLOBAL] if self.clusters.n_clusters > 1 else [GLOBAL]):
                for arm, quality in prompt.qualities.items():
                    entry = self._q.setdefault(key, {}).setdefault(arm, [0.0, 0.0])
                    entry[0] += 1.0
                    step = 1.0 / entry[0] if self.alpha is None else self.alpha
                    entry[1] += step * (self.history_reward(quality) - entry[1])
        return len(history)

    def _snapshot(self) -> dict[str, Any]:
        return {"q": self._q, "clusters": self.clusters.snapshot()}

    def _restore(self, state: dict[str, Any]) -> None:
        self._q = {c: {a: list(v) for a, v in arms.items()} for c, arms in state["q"].items()}
        self.clusters.restore(state["clusters"])

    def _internals(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "alpha": self.alpha if self.alpha is not None else "sample average",
            "q_values": {arm: round(v[1], 6) for arm, v in sorted(self._q.get(GLOBAL, {}).items())},
            "q_values_by_cluster": {
                c: {arm: round(v[1], 6) for arm, v in sorted(arms.items())} for c, arms in sorted(self._q.items()) if c != GLOBAL
            },
            **self._pickllm_internals(),
        }
