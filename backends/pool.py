"""The set of backends and what the router knows of each: client, health, queue depth, failures, breaker.

Whether a request may go to a backend is its circuit breaker's call (`backends.breaker`), not the
health flag: a failed call or a failed health check opens the breaker, so the next request avoids a
server that just failed one; after the open period one request probes it again.

A request's path through the pool is `call_with_failover`, for plain and streamed calls alike: each
backend in order is admitted by its breaker (`acquire`) or skipped; a connection error, timeout or
5xx counts against the backend and moves on to the next one; a 4xx is the request's fault (the
backend answered, so it counts as a success for the breaker) and ends the loop; a cancelled call
releases the slot with no verdict.

`healthy` stays the last health check's verdict, for reporting only; its changes are logged (a backend
found down at start is a warning naming it). The health check also learns each backend's context length
(`max_model_len` in vLLM's `/v1/models`): `eligible(prompt_tokens)` leaves out backends a prompt does not
fit, and the client lowers a router-set `max_tokens` to what fits (`BackendClient.fit_max_tokens`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from backends.breaker import BreakerSettings, CircuitBreaker
from backends.client import BackendClient, BackendError, BackendSpec, HealthReport

T = TypeVar("T")

log = logging.getLogger("llm_router.backends")


@dataclass(frozen=True, slots=True)
class Failure:
    """A backend a request did not get an answer from, and why (`status` None: skipped by its breaker)."""

    backend: str
    status: int | None
    reason: str


class FailoverExhausted(Exception):
    """No backend in the order answered; `last_error` is the last call's error (None: all were skipped)."""

    def __init__(self, last_error: BackendError | None, failures: list[Failure]) -> None:
        super().__init__(str(last_error) if last_error else "every backend was skipped")
        self.last_error = last_error
        self.failures = failures


@dataclass
class BackendState:
    client: BackendClient
    healthy: bool | None = None  # None: not checked yet, eligible
    last_error: str | None = None
    last_check: float | None = None
    queue: dict[str, float] = field(default_factory=dict)
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)

    @property
    def spec(self) -> BackendSpec:
        return self.client.spec

    @property
    def max_model_len(self) -> int | None:
        """The backend's context length in tokens, as its `/v1/models` reported it (None: not known)."""
        return self.client.max_model_len

    def fits(self, prompt_tokens: int | None) -> bool:
        """The prompt leaves room for at least one answer token in the context (an unknown context fits)."""
        return prompt_tokens is None or self.max_model_len is None or prompt_tokens < self.max_model_len

    @property
    def down_reason(self) -> str | None:
        """Why no request may go here now (None: it can serve): its breaker, or its failed health check."""
        if not self.breaker.available:
            return f"circuit breaker {self.breaker.state}: {self.last_error or 'after failures'}"
        if self.healthy is False:
            return self.last_error or "health check failed"
        return None

    @property
    def failures(self) -> int:
        """Failed requests (the breaker also counts failed health checks, under kind "health")."""
        return self.breaker.failures - self.breaker.failures_by_kind["health"]


