"""`hybrid` (Hybrid-LLM, ICLR'24): a trained classifier says how likely the small backend is good enough
(quality within a tolerance of the large one's); below the calibrated threshold the query goes to the
large backend.

The threshold is calibrated at training time to a target share of large-backend calls. When one of the
pair is not a candidate (down, or over the cap), the other is used; when neither is, or no model is
trained, the fallback bandit decides.
"""

from __future__ import annotations

from policies.base import Context, registry
from policies.predicted import PredictedPolicy


@registry.register
class HybridPolicy(PredictedPolicy):
    name = "hybrid"
    maturity = "experimental"

    def _predict(self, context: Context) -> tuple[str, dict[str, float]] | None:
        p = context.predictions
        if p.small_ok is None or p.threshold is None or p.small is None or p.large is None:
            return None
        names = context.arm_names
        if p.small not in names and p.large not in names:
            return None
        preferred = p.large if p.small_ok < p.threshold else p.small
        arm = preferred if preferred in names else (p.small if preferred == p.large else p.large)
        scores = {a: 0.0 for a in names}
        if p.small in names:
            scores[p.small] = p.small_ok
        if p.large in names:
            scores[p.large] = p.threshold
        return arm, scores
