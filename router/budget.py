"""Spending control shared by every policy: per-request caps and pacing toward a global target.

Cost prediction: a backend's cost for a query is its input price times the prompt tokens plus its output
price times the output length it is expected to produce: the similarity-weighted mean over the nearest
past queries that backend answered (when at least `min_neighbours` did), else the backend's running
mean, else a default; never more than the request's `max_tokens`.

Pacing: with a target (mean USD per query, or USD per hour), a Lagrange multiplier lambda prices cost in
reward units: every policy maximises reward - lambda * cost / cost_scale, where cost_scale is the target
cost per query, so lambda = 1 means "paying the target costs one unit of reward". After each observed
cost, lambda moves by `step` times the relative error of the recent mean cost against the target (raised
when spend runs above it, lowered when below, never below 0). A backend whose predicted cost exceeds the
headroom (target times queries so far plus one, minus spend) is not a candidate, unless none fits. Without a target, lambda is the configured
static `cost_weight` against the mean predicted cost of the candidates.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from policies import Neighbour


@dataclass
class OutputLengthModel:
    """Expected answer length per backend, from neighbours first, then the backend's history."""

    default_tokens: int = 256
    min_neighbours: int = 2
    _means: dict[str, list[float]] = field(default_factory=dict)  # backend -> [count, mean]

    def observe(self, backend: str, output_tokens: float) -> None:
        entry = self._means.setdefault(backend, [0.0, 0.0])
        entry[0] += 1
        entry[1] += (output_tokens - entry[1]) / entry[0]

    def expected(self, backend: str, neighbours: Iterable[Neighbour], limit: int | None) -> float:
        weighted, total = 0.0, 0.0
        count = 0
        for neighbour in neighbours:
            if neighbour.arm == backend and neighbour.output_tokens is not None:
                weight = max(neighbour.similarity, 1e-3)
                weighted += weight * neighbour.output_tokens
                total += weight
                count += 1
        if count >= self.min_neighbours:
            expected = weighted / total
        elif backend in self._means:
            expected = self._means[backend][1]
        else:
            expected = float(self.default_tokens)
        return min(expected, float(limit)) if limit else expected

    def snapshot(self) -> dict[str, Any]:
        return {"means": self._means}

    def restore(self, state: dict[str, Any]) -> None:
        self._means = {b: list(v) for b, v in state["means"].items()}

    def stats(self) -> dict[str, float]:
        return {backend: round(mean, 1) for backend, (_, mean) in sorted(self._means.items())}


def predict_cost(price_in: float, price_out: float, prompt_tokens: int, output_tokens: float) -> float:
    return (prompt_tokens * price_in + output_tokens * price_out) / 1e6


@dataclass
class BudgetPacer:
    target_usd_per_query: float | None = None
    target_usd_per_hour: float | None = None
    cost_weight: float = 0.0  # lambda used when there is no target
    step: float = 0.05
    window: int = 50  # observations in the recent mean cost
    lam: float = 0.0
    spent_usd: float = 0.0
    queries: int = 0
    _recent: float | None = None
    _started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.targeted:
            self.lam = self.cost_weight

    @property
    def targeted(self) -> bool:
        return bool(self.target_usd_per_query) or bool(self.target_usd_per_hour)

    def target_per_query(self, now: float | None = None) -> float | None:
        """The per-query target; an hourly budget is spread over the observed query rate."""
        if self.target_usd_per_query:
            return self.target_usd_per_query
        if self.target_usd_per_hour:
            hours = max(((now or time.time()) - self._started) / 3600.0, 1.0 / 60.0)
            rate = max(self.queries / hours, 1.0)
            return self.target_usd_per_hour / rate
        return None

    def headroom(self) -> float | None:
        """What the next query may cost without the running mean passing the target (None: no target).

        Pacing through lambda steers the average; this bound keeps exploration from overspending while
        lambda is still finding its level (an expensive backend is tried once savings have paid for it).
        """
        target = self.target_per_query()
        if target is None:
            return None
        return target * (self.queries + 1) - self.spent_usd

    def cost_scale(self, predicted_costs: list[float]) -> float:
        target = self.target_per_query()
        if target:
            return target
        mean = sum(predicted_costs) / len(predicted_costs) if predicted_costs else 0.0
        return mean if mean > 0 else 1.0

    def observe(self, cost_usd: float) -> None:
        self.spent_usd += cost_usd
        self.queries += 1
        alpha = 1.0 / min(self.queries, self.window)
        self._recent = cost_usd if self._recent is None else self._recent + alpha * (cost_usd - self._recent)
        target = self.target_per_query()
        if target:
            error = (self._recent / target) - 1.0
            overall = (self.spent_usd / self.queries / target) - 1.0
            self.lam = max(0.0, self.lam + self.step * (error + overall))

    def snapshot(self) -> dict[str, Any]:
        return {"lam": self.lam, "spent_usd": self.spent_usd, "queries": self.queries, "recent": self._recent, "started": self._started}

    def restore(self, state: dict[str, Any]) -> None:
        self.lam, self.spent_usd, self.queries = state["lam"], state["spent_usd"], state["queries"]
        self._recent, self._started = state["recent"], state["started"]

    def stats(self) -> dict[str, Any]:
        target = self.target_per_query()
        return {
            "lambda": self.lam,
            "target_usd_per_query": self.target_usd_per_query,
            "target_usd_per_hour": self.target_usd_per_hour,
            "effective_target_usd_per_query": target,
            "spent_usd": self.spent_usd,
            "queries": self.queries,
            "mean_cost_usd": self.spent_usd / self.queries if self.queries else None,
            "recent_mean_cost_usd": self._recent,
            "spend_vs_target": (self.spent_usd / self.queries / target) if (target and self.queries) else None,
        }
