"""The set of backends and what the router knows of each: client, health, queue depth, failures.

Health is refreshed by `check_all` on a schedule and
marked down at once when a call fails, so the next request avoids a server that just refused one.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from backends.client import BackendClient, BackendSpec, HealthReport


@dataclass
class BackendState:
    client: BackendClient
    healthy: bool | None = None  # None: not checked yet, eligible
    last_error: str | None = None
    last_check: float | None = None
    queue: dict[str, float] = field(default_factory=dict)
    failures: int = 0

    @property
    def spec(self) -> BackendSpec:
        return self.client.spec


class BackendPool:
    def __init__(self, specs: list[BackendSpec], http: httpx.AsyncClient | None = None) -> None:
        self.http = http or httpx.AsyncClient(limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200))
        self._states: dict[str, BackendState] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: BackendSpec) -> None:
        self._states[spec.name] = BackendState(BackendClient(spec, self.http))

    def __contains__(self, name: str) -> bool:
        return name in self._states

    def names(self) -> list[str]:
        return list(self._states)

    def state(self, name: str) -> BackendState:
        return self._states[name]

    def eligible(self) -> list[BackendState]:
        """Backends not known to be down (unchecked ones count as up)."""
        return [s for s in self._states.values() if s.healthy is not False]

    def mark_failed(self, name: str, reason: str) -> None:
        state = self._states.get(name)
        if state is not None:
            state.healthy = False
            state.last_error = reason
            state.failures += 1

    async def check_all(self, timeout_s: float) -> None:
        states = list(self._states.values())
        reports = await asyncio.gather(*(s.client.health(timeout_s) for s in states))
        now = time.time()
        for state, report in zip(states, reports):
            self._apply(state, report, now)

    @staticmethod
    def _apply(state: BackendState, report: HealthReport, now: float) -> None:
        state.healthy = report.healthy
        state.last_check = now
        if report.error:
            state.last_error = report.error
        state.queue = report.queue

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
                "healthy": s.healthy,
                "last_error": s.last_error,
                "last_check": s.last_check,
                "in_flight": s.client.in_flight,
                "failures": s.failures,
                "queue": {
                    "num_requests_running": s.queue.get("vllm:num_requests_running"),
                    "num_requests_waiting": s.queue.get("vllm:num_requests_waiting"),
                    "kv_cache_usage_perc": s.queue.get("vllm:kv_cache_usage_perc"),
                },
            }
            for s in self._states.values()
        ]

    async def close(self) -> None:
        await self.http.aclose()
