"""What the two PickLLM learners share: the PickLLM reward and one state per query cluster.

PickLLM (arXiv 2412.12170) rewards an answer with w_a * quality - w_c * cost - w_l * log(latency). Here
cost is normalised by the context's cost scale (so the weight means the same at any price level) and
latency enters as log(1 + seconds) so it never rewards being slow. The paper keeps one state for all
queries; `clusters` > 1 keeps one per region of the embedding space (see `policies.clustering`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from policies.base import Feedback, Policy, PolicyError
from policies.clustering import QueryClusters


class PickLLMPolicy(Policy):
    def __init__(
        self,
        seed: int | None = None,
        quality_weight: float = 1.0,
        cost_weight: float = 0.0,
        latency_weight: float = 0.0,
        clusters: int = 8,
        clustering: Literal["kmeans", "faiss"] = "kmeans",
    ) -> None:
        if min(quality_weight, cost_weight, latency_weight) < 0:
            raise PolicyError("PickLLM reward weights must be >= 0")
        super().__init__(seed)
        self.quality_weight = float(quality_weight)
        self.cost_weight = float(cost_weight)
        self.latency_weight = float(latency_weight)
        self.clusters = QueryClusters(int(clusters), clustering, seed=seed)

    def pickllm_reward(self, feedback: Feedback) -> float:
        """w_a * quality - w_c * cost / cost_scale - w_l * log(1 + latency_s).

        The budget's lambda * cost is not in here: these learners apply it when they choose, with the
        lambda of that moment, so they follow the pacing at once instead of unlearning old penalties.
        """
        context = feedback.context
        cost = feedback.cost_usd / context.cost_scale if context.cost_scale > 0 else 0.0
        latency = math.log1p(max(feedback.latency_ms, 0.0) / 1000.0)
        return self.quality_weight * feedback.reward - self.cost_weight * cost - self.latency_weight * latency

    def history_reward(self, quality: float) -> float:
        """The PickLLM reward of an imported outcome: its quality term (history has no latency, and the
        cost term needs the cost scale of a live decision)."""
        return self.quality_weight * quality

    def _pickllm_internals(self) -> dict[str, Any]:
        return {
            "reward_weights": {"quality": self.quality_weight, "cost": self.cost_weight, "latency": self.latency_weight},
            **self.clusters.stats(),
        }
