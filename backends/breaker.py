"""A circuit breaker for one backend: closed, open, half-open with a single probe.

closed     calls go through. `failure_threshold` consecutive failures open it; a success resets the count.
open       calls are refused for the open period (`open_s` at first).
half_open  the open period has passed: exactly one call at a time (the probe) may go. A probe success
           closes the breaker; a probe failure re-opens it with the period doubled, capped at `max_open_s`.

"half_open" is a function of time: an open breaker whose period has passed *is* half-open, whoever
looks first. So `available` and `state` never change anything a caller could tell apart; only
`try_acquire` takes the probe slot.

Health checks (`record_health_failure` / `record_health_success`):
- a failed check opens the breaker at once, whatever the threshold, and while the backend keeps failing
  its checks the open period restarts at each failed check (with the current period, not doubled). So
  with checks more frequent than `open_s`, no real request is ever spent probing a backend that fails
  its health checks;
- a passed check never closes the breaker. When the backend *comes back* (this check passes, the last
  one failed) the doubled period is forgiven: the period returns to `open_s`, counted from when the
  breaker last opened, so the next request after that is the probe. A backend that passes its health
  checks but fails real requests keeps the doubling (one failed probe per period, at most `max_open_s`).

Single-threaded (asyncio): no locks. The breaker does not know which call holds the probe slot, so a
verdict or `release()` from a call that began *before* the breaker opened frees the slot too; at worst
a second probe goes out. A success reported while open (such a late call) changes nothing.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

State = Literal["closed", "open", "half_open"]

CLOSED: State = "closed"
OPEN: State = "open"
HALF_OPEN: State = "half_open"

_HTTP_5XX = re.compile(r"\bHTTP 5\d\d\b")


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    failure_threshold: int = 1
    open_s: float = 5.0
    max_open_s: float = 60.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.open_s <= 0 or self.max_open_s < self.open_s:
            raise ValueError("need 0 < open_s <= max_open_s")


def failure_kind(reason: str) -> str:
    """A coarse class of a failure message, for counting: timeout, connection, http_5xx, bad_response, other."""
    lowered = reason.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return "timeout"
    if "unreachable" in lowered or "connect" in lowered or "protocolerror" in lowered:
        return "connection"
    if _HTTP_5XX.search(reason):
        return "http_5xx"
    if "invalid" in lowered:
        return "bad_response"
    return "other"


class CircuitBreaker:
    def __init__(self, settings: BreakerSettings | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self._state: State = CLOSED
        self._period = self.settings.open_s  # the open period in force (doubles on failed probes)
        self._opened_at: float | None = None
        self._open_until = 0.0
        self._probe_in_flight = False
        self._health_failing = False
        self.consecutive_failures = 0
        self.failures = 0
        self.failures_by_kind: Counter[str] = Counter()
        self.times_opened = 0
        self.last_error: str | None = None

    # -- state ------------------------------------------------------------------------------------

    def _advance(self) -> State:
        """Open whose period has passed becomes half-open (a function of time, not an event)."""
        if self._state == OPEN and self._clock() >= self._open_until:
            self._state = HALF_OPEN
            self._probe_in_flight = False
        return self._state

    @property
    def state(self) -> State:
        return self._advance()

    @property
    def available(self) -> bool:
        """Would `try_acquire` let a call through now? Takes nothing."""
        state = self._advance()
        return state == CLOSED or (state == HALF_OPEN and not self._probe_in_flight)

    @property
    def open_period_s(self) -> float:
        return self._period

    def retry_in_s(self) -> float:
        """Seconds until a probe may go; 0 unless open."""
        if self._advance() != OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def _open(self, period: float) -> None:
        if self._state != OPEN:
            self.times_opened += 1
        now = self._clock()
        self._state = OPEN
        self._period = period
        self._opened_at = now
        self._open_until = now + period
        self._probe_in_flight = False

    def _close(self) -> None:
        self._state = CLOSED
        self._period = self.settings.open_s
        self._opened_at = None
        self._probe_in_flight = False
        self.consecutive_failures = 0

    # -- calls ------------------------------------------------------------------------------------

    def try_acquire(self) -> bool:
        """May a call go to this backend now? In half-open this takes the one probe slot."""
        state = self._advance()
        if state == CLOSED:
            return True
        if state == HALF_OPEN and not self._probe_in_flight:
            self._probe_in_flight = True
            return True
        return False

    def release(self) -> None:
        """A call that was let through ended without a verdict (client gone, cancelled): free the probe slot."""
        if self._advance() == HALF_OPEN:
            self._probe_in_flight = False

    def record_success(self) -> None:
        state = self._advance()
        if state == CLOSED:
            self.consecutive_failures = 0
        elif state == HALF_OPEN:
            self._close()
        # OPEN: a call that began before the breaker opened; the period stands.

    def record_failure(self, reason: str, kind: str | None = None) -> None:
        self._count(reason, kind)
        state = self._advance()
        self.consecutive_failures += 1
        if state == CLOSED:
            if self.consecutive_failures >= self.settings.failure_threshold:
                self._open(self.settings.open_s)
        elif state == HALF_OPEN:
            self._open(min(self._period * 2, self.settings.max_open_s))
        else:  # OPEN: still failing; the period restarts now, not doubled
            self._open(self._period)

    def _count(self, reason: str, kind: str | None) -> None:
        self.failures += 1
        self.failures_by_kind[kind or failure_kind(reason)] += 1
        self.last_error = reason

    # -- health checks ----------------------------------------------------------------------------

    def record_health_failure(self, reason: str) -> None:
        """A failed health check opens the breaker at once (restarting an open period, never doubling it)."""
        self._count(reason, "health")
        self._health_failing = True
        self._advance()
        self.consecutive_failures += 1
        self._open(self._period)

    def record_health_success(self) -> None:
        """Never closes. After failed checks (the backend came back), the period returns to `open_s`."""
        if self._health_failing:
            self._health_failing = False
            self._period = self.settings.open_s
            if self._state == OPEN and self._opened_at is not None:
                self._open_until = min(self._open_until, self._opened_at + self.settings.open_s)
        self._advance()

    def reset(self) -> None:
        """Close by hand (operator or test); the counters stay."""
        self._close()

    def describe(self) -> dict[str, Any]:
        state = self._advance()
        now = self._clock()
        return {
            "state": state,
            "available": self.available,
            "consecutive_failures": self.consecutive_failures,
            "open_period_s": self._period,
            "opened_s_ago": None if self._opened_at is None else round(now - self._opened_at, 3),
            "retry_in_s": round(self.retry_in_s(), 3) if state == OPEN else None,
            "probe_in_flight": self._probe_in_flight,
            "times_opened": self.times_opened,
            "failures": self.failures,
            "failures_by_kind": dict(self.failures_by_kind),
            "last_error": self.last_error,
        }
