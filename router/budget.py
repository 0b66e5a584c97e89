"""Money, in one place: cost prediction, per-request caps, pacing toward a global target, and each
key's spending budget (the per-key ledger, its periods, and the one spend-limit error, a 429).

Cost prediction: a backend's cost for a query is its input price times the prompt tokens plus its output
price times the output length it is expected to produce: the similarity-weighted mean over the nearest
past queries that backend answered (when at least `min_neighbours` did), else the backend's running
mean, else a default; never more than the request's `max_tokens`.

Pacing: with a target (mean USD per query, or USD per hour), a Lagrange multiplier lambda prices cost in
reward units: every policy maximises reward - lambda * cost / cost_scale, where cost_scale is the target
cost per query, so lambda = 1 means "paying the target costs one unit of reward". After each observed
cost, lambda moves by `step` times the relative error of the recent mean cost against the target (raised
when spend runs above it, lowered when below, never below 0). A backend whose predicted cost exceeds the
headroom is not a candidate, unless none fits. The headroom counts calls still running (their
predicted cost is reserved at decision time and settled with the real one), so a burst of concurrent
requests cannot each spend the same headroom. With a per-query target the headroom is the target times
queries so far plus one, minus spend; with an hourly target it is a balance that fills at the hourly
rate and holds at most `max_carryover_hours` of budget, so idle time and downtime cannot bank money
for a later burst. Without a target, lambda is the configured static `cost_weight` against the mean
predicted cost of the candidates.

Per-key budgets: a key's decisions reserve their worst-case cost (the output limit's worth of tokens)
at decision time, in the same step of the event loop that checks the remaining budget, and settle
with the real cost, so concurrent requests never overshoot the key's limit.

Several replicas (`cluster.enabled`): the same rules, held in the database instead of in memory. A
`SpendRule` names a row of the `spend` table (a key and its period, or the pacing target) and how its
headroom is computed; the store reserves against it with one conditional UPDATE (see `router.store`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from policies import Neighbour
from router.config import ApiKeyConfig
from router.errors import TooManyRequests


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
    max_carryover_hours: float = 1.0  # hourly target: the most unspent budget the balance may hold
    window: int = 50  # observations in the recent mean cost
    lam: float = 0.0
    spent_usd: float = 0.0
    queries: int = 0
    clock: Callable[[], float] = time.time
    _recent: float | None = None
    _started: float | None = None
    _balance: float = 0.0  # hourly target: unspent budget at `_balance_at`
    _balance_at: float | None = None
    _reserved: dict[str, float] = field(default_factory=dict)  # decision id -> predicted cost of a running call

    def __post_init__(self) -> None:
        if not self.targeted:
            self.lam = self.cost_weight
        now = self.clock()
        self._started = now if self._started is None else self._started
        if self._balance_at is None:
            self._balance_at = now
            self._balance = (self.target_usd_per_hour or 0.0) / 60  # a minute's budget to start with

    @property
    def targeted(self) -> bool:
        return bool(self.target_usd_per_query) or bool(self.target_usd_per_hour)

    @property
    def in_flight_usd(self) -> float:
        return sum(self._reserved.values())

    def target_per_query(self) -> float | None:
        """The per-query target; an hourly budget is spread over the observed query rate."""
        if self.target_usd_per_query:
            return self.target_usd_per_query
        if self.target_usd_per_hour:
            hours = max((self.clock() - (self._started or 0.0)) / 3600.0, 1.0 / 60.0)
            rate = max(self.queries / hours, 1.0)
            return self.target_usd_per_hour / rate
        return None

    def _accrue(self) -> None:
        """Hourly target: fill the balance at the hourly rate, up to the carry-over cap."""
        if not self.target_usd_per_hour:
            return
        now = self.clock()
        cap = self.target_usd_per_hour * self.max_carryover_hours
        gained = max(0.0, now - (self._balance_at or now)) / 3600.0 * self.target_usd_per_hour
        self._balance = min(cap, self._balance + gained)
        self._balance_at = now

    def headroom(self) -> float | None:
        """What the next query may cost without passing the target (None: no target).

        Pacing through lambda steers the average; this bound keeps exploration from overspending while
        lambda is still finding its level (an expensive backend is tried once savings have paid for it).
        """
        if self.target_usd_per_query:
            return self.target_usd_per_query * (self.queries + 1) - self.spent_usd - self.in_flight_usd
        if self.target_usd_per_hour:
            self._accrue()
            return self._balance - self.in_flight_usd
        return None

    def cost_scale(self, predicted_costs: list[float]) -> float:
        target = self.target_per_query()
        if target:
            return target
        mean = sum(predicted_costs) / len(predicted_costs) if predicted_costs else 0.0
        return mean if mean > 0 else 1.0

    def reserve(self, decision_id: str, predicted_usd: float) -> None:
        """A call starts: its predicted cost counts against the headroom until `observe` or `release`."""
        if self.targeted:
            self._reserved[decision_id] = predicted_usd

    def release(self, decision_id: str) -> None:
        """A call ended with no answer and no cost."""
        self._reserved.pop(decision_id, None)

    def observe(self, cost_usd: float, decision_id: str | None = None) -> None:
        self.release(decision_id or "")
        self._accrue()
        self._balance -= cost_usd
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
        return {"lam": self.lam, "spent_usd": self.spent_usd, "queries": self.queries, "recent": self._recent, "started": self._started,
                "balance": self._balance, "balance_at": self._balance_at}

    def restore(self, state: dict[str, Any]) -> None:
        self.lam, self.spent_usd, self.queries = state["lam"], state["spent_usd"], state["queries"]
        self._recent, self._started = state["recent"], state["started"]
        if "balance" in state:
            self._balance, self._balance_at = state["balance"], state["balance_at"]

    def stats(self) -> dict[str, Any]:
        target = self.target_per_query()
        return {
            "lambda": self.lam,
            "target_usd_per_query": self.target_usd_per_query,
            "target_usd_per_hour": self.target_usd_per_hour,
            "effective_target_usd_per_query": target,
            "spent_usd": self.spent_usd,
            "in_flight_usd": self.in_flight_usd,
            "headroom_usd": self.headroom(),
            "queries": self.queries,
            "mean_cost_usd": self.spent_usd / self.queries if self.queries else None,
            "recent_mean_cost_usd": self._recent,
            "spend_vs_target": (self.spent_usd / self.queries / target) if (target and self.queries) else None,
        }


def period_start(period: str, now: datetime) -> datetime:
    if period == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return datetime.min.replace(tzinfo=UTC)


def seconds_to_next_period(period: str, now: datetime) -> int | None:
    start = period_start(period, now)
    if period == "day":
        end = start + timedelta(days=1)
    elif period == "month":
        end = start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)
    else:
        return None
    return max(1, math.ceil((end - now).total_seconds()))


PACING_SCOPE = "pacing"


@dataclass(frozen=True, slots=True)
class SpendRule:
    """A row of money held in the database and how much room it has: a key's budget in its period
    (`limit_usd`), or the pacing target (per query: target x (answers + 1) - spent - running; per hour:
    a balance filling at the hourly rate, capped at `max_carryover_hours` of it, minus running calls)."""

    scope: str
    period_start: datetime
    limit_usd: float | None = None
    target_usd_per_query: float | None = None
    target_usd_per_hour: float | None = None
    max_carryover_hours: float = 1.0

    @property
    def pacing(self) -> bool:
        """A pacing target (counts answers; a failed call only releases its hold), not a key's budget."""
        return self.limit_usd is None


