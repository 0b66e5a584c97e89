"""`forc` (FORC, arXiv 2308.06077): a trained regressor predicts each backend's quality and cost for
the query; pick the best predicted quality - lambda * predicted cost.

lambda and the cost scale are the router's pacing (`Context.cost_weight`, `cost_scale`), as for every
policy; backends whose predicted cost exceeds the per-request cap are left out (all of them exceeding
it leaves the candidates the router already filtered). Without a trained model: the fallback bandit.
"""

from __future__ import annotations

from policies.base import Arm, Context, registry
from policies.predicted import PredictedPolicy


@registry.register
class ForcPolicy(PredictedPolicy):
    name = "forc"
    maturity = "experimental"

    def _predict(self, context: Context) -> tuple[str, dict[str, float]] | None:
        quality, cost = context.predictions.quality, context.predictions.cost_usd
        if quality is None or cost is None or any(a not in quality or a not in cost for a in context.arm_names):
            return None
        cap = context.max_cost_usd
        within = [a for a in context.arms if cap is None or cost[a.name] <= cap] or list(context.arms)
        scores = {a.name: quality[a.name] - context.penalty(Arm(a.name, 0, 0, cost[a.name])) for a in context.arms}
        best = max(within, key=lambda a: scores[a.name]).name
        return best, scores
