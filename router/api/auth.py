"""Who is calling, what they may do, and how fast and how much they may spend.

Keys live only as SHA-256 hashes. Rate limits are token buckets per key; spending budgets count the
cost of each key's decisions (the predicted cost while a call runs, the real one once it answered)
and are enforced before a backend is called. Both are per process: replicas sharing a database each
enforce their own share of the rate, and rebuild spend from the database at start.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal

from router.config import ApiKeyConfig, AuthConfig, ConfigError
from router.errors import Forbidden, TooManyRequests, Unauthorized

Role = Literal["client", "admin"]
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class Principal:
    """The caller of one request. `tenant` is None for the open (no key) demo mode."""

    name: str
    role: Role
    tenant: str | None

    def require(self, role: Role) -> None:
        if role == "admin" and self.role != "admin":
            raise Forbidden(f"key {self.name!r} has role {self.role!r}; this endpoint needs role 'admin'")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Bucket:
    capacity: float
    per_second: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token; returns 0 on success, else the seconds until one is available."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.per_second)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.per_second


class Authenticator:
    """Resolves `Authorization: Bearer <key>` to a Principal and applies the key's rate limit."""

    def __init__(self, config: AuthConfig, host: str, environ: Mapping[str, str], clock: Callable[[], float] = time.monotonic) -> None:
        self.open = config.open_on_loopback
        if self.open and not is_loopback(host):
            raise ConfigError(f"auth.open_on_loopback needs a loopback server address, not {host!r}; configure [[auth.keys]]")
        if not self.open and not config.keys:
            raise ConfigError("auth: no [[auth.keys]] configured; add keys, or set auth.open_on_loopback for a loopback demo")
        self.keys: dict[str, ApiKeyConfig] = {}
        for key in config.keys:
            if key.key_env is not None:
                raw = environ.get(key.key_env)
                if not raw:
                    raise ConfigError(f"auth.keys {key.name!r}: environment variable {key.key_env} is not set")
                self.keys[hash_key(raw)] = key
            else:
                self.keys[(key.key_sha256 or "").lower()] = key
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def authenticate(self, authorization: str | None) -> Principal:
        """In open mode a configured key still names its tenant; no key, or any other key (OpenAI clients
        insist on sending one), is the anonymous admin."""
        key = self._match(authorization)
        if key is None:
            if self.open:
                return Principal(ANONYMOUS, "admin", None)
            if not authorization:
                raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            raise Unauthorized("invalid API key")
        self._rate_limit(key)
        return Principal(key.name, key.role, key.name)

    def _match(self, authorization: str | None) -> ApiKeyConfig | None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        digest = hash_key(token.strip())
        return next((k for h, k in self.keys.items() if hmac.compare_digest(h, digest)), None)

    def _rate_limit(self, key: ApiKeyConfig) -> None:
        if not key.requests_per_minute:
            return
        now = self._clock()
        bucket = self._buckets.get(key.name)
        if bucket is None:
            capacity = float(key.burst or max(1.0, key.requests_per_minute))
            bucket = self._buckets[key.name] = _Bucket(capacity, key.requests_per_minute / 60, capacity, now)
        wait = bucket.take(now)
        if wait:
            raise TooManyRequests(
                f"rate limit of key {key.name!r} reached ({key.requests_per_minute:g} requests per minute)",
                retry_after_s=math.ceil(wait),
            )


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


@dataclass
class _Spend:
    period_start: datetime
    usd: float = 0.0
    reserved: dict[str, float] = field(default_factory=dict)  # decisions whose call runs: predicted cost


class SpendLedger:
    """Per-tenant spend in the current budget period: reserved at decision time, settled with the real cost."""

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

    def remaining(self, tenant: str | None) -> float | None:
        """USD the tenant may still spend this period; None when it has no budget."""
        if tenant is None or tenant not in self._keys:
            return None
        return max(0.0, self._keys[tenant].max_spend_usd - self._current(tenant).usd)

    def check(self, tenant: str | None, needed_usd: float) -> None:
        remaining = self.remaining(tenant)
        if remaining is None or needed_usd <= remaining:
            return
        key = self._keys[str(tenant)]
        raise TooManyRequests(
            f"spending budget of key {key.name!r} exhausted: ${key.max_spend_usd:g} per {key.budget_period}, "
            f"${remaining:.6f} left, this request needs about ${needed_usd:.6f}",
            retry_after_s=seconds_to_next_period(key.budget_period, self._now()),
            type_="insufficient_quota",
        )

    def reserve(self, tenant: str | None, decision_id: str, usd: float) -> None:
        """Count a decision's predicted cost until `settle` replaces it with the real one."""
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
