"""`gradient`: PickLLM's gradient-ascent learning automaton (softmax preferences), one per query cluster.

Preferences H move along the gradient of expected reward: H[chosen] += step * (r - baseline) * (1 - pi),
H[other] -= step * (r - baseline) * pi[other], with the running mean reward as baseline (Sutton & Barto's
gradient bandit). The reward is PickLLM's; lambda * cost is subtracted from the preferences when choosing.
A new cluster starts from the global preferences. A floor of `min_exploration` keeps every arm's probability above zero, which keeps the
logged propensities usable for off-policy evaluation.
"""

from __future__ import annotations

from typing import Any

from policies.base import Choice, Context, Feedback, HistoryPrompt, PolicyError, registry, softmax
from policies.pickllm import PickLLMPolicy

GLOBAL = "all"


@registry.register
class GradientPolicy(PickLLMPolicy):
    name = "gradient"

    def __init__(
        self,
        seed: int | None = None,
        step_size: float = 0.2,
        temperature: float = 0.1,
        min_exploration: float = 0.02,
        **pickllm: Any,
    ) -> None:
        if step_size <= 0 or temperature <= 0 or not 0.0 <= min_exploration < 1.0:
            raise PolicyError("step_size and temperature must be > 0, min_exploration in [0, 1)")
        super().__init__(seed, **pickllm)
        self.step_size = float(step_size)
        self.temperature = float(temperature)
        self.min_exploration = float(min_exploration)
        self._preferences: dict[str, dict[str, float]] = {}
        self._baseline: dict[str, list[float]] = {}  # cluster -> [weight, mean reward]

    def _table(self, cluster: str) -> dict[str, float]:
        if cluster not in self._preferences:
            self._preferences[cluster] = dict(self._preferences.get(GLOBAL, {}))
        return self._preferences[cluster]

    def _probabilities(self, cluster: str, arms: list[str], penalties: dict[str, float] | None = None) -> dict[str, float]:
        """Softmax of the preferences net of lambda * cost, with the exploration floor."""
        table = self._preferences.get(cluster) or self._preferences.get(GLOBAL, {})
        penalties = penalties or {}
        greedy = softmax({a: table.get(a, 0.0) - penalties.get(a, 0.0) for a in arms}, self.temperature)
        floor = self.min_exploration / len(arms)
        return {a: (1.0 - self.min_exploration) * p + floor for a, p in greedy.items()}

    def _choose(self, context: Context) -> Choice:
        cluster = str(self.clusters.assign(context.embedding))
        penalties = {arm.name: context.penalty(arm) for arm in context.arms}
        probabilities = self._probabilities(cluster, context.arm_names, penalties)
        arm = self._rng.choices(list(probabilities), weights=list(probabilities.values()))[0]
        table = self._preferences.get(cluster) or self._preferences.get(GLOBAL, {})
        scores = {a: table.get(a, 0.0) - penalties[a] for a in context.arm_names}
        return Choice(arm=arm, probabilities=probabilities, scores=scores)

    def _learn(self, feedback: Feedback) -> None:
        reward = self.pickllm_reward(feedback)
        arms = feedback.context.arm_names
        if feedback.arm not in arms:
            arms = [*arms, feedback.arm]
        cluster = str(self.clusters.observe(feedback.context.embedding))
        for key in ([cluster, GLOBAL] if self.clusters.n_clusters > 1 else [GLOBAL]):
            baseline = self._baseline.setdefault(key, [0.0, 0.0])
            advantage = reward - (baseline[1] if baseline[0] else reward)
            probabilities = self._probabilities(key, arms)
            table = self._table(key)
            step = self.step_size * min(feedback.weight, 1.0)
            for arm in arms:
                indicator = 1.0 if arm == feedback.arm else 0.0
                table[arm] = table.get(arm, 0.0) + step * advantage * (indicator - probabilities[arm])
            baseline[0] += feedback.weight
            baseline[1] += feedback.weight / baseline[0] * (reward - baseline[1])

    def _warm_start(self, history: list[HistoryPrompt]) -> int:
        """Preferences from imported history by full-information gradient ascent: with every backend's
        reward known, the expected update of `_learn` is H[a] += step * pi[a] * (r[a] - sum_b pi[b] r[b]),
        taken once per prompt in its cluster and globally; the baseline becomes the mean reward."""
        for prompt in history:
            arms = list(prompt.qualities)
            rewards = {a: self.history_reward(q) for a, q in prompt.qualities.items()}
            cluster = str(self.clusters.observe(prompt.embedding))
            for key in ([cluster, GLOBAL] if self.clusters.n_clusters > 1 else [GLOBAL]):
                probabilities = self._probabilities(key, arms)
                expected = sum(probabilities[a] * rewards[a] for a in arms)
                table = self._table(key)
                for arm in arms:
                    table[arm] = table.get(arm, 0.0) + self.step_size * probabilities[arm] * (rewards[arm] - expected)
                baseline = self._baseline.setdefault(key, [0.0, 0.0])
                baseline[0] += 1.0
                baseline[1] += (sum(rewards.values()) / len(rewards) - baseline[1]) / baseline[0]
        return len(history)

    def _snapshot(self) -> dict[str, Any]:
        return {"preferences": self._preferences, "baseline": self._baseline, "clusters": self.clusters.snapshot()}

    def _restore(self, state: dict[str, Any]) -> None:
        self._preferences = {c: dict(t) for c, t in state["preferences"].items()}
        self._baseline = {c: list(b) for c, b in state["baseline"].items()}
        self.clusters.restore(state["clusters"])

    def _internals(self) -> dict[str, Any]:
        arms = sorted(self._preferences.get(GLOBAL, {}))
        return {
            "step_size": self.step_size,
            "temperature": self.temperature,
            "probabilities": self._probabilities(GLOBAL, arms) if arms else {},
            "preferences": {a: round(v, 6) for a, v in sorted(self._preferences.get(GLOBAL, {}).items())},
            **self._pickllm_internals(),
        }
