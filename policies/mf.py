"""`mf` (RouteLLM's matrix factorisation router, arXiv 2406.18665, for N backends): a trained model
scores every backend for the query, sigmoid(w^T (v_m * W e_q) + b_m), from learned backend embeddings
v_m against the projected query embedding (`router.predictors.mf`); pick the best estimate - lambda *
predicted cost.

The model is trained off the request path from imported history (every model's outcome per prompt:
pairwise wins, as RouteLLM trains on battles) and logged rewards and preferences; the router puts its
estimates on the context (`Context.predictions.mf_quality`). Backends over the per-request cap are left
out (all of them over it leaves the candidates the router filtered). Without a trained model, or when it
does not score every candidate: the fallback bandit.
"""

from __future__ import annotations

from policies.base import Context, registry
from policies.predicted import PredictedPolicy


@registry.register
class MfPolicy(PredictedPolicy):
    name = "mf"
    maturity = "experimental"

    def _predict(self, context: Context) -> tuple[str, dict[str, float]] | None:
        quality = context.predictions.mf_quality
        if quality is None or any(a not in quality for a in context.arm_names):
            return None
        cap = context.max_cost_usd
        within = [a for a in context.arms if cap is None or a.predicted_cost_usd <= cap] or list(context.arms)
        scores = {a.name: quality[a.name] - context.penalty(a) for a in context.arms}
        return max(within, key=lambda a: scores[a.name]).name, scores