class BackendPool:
    def __init__(
        self,
        specs: list[BackendSpec],
        http: httpx.AsyncClient | None = None,
        breaker: BreakerSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http or httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        self.breaker_settings = breaker or BreakerSettings()
        self._clock = clock
        self._states: dict[str, BackendState] = {}
        self.launcher: Any = None  # a `BackendLauncher` that runs the managed backends: their state shows in describe()
        for spec in specs:
            self.add(spec)

    def add(self, spec: BackendSpec) -> None:
        breaker = CircuitBreaker(self.breaker_settings, self._clock)
        self._states[spec.name] = BackendState(BackendClient(spec, self.http), breaker=breaker)

    def __contains__(self, name: str) -> bool:
        return name in self._states

    def names(self) -> list[str]:
        return list(self._states)

    def state(self, name: str) -> BackendState:
        return self._states[name]

    def states(self) -> list[BackendState]:
        return list(self._states.values())

    def eligible(self, prompt_tokens: int | None = None) -> list[BackendState]:
        """Backends whose breaker would let a request through now (closed, or ready for a probe) and, given
        the prompt's estimated tokens, whose known context it fits.

        Takes nothing (the probe slot is taken by `acquire`), so a backend listed here may still be
        refused by `acquire` when another request took its probe slot in between.
        """
        return [s for s in self._states.values() if s.breaker.available and s.fits(prompt_tokens)]

    def acquire(self, name: str) -> bool:
        """Call right before sending a request to `name`; False: skip it, try the next candidate.

        True obliges the caller to end with exactly one of record_success, record_failure or release.
        """
        return self._states[name].breaker.try_acquire()

    def record_success(self, name: str) -> None:
        self._states[name].breaker.record_success()

    def record_failure(self, name: str, reason: str) -> None:
        """A request failed for the backend's sake (connection error, timeout, 5xx): counted, breaker told."""
        state = self._states[name]
        state.last_error = reason
        state.breaker.record_failure(reason)

    def release(self, name: str) -> None:
        """An acquired request ended without a verdict on the backend (client gone, cancelled)."""
        self._states[name].breaker.release()

    def record_error(self, error: BackendError) -> None:
        """A call (or a stream already under way) failed: the breaker hears of it unless the client was at fault."""
        if error.retryable:
            self.record_failure(error.backend, str(error))
        else:
            self.record_success(error.backend)  # it answered: the request was at fault, not the backend

    async def call_with_failover(
        self,
        order: list[str],
        call: Callable[[BackendState], Awaitable[T]],
        *,
        pinned: bool,
        failures: list[Failure],
        on_error: Callable[[BackendError], None] | None = None,
    ) -> tuple[str, T]:
        """`call` each backend in `order` until one answers: returns (backend, its result).

        A pinned request bypasses the breaker and is never retried elsewhere. Every backend that did not
        answer is appended to `failures`; `on_error` hears each failed call. Raises `FailoverExhausted`.
        """
        last_error: BackendError | None = None
        for name in order:
            if not (pinned or self.acquire(name)):
                failures.append(Failure(name, None, "circuit breaker open"))
                continue
            try:
                result = await call(self._states[name])
            except BackendError as error:
                last_error = error
                failures.append(Failure(name, error.status, str(error)))
                self.record_error(error)
                if on_error is not None:
                    on_error(error)
                if error.retryable and not pinned:
                    continue
                break
            except BaseException:
                self.release(name)
                raise
            self.record_success(name)
            return name, result
        raise FailoverExhausted(last_error, failures)

    async def check_all(self, timeout_s: float) -> None:
        states = list(self._states.values())
        reports = await asyncio.gather(*(s.client.health(timeout_s) for s in states))
        now = time.time()
        for state, report in zip(states, reports):
            self._apply(state, report, now)

    @staticmethod
    def _apply(state: BackendState, report: HealthReport, now: float) -> None:
        if report.healthy is False and state.healthy is not False:
            first = " at start" if state.healthy is None else ""
            log.warning("backend %s (%s) is down%s: %s", state.spec.name, state.spec.base_url, first, report.error)
        elif report.healthy and state.healthy is False:
            log.info("backend %s (%s) is up again", state.spec.name, state.spec.base_url)
        state.healthy = report.healthy
        state.last_check = now
        if report.error:
            state.last_error = report.error
        if report.max_model_len is not None:
            state.client.max_model_len = report.max_model_len
        state.queue = report.queue
        if report.healthy:
            state.breaker.record_health_success()
        else:
            state.breaker.record_health_failure(report.error or "health check failed")

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": s.spec.name,
                "base_url": s.spec.base_url,
                "model": s.spec.model,
                "price_per_1m_input_tokens_usd": s.spec.price_per_1m_input_tokens_usd,
                "price_per_1m_output_tokens_usd": s.spec.price_per_1m_output_tokens_usd,
                "max_concurrent_requests": s.spec.max_concurrent_requests,
                "timeout_s": s.spec.timeout_s,
                "max_model_len": s.max_model_len,
                "healthy": s.healthy,
                "down_reason": s.down_reason,
                "last_error": s.last_error,
                "last_check": s.last_check,
                "in_flight": s.client.in_flight,
                "failures": s.failures,
                "breaker": s.breaker.describe(),
                "queue": {
                    "num_requests_running": s.queue.get("vllm:num_requests_running"),
                    "num_requests_waiting": s.queue.get("vllm:num_requests_waiting"),
                    "kv_cache_usage_perc": s.queue.get("vllm:kv_cache_usage_perc"),
                },
                "managed": self.launcher.describe(s.spec.name) if self.launcher is not None else None,
            }
            for s in self._states.values()
        ]

    async def close(self) -> None:
        await self.http.aclose()