def key_rule(key: ApiKeyConfig, now: datetime) -> SpendRule:
    return SpendRule(f"key:{key.name}", period_start(key.budget_period, now), limit_usd=key.max_spend_usd)


def pacing_rule(pacer: BudgetPacer) -> SpendRule | None:
    """The pacing target as a database row (None without a target)."""
    if not pacer.targeted:
        return None
    return SpendRule(PACING_SCOPE, datetime.min.replace(tzinfo=UTC), target_usd_per_query=pacer.target_usd_per_query,
                     target_usd_per_hour=pacer.target_usd_per_hour, max_carryover_hours=pacer.max_carryover_hours)


@dataclass(frozen=True)
class SpendLimit:
    """What one key may still spend in its current budget period, read in the step that reserves."""

    key: str
    max_spend_usd: float
    period: str
    remaining_usd: float
    retry_after_s: int | None

    def refuse(self, needed_usd: float) -> SpendLimitReached:
        return SpendLimitReached(self, needed_usd)


class SpendLimitReached(TooManyRequests):
    """Not even the cheapest candidate's worst case fits the key's remaining budget: 429, never a 500."""

    def __init__(self, limit: SpendLimit, needed_usd: float) -> None:
        super().__init__(
            f"spending budget of key {limit.key!r} exhausted: ${limit.max_spend_usd:g} per {limit.period}, "
            f"${limit.remaining_usd:.6f} left, this request needs up to ${needed_usd:.6f}",
            retry_after_s=limit.retry_after_s,
            type_="insufficient_quota",
        )
        self.limit = limit
        self.needed_usd = needed_usd


