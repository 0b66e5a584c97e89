"""Prometheus metrics of one router instance (its own registry, so several can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "llm_router_decisions", "Routing decisions", ["policy", "backend", "kind"], registry=self.registry
        )
        self.requests = Counter(
            "llm_router_backend_requests", "Backend calls by outcome", ["backend", "outcome"], registry=self.registry
        )
        self.rewards = Counter("llm_router_rewards", "Feedback recorded", ["kind"], registry=self.registry)
        self.cost = Counter("llm_router_cost_usd", "Spend in USD", ["backend"], registry=self.registry)
        self.decision_seconds = Histogram(
            "llm_router_decision_seconds",
            "Time to decide (embed, recall, policy, log)",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        self.backend_seconds = Histogram(
            "llm_router_backend_seconds", "Backend call latency", ["backend"], registry=self.registry
        )
        self.backend_up = Gauge("llm_router_backend_up", "1 if the backend passed its last check", ["backend"], registry=self.registry)
        self.memory_size = Gauge("llm_router_memory_queries", "Queries in the FAISS memory", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
