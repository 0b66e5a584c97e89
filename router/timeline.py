"""The dashboard's numbers over time, read from the log (blocking: run in a worker thread).

Per policy: the mean reward of the decisions it made, and its off-policy estimates (IPS, SNIPS) over
every rewarded decision, by the engine's own rule (`add_shadow_reward`). Both are running values over the
window's rewards (its newest `MAX_REWARDS`), so a window that holds the whole log ends on the estimates
`GET /v1/policies/stats` shows. Spend: cumulative from the window's start, against the pacing target's
allowance, and each budgeted key's budget burning down in its current period. And the newest decisions
with their feedback.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import accumulate

from router.engine import DecisionRecord, ShadowEstimate, add_shadow_reward
from router.store import DecisionSummary, Store

MIN_WINDOW_S = 60.0  # the shortest window drawn, however young the log
MAX_REWARDS = 5_000  # the estimates are drawn from the newest rewards of a window, at most this many (a bound on the work per refresh)


@dataclass(frozen=True)
class KeyBudget:
    """A key's spending budget in its current period."""

    name: str
    max_spend_usd: float
    period: str
    period_start: datetime


@dataclass(frozen=True)
class Budgets:
    """What the spend is measured against: the pacing target (at most one of the two) and the keys' budgets."""

    target_usd_per_query: float | None = None
    target_usd_per_hour: float | None = None
    keys: list[KeyBudget] = field(default_factory=list)


@dataclass(frozen=True)
class PolicySeries:
    """One value per bucket; None until there is something to estimate from."""

    rewards: list[int]  # rewards of the policy's own decisions so far
    mean_reward: list[float | None]
    ips: list[float | None]
    snips: list[float | None]


@dataclass(frozen=True)
class KeyBurnDown:
    max_spend_usd: float
    period: str
    remaining_usd: list[float | None]  # None before the current period began


@dataclass(frozen=True)
class SpendSeries:
    spent_usd: list[float]  # cumulative from the window's start
    allowance_usd: list[float] | None  # what the pacing target allows over the same time (None: no target)
    keys: dict[str, KeyBurnDown]


@dataclass(frozen=True)
class Timeline:
    start: float  # unix seconds
    end: float
    bucket_s: float
    t: list[float]  # each bucket's end
    policies: dict[str, PolicySeries]
    spend: SpendSeries
    decisions: list[DecisionSummary]


def _utc(at: datetime) -> datetime:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def build_timeline(
    store: Store, now: datetime, window_s: float, buckets: int, policies: list[str], budgets: Budgets, recent: int
) -> Timeline:
    """`window_s` back from `now` in `buckets` steps; a window longer than the log starts just before its
    first event, so a young router's few minutes are not squeezed into the last step of a day."""
    rewards = store.rewards_since(now - timedelta(seconds=window_s), MAX_REWARDS)
    spending = store.spend_since(now - timedelta(seconds=window_s))
    first = min((_utc(rows[0][0]) for rows in (rewards, spending) if rows), default=now)
    window_s = min(window_s, max(MIN_WINDOW_S, (now - first).total_seconds() * 1.05))
    start = now - timedelta(seconds=window_s)
    bucket_s = window_s / buckets
    ends = [start.timestamp() + bucket_s * (i + 1) for i in range(buckets)]
    return Timeline(
        start=start.timestamp(), end=now.timestamp(), bucket_s=bucket_s, t=ends,
        policies=_policy_series(rewards, policies, ends),
        spend=_spend_series(store, spending, start.timestamp(), ends, budgets),
        decisions=[replace(d, created_at=_utc(d.created_at)) for d in store.recent_decisions(recent)],
    )


def _bucket(ends: list[float], at: datetime) -> int:
    """The bucket holding `at` (the last one for anything written during this read)."""
    return min(bisect.bisect_left(ends, _utc(at).timestamp()), len(ends) - 1)


def _policy_series(rewards: list[tuple[datetime, DecisionRecord, float]], policies: list[str], ends: list[float]) -> dict[str, PolicySeries]:
    estimates = {name: ShadowEstimate() for name in policies}
    own = {name: [0, 0.0] for name in policies}  # rewards of the policy's own decisions: count, sum
    by_bucket: list[list[tuple[DecisionRecord, float]]] = [[] for _ in ends]
    for at, record, reward in rewards:
        by_bucket[_bucket(ends, at)].append((record, reward))
    series = {name: PolicySeries([], [], [], []) for name in policies}
    for rewarded in by_bucket:
        for record, reward in rewarded:
            add_shadow_reward(estimates, record, reward)
            tally = own.get(record.policy)
            if tally is not None:
                tally[0] += 1
                tally[1] += reward
        for name, line in series.items():
            count, total = own[name]
            view = estimates[name].view()
            line.rewards.append(int(count))
            line.mean_reward.append(total / count if count else None)
            line.ips.append(view["ips"])
            line.snips.append(view["snips"])
    return series


def _spend_series(
    store: Store, spending: list[tuple[datetime, str | None, float]], start: float, ends: list[float], budgets: Budgets
) -> SpendSeries:
    spent, decisions = [0.0] * len(ends), [0] * len(ends)
    by_key = {key.name: [0.0] * len(ends) for key in budgets.keys}
    for at, tenant, cost in spending:
        index = _bucket(ends, at)
        spent[index] += cost
        decisions[index] += 1
        if tenant in by_key:
            by_key[tenant][index] += cost
    allowance = None
    if budgets.target_usd_per_query:
        allowance = [budgets.target_usd_per_query * n for n in accumulate(decisions)]
    elif budgets.target_usd_per_hour:
        allowance = [budgets.target_usd_per_hour * (end - start) / 3600 for end in ends]
    keys = {}
    for key in budgets.keys:
        # Walk back from what the key has spent in its period by now: what it had left at each bucket's end.
        left = key.max_spend_usd - store.tenant_spend(key.name, key.period_start)
        after = list(accumulate(reversed(by_key[key.name])))[::-1][1:] + [0.0]  # spent in the buckets after each one
        remaining = [left + later if end >= key.period_start.timestamp() else None for end, later in zip(ends, after)]
        keys[key.name] = KeyBurnDown(key.max_spend_usd, key.period, remaining)
    return SpendSeries(list(accumulate(spent)), allowance, keys)