@dataclass
class _Spend:
    period_start: datetime
    usd: float = 0.0  # settled spend plus running reservations
    reserved: dict[str, float] = field(default_factory=dict)  # decisions whose call runs: worst-case cost


class SpendLedger:
    """Per-key spend in the current budget period: reserved at decision time, settled with the real cost.

    In memory, for one process (SQLite, or PostgreSQL without `cluster.enabled`): rebuilt from the
    database at start. Several replicas hold it in the database instead (`SpendRule`).
    """

    def __init__(self, keys: list[ApiKeyConfig], now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._keys = {k.name: k for k in keys if k.max_spend_usd}
        self._now = now
        self._spend: dict[str, _Spend] = {}

    def budgeted(self) -> dict[str, ApiKeyConfig]:
        return self._keys

    def _current(self, tenant: str) -> _Spend:
        start = period_start(self._keys[tenant].budget_period, self._now())
        spend = self._spend.get(tenant)
        if spend is None or spend.period_start != start:
            spend = self._spend[tenant] = _Spend(start)
        return spend

    def load(self, tenant: str, spent_usd: float) -> None:
        """Start from what the database says the tenant spent this period."""
        self._current(tenant).usd = spent_usd

    def limit(self, tenant: str | None) -> SpendLimit | None:
        """The tenant's remaining budget now; None when it has no budget."""
        if tenant is None or tenant not in self._keys:
            return None
        key = self._keys[tenant]
        remaining = max(0.0, key.max_spend_usd - self._current(tenant).usd)
        return SpendLimit(key.name, key.max_spend_usd, key.budget_period, remaining, seconds_to_next_period(key.budget_period, self._now()))

    def rule(self, tenant: str | None) -> SpendRule | None:
        """Several replicas: the tenant's budget row in the database (None when it has no budget)."""
        if tenant is None or tenant not in self._keys:
            return None
        return key_rule(self._keys[tenant], self._now())

    def shared_limit(self, tenant: str, spent_and_reserved_usd: float) -> SpendLimit:
        """Several replicas: the tenant's limit, from what the database holds as spent and running."""
        key = self._keys[tenant]
        remaining = max(0.0, key.max_spend_usd - spent_and_reserved_usd)
        return SpendLimit(key.name, key.max_spend_usd, key.budget_period, remaining, seconds_to_next_period(key.budget_period, self._now()))

    def reserve(self, tenant: str | None, decision_id: str, usd: float) -> None:
        """Count a decision's worst-case cost until `settle` replaces it with the real one."""
        if tenant is None or tenant not in self._keys:
            return
        spend = self._current(tenant)
        spend.usd += usd
        spend.reserved[decision_id] = usd

    def settle(self, tenant: str | None, decision_id: str, usd: float) -> None:
        if tenant is None or tenant not in self._keys:
            return
        spend = self._current(tenant)
        spend.usd += usd - spend.reserved.pop(decision_id, 0.0)

    def describe(self) -> dict[str, dict[str, float | str]]:
        return {
            name: {"max_spend_usd": key.max_spend_usd, "period": key.budget_period, "spent_usd": self._current(name).usd}
            for name, key in self._keys.items()
        }
