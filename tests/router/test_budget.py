"""Money: pacing counts calls still running and banks at most the carry-over, and per-key spend."""

from datetime import UTC, datetime

import pytest

from router.budget import BudgetPacer, SpendLedger, seconds_to_next_period
from router.config import ApiKeyConfig
from router.errors import TooManyRequests


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_headroom_counts_calls_still_running():
    pacer = BudgetPacer(target_usd_per_query=1.0)
    assert pacer.headroom() == pytest.approx(1.0)
    pacer.reserve("d1", 0.9)
    pacer.reserve("d2", 0.5)
    assert pacer.headroom() == pytest.approx(1.0 - 1.4), "two running calls spend the same headroom only once"
    pacer.observe(0.25, "d1")  # d1 answered: its real cost replaces the reservation
    assert pacer.headroom() == pytest.approx(2.0 - 0.25 - 0.5)
    pacer.release("d2")  # d2 failed: nothing spent
    assert pacer.headroom() == pytest.approx(1.75)
    assert pacer.stats()["in_flight_usd"] == 0.0


def test_an_hourly_target_banks_at_most_the_carry_over():
    clock = Clock()
    pacer = BudgetPacer(target_usd_per_hour=1.0, max_carryover_hours=1.0, clock=clock)
    for _ in range(10):
        pacer.observe(0.001)
    clock.now += 10 * 3600  # ten idle hours (or ten hours down)
    assert pacer.headroom() == pytest.approx(1.0), "one hour of budget, not ten"
    pacer.observe(0.6)
    assert pacer.headroom() == pytest.approx(0.4)
    clock.now += 1800  # half an hour refills half an hour's budget
    assert pacer.headroom() == pytest.approx(0.9)
    restored = BudgetPacer(target_usd_per_hour=1.0, max_carryover_hours=1.0, clock=clock)
    restored.restore(pacer.snapshot())
    clock.now += 5 * 3600
    assert restored.headroom() == pytest.approx(1.0), "downtime after a restore is capped the same way"


def test_spend_ledger_reserves_settles_and_resets_by_period():
    now = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)
    ledger = SpendLedger([ApiKeyConfig(name="a", key_sha256="0" * 64, max_spend_usd=1.0, budget_period="day")], lambda: now)
    ledger.load("a", 0.25)
    ledger.reserve("a", "d1", 0.5)
    assert ledger.limit("a").remaining_usd == pytest.approx(0.25)
    ledger.settle("a", "d1", 0.125)  # the real cost replaces the prediction
    limit = ledger.limit("a")
    assert limit.remaining_usd == pytest.approx(0.625)
    refused = limit.refuse(0.7)
    assert isinstance(refused, TooManyRequests) and refused.status == 429
    assert refused.type == "insufficient_quota" and refused.headers["Retry-After"] == "3600"
    assert ledger.limit("unbudgeted") is None and ledger.limit(None) is None
    now = datetime(2026, 11, 22, 0, 0, 1, tzinfo=UTC)
    assert ledger.limit("a").remaining_usd == 1.0
    assert seconds_to_next_period("month", datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == 60
    assert seconds_to_next_period("total", now) is None



def test_the_spend_limit_error_is_a_429_after_a_period_rollover_too():
    now = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
    key = ApiKeyConfig(name="a", key_sha256="0" * 64, max_spend_usd=1.0, budget_period="day")
    ledger = SpendLedger([key], lambda: now)
    ledger.reserve("a", "d1", 0.99)
    limit = ledger.limit("a")
    now = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC)  # the period rolls over between reading and refusing
    refused = limit.refuse(0.5)
    assert isinstance(refused, TooManyRequests) and refused.status == 429 and refused.type == "insufficient_quota"
    assert ledger.limit("a").remaining_usd == 1.0
