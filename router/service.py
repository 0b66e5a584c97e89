"""The routing engine: the one object that owns the request path (embed, recall, decide, call, log).

The HTTP handlers and the offline replay both drive this class, so what is measured offline is what
runs in the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from backends.breaker import BreakerSettings
from backends.client import BackendError, BackendSpec
from backends.pool import BackendPool
from policies import Policy, PolicyError, Predictions, registry
from router.auth import Principal, SpendLedger, period_start
from router.budget import BudgetPacer, OutputLengthModel
from router.config import BackendConfig, RouterConfig
from router.core import PINNED, Candidate, DecisionRecord, RoutingCore, SpendLimitReached
from router.db import create_db_engine, migrate
from router.embedding import Embedder, TextBatcher
from router.errors import (
    BadGateway,
    BadRequest,
    Conflict,
    Forbidden,
    GatewayTimeout,
    NotFound,
    ServiceUnavailable,
    UpstreamClientError,
)
from router.memory import Memory
from router.metrics import RouterMetrics
from router.predicting import PredictorSet
from router.protocol import ChatCompletionRequest, RewardRequest, RewardResponse, RouterInfo, RouterOptions
from router.store import (
    GroupWriter,
    Store,
    add_decision,
    add_preference,
    add_reward,
    finish_decision,
    load_decision,
    write_snapshot,
)
from router.tables import Decision, QueryEmbedding
from router.training import TrainingScheduler, recent_runs

log = logging.getLogger("llm_router")

ROUTER_STATE = "_router"  # snapshot row of the router-level state (pacing, answer lengths, shadow estimates)


def backend_spec(config: BackendConfig) -> BackendSpec:
    return BackendSpec(
        name=config.name,
        base_url=config.base_url,
        model=config.model,
        price_per_1m_input_tokens_usd=config.price_per_1m_input_tokens_usd,
        price_per_1m_output_tokens_usd=config.price_per_1m_output_tokens_usd,
        max_concurrent_requests=config.max_concurrent_requests,
        timeout_s=config.timeout_s,
    )


def estimate_tokens(text: str) -> int:
    """Rough token count (characters / 4), the same rule as the replay data; good enough to price a prompt."""
    return max(1, len(text) // 4)


async def _prepend(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async with contextlib.aclosing(rest) as upstream:
        async for item in upstream:
            yield item


@dataclass
class Routed:
    """A decision made and logged, with the backends to try in order (the choice, then fallbacks)."""

    info: RouterInfo
    order: list[str]
    pinned: bool
    tenant: str | None
    failures: list[dict[str, Any]] = field(default_factory=list)  # each failed or skipped backend, with its reason

    def failed(self, backend: str, status: int | None, reason: str) -> None:
        self.info.failed_backends.append(backend)
        self.failures.append({"backend": backend, "status": status, "reason": reason})


class RoutingEngine:
    def __init__(self, config: RouterConfig, embedder: Embedder | None = None) -> None:
        self.config = config
        self.metrics = RouterMetrics()
        self.embedder = embedder or Embedder(config.embedder.path)
        self.db = create_db_engine(config.database_url)
        if config.auto_migrate:
            migrate(self.db)
        self.store = Store(self.db)
        self.writer = GroupWriter(self.db)
        breaker = config.breaker
        self.pool = BackendPool(
            [backend_spec(b) for b in config.backends],
            breaker=BreakerSettings(breaker.failure_threshold, breaker.open_s, breaker.max_open_s),
        )
        budget = config.budget
        self.core = RoutingCore(
            policies={
                name: registry.create(name, seed=config.seed, **config.policy_options.get(name, {}))
                for name in config.policy_names
            },
            active=config.default_policy,
            memory=Memory(self.embedder.dim),
            pacer=BudgetPacer(
                target_usd_per_query=budget.target_usd_per_query or None,
                target_usd_per_hour=budget.target_usd_per_hour or None,
                cost_weight=budget.cost_weight,
                step=budget.pacing_step,
            ),
            output_lengths=OutputLengthModel(default_tokens=budget.default_output_tokens),
            neighbours=config.embedder.neighbours,
        )
        self._embed_batcher = TextBatcher(self.embedder.embed)  # concurrent requests share one encode
        self._background: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._learned = (0, 0)  # highest (reward id, preference id) whose learning is in the policies
        self._since_snapshot = 0
        self.spend = SpendLedger(config.auth.keys)
        self.predictors = self._predictor_set()
        self._predict_batcher = TextBatcher(self.predictors.predict, name="predict") if self.predictors else None
        self.training: TrainingScheduler | None = None
        self._load_memory()
        self._restore_state()
        self._load_spend()

    @property
    def policies(self) -> dict[str, Policy]:
        return self.core.policies

    @property
    def memory(self) -> Memory:
        return self.core.memory

    @property
    def active_policy(self) -> str:
        return self.core.active

    def set_active_policy(self, name: str) -> None:
        if name not in self.core.policies:
            raise BadRequest(f"unknown policy {name!r}; this router runs {sorted(self.core.policies)}")
        self.core.active = name

    # -- start-up -------------------------------------------------------------------------------

    def _load_memory(self) -> None:
        for rows in self.store.memory_rows(self.embedder.name):
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])
            self.memory.add(ids, vectors, [r[2] for r in rows])
        self.metrics.memory_size.set(len(self.memory))

    def _predictor_set(self) -> PredictorSet | None:
        """Only when a predictor policy runs: it costs an encoder pass per query."""
        if not {"forc", "hybrid"} & set(self.config.policy_names):
            return None
        predictors = PredictorSet(self.config.predictors.artifacts_dir, [b.name for b in self.config.backends])
        predictors.reload()
        return predictors

    def _load_spend(self) -> None:
        for tenant, key in self.spend.budgeted().items():
            since = period_start(key.budget_period, datetime.now(UTC))
            self.spend.load(tenant, self.store.tenant_spend(tenant, since))

    def _restore_state(self) -> None:
        """Latest snapshots, then every reward and preference acknowledged after them, in order.

        A policy with no snapshot (new in the config) learns from the whole log.
        """
        snapshots = self.store.latest_snapshots()
        start: dict[str, tuple[int, int]] = {}
        for name, policy in self.policies.items():
            row = snapshots.get(name)
            if row is not None:
                policy.restore(row.state)
                start[name] = (row.last_reward_id, row.last_preference_id)
            else:
                start[name] = (0, 0)
        router_row = snapshots.get(ROUTER_STATE)
        if router_row is not None:
            self.core.restore(router_row.state)
        router_start = (router_row.last_reward_id, router_row.last_preference_id) if router_row else (0, 0)
        first = min([*start.values(), router_start])
        learned = [router_start[0], router_start[1]]
        for stored in self.store.feedback_since(*first):
            index = 0 if stored.reward is not None else 1
            learners = {name for name, ids in start.items() if ids[index] < stored.feedback_id}
            with_router = router_start[index] < stored.feedback_id
            if stored.vector is not None and (learners or with_router):
                self._apply(stored.decision, stored.vector, stored.reward, stored.preference, learners, with_router)
            learned[index] = max(learned[index], stored.feedback_id)
        self._learned = (learned[0], learned[1])
    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.check_backends()
        self._health_task = asyncio.create_task(self._health_loop())
        if self.predictors is not None:
            self.training = TrainingScheduler(self.config, self._trained)
            self.training.start()

    async def train(self, trigger: str = "api") -> list[dict[str, Any]]:
        """One predictor training run now (in the worker process), then the hot swap."""
        if self.training is None:
            raise BadRequest("no predictor policy (forc, hybrid) runs in this router; nothing to train")
        return await self.training.run(trigger)

    async def _trained(self, runs: list[dict[str, Any]]) -> None:
        if self.predictors is not None and any(run["promoted"] for run in runs):
            await asyncio.to_thread(self.predictors.reload)

    async def close(self) -> None:
        if self.training is not None:
            self.training.shutdown()
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.save_snapshot()
        await self.writer.close()
        await self.pool.close()
        self._embed_batcher.close()
        if self._predict_batcher is not None:
            self._predict_batcher.close()
        self.db.dispose()

    async def check_backends(self) -> None:
        await self.pool.check_all(self.config.health.timeout_s)
        for name in self.pool.names():
            self.metrics.backend_up.labels(name).set(1 if self.pool.state(name).healthy else 0)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            try:
                await self.check_backends()
            except Exception:  # a failed round must not stop later ones
                log.exception("backend health check failed")

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- deciding ---------------------------------------------------------------------------------

    async def embed(self, text: str) -> np.ndarray:
        return await self._embed_batcher.one(text)

    async def _predict(self, query: str) -> Predictions | None:
        if self._predict_batcher is None or self.predictors is None or not self.predictors.ready:
            return None
        return await self._predict_batcher.one(query)

    def _policy_name(self, options: RouterOptions) -> str:
        name = options.policy or self.active_policy
        if name not in self.policies:
            raise BadRequest(f"unknown policy {name!r}; this router runs {sorted(self.policies)}")
        return name

    def _check_limits(self, request: ChatCompletionRequest) -> None:
        limits = self.config.limits
        if len(request.messages) > limits.max_messages:
            raise BadRequest(f"messages: {len(request.messages)} messages; this router accepts at most {limits.max_messages}")
        longest = max(len(m.text()) for m in request.messages)
        if longest > limits.max_message_chars:
            raise BadRequest(f"messages: a message has {longest} characters; this router accepts at most {limits.max_message_chars}")
        asked = max(request.max_tokens or 0, request.max_completion_tokens or 0)
        if asked > limits.max_tokens:
            raise BadRequest(f"max_tokens: {asked} asked; this router allows at most {limits.max_tokens}")

    def upstream_body(self, request: ChatCompletionRequest) -> dict[str, Any]:
        """The request as the backend gets it, with the router's output cap when the client set none."""
        body = request.upstream_body()
        if request.output_token_limit() is None:
            body["max_tokens"] = self.config.limits.max_tokens
        return body

    async def decide(self, request: ChatCompletionRequest, kind: str, caller: Principal | None = None) -> Routed:
        started = time.perf_counter()
        self._check_limits(request)
        tenant = caller.tenant if caller else None
        remaining = self.spend.remaining(tenant)
        options = request.router or RouterOptions()
        policy_name = self._policy_name(options)
        pinned = request.model if request.model != "auto" else None
        if pinned is not None and pinned not in self.pool:
            raise NotFound(f"unknown backend {pinned!r}; use \"auto\" or one of {self.pool.names()}")
        names = [pinned] if pinned else [s.spec.name for s in self.pool.eligible()]
        if not names:
            raise ServiceUnavailable("no backend available: every backend's circuit breaker is open after failures")

        query = request.query_text()
        vector, predictions = await asyncio.gather(self.embed(query), self._predict(query))
        prompt_tokens = estimate_tokens(request.prompt_text())
        cap = options.max_cost_usd if options.max_cost_usd is not None else (self.config.budget.default_max_cost_usd or None)
        candidates = [
            Candidate(n, self.pool.state(n).spec.price_per_1m_input_tokens_usd, self.pool.state(n).spec.price_per_1m_output_tokens_usd)
            for n in names
        ]
        decision_id = "dec_" + uuid.uuid4().hex
        memory_id = uuid.uuid4().int >> 65  # 63 bits: a positive int64 id for FAISS
        try:
            decided = self.core.decide(
                decision_id, memory_id, vector, prompt_tokens, candidates, policy=policy_name, pinned=pinned,
                max_cost_usd=cap, output_limit=request.output_token_limit() or self.config.limits.max_tokens,
                spend_limit_usd=remaining, predictions=predictions,
            )
        except SpendLimitReached as exc:
            self.spend.check(tenant, exc.cheapest_usd)
            raise
        record, choice = decided.record, decided.choice
        chosen = decided.context.arm(choice.arm)
        if kind == "route":  # the client calls the backend itself: the predicted cost is what it spends
            self.spend.settle(tenant, decision_id, chosen.predicted_cost_usd)
        else:
            self.spend.reserve(tenant, decision_id, chosen.predicted_cost_usd)
        decision_ms = (time.perf_counter() - started) * 1000
        row = Decision(
            id=decision_id,
            kind=kind,
            tenant=tenant,
            requested_model=request.model,
            query=query,
            prompt_tokens_estimate=prompt_tokens,
            embedding_id=memory_id,
            policy=record.policy,
            backend=choice.arm,
            propensity=choice.propensity,
            scores=choice.scores,
            predicted_cost_usd=chosen.predicted_cost_usd,
            max_cost_usd=cap,
            over_budget=decided.over_budget,
            decision_ms=decision_ms,
            **record.columns(),
        )
        embedding = QueryEmbedding(id=memory_id, embedder=self.embedder.name, dim=self.embedder.dim, vector=vector.tobytes())
        try:
            await self.writer.submit(lambda session: add_decision(session, row, embedding))
        except BaseException:  # not logged, so not remembered either (and not counted against the tenant)
            self.memory.remove(decision_id)
            self.spend.settle(tenant, decision_id, 0.0)
            raise
        if kind == "route":  # the client calls the backend itself: pace on the predicted cost
            self.core.pacer.observe(chosen.predicted_cost_usd)
        self.metrics.memory_size.set(len(self.memory))
        self.metrics.decisions.labels(record.policy, choice.arm, kind).inc()
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        info = RouterInfo(
            decision_id=decision_id,
            backend=choice.arm,
            policy=record.policy,
            propensity=choice.propensity,
            predicted_cost_usd=chosen.predicted_cost_usd,
            max_cost_usd=cap,
            over_budget=decided.over_budget,
            scores=choice.scores,
        )
        return Routed(info=info, order=[choice.arm, *decided.fallbacks], pinned=pinned is not None, tenant=tenant)

    async def route(self, request: ChatCompletionRequest, caller: Principal | None = None) -> RouterInfo:
        return (await self.decide(request, "route", caller)).info

    # -- generating -------------------------------------------------------------------------------

    def _on_backend_failure(self, routed: Routed, error: BackendError) -> None:
        """Count the failure on the decision, in metrics and, unless it was the client's fault, in the breaker."""
        self.metrics.requests.labels(error.backend, "error").inc()
        routed.failed(error.backend, error.status, str(error))
        if error.retryable:
            self.pool.record_failure(error.backend, str(error))
        else:
            self.pool.record_success(error.backend)  # it answered: the request was at fault, not the backend
        log.warning("decision %s: %s", routed.info.decision_id, error)

    async def _attempts(self, routed: Routed) -> AsyncIterator[str]:
        """The backends to call, in order, each admitted by its breaker (a pinned one always is).

        The caller must end every attempt it gets with record_success, _on_backend_failure or release.
        """
        for backend in routed.order:
            if routed.pinned or self.pool.acquire(backend):
                yield backend
            else:
                routed.failed(backend, None, "circuit breaker open")

    def _terminal_error(self, routed: Routed, error: BackendError | None) -> Exception:
        if error is not None and not error.retryable:
            return UpstreamClientError(str(error), error.status)
        detail = f"; last error: {error}" if error else ""
        if error is not None and error.status == 504 and len(routed.order) == 1:
            return GatewayTimeout(f"backend {error.backend} timed out{detail}")
        if routed.pinned:
            return BadGateway(f"backend {routed.order[0]} failed{detail}")
        reasons = "; ".join(f"{f['backend']}: {f['reason']}" for f in routed.failures)
        return ServiceUnavailable(f"every candidate backend failed ({reasons})")

    async def _finish(self, routed: Routed, **fields: Any) -> None:
        self.spend.settle(routed.tenant, routed.info.decision_id, fields.get("cost_usd") or 0.0)
        fields["failed_backends"] = list(routed.failures)
        await self.writer.submit(lambda session: finish_decision(session, routed.info.decision_id, **fields))

    def _record_answer(self, routed: Routed, backend: str, completion_tokens: int, cost_usd: float, latency_ms: float) -> None:
        routed.info.backend = backend
        self.core.record_outcome(routed.info.decision_id, backend, cost_usd, completion_tokens)
        self.metrics.requests.labels(backend, "ok").inc()
        self.metrics.cost.labels(backend).inc(cost_usd)
        self.metrics.backend_seconds.labels(backend).observe(latency_ms / 1000)

    async def chat(self, request: ChatCompletionRequest, caller: Principal | None = None) -> tuple[dict[str, Any], RouterInfo]:
        routed = await self.decide(request, "chat", caller)
        body = self.upstream_body(request)
        last_error: BackendError | None = None
        async for backend in self._attempts(routed):
            try:
                result = await self.pool.state(backend).client.chat(body)
            except BackendError as error:
                last_error = error
                self._on_backend_failure(routed, error)
                if error.retryable and not routed.pinned:
                    continue
                break
            except BaseException:
                self.pool.release(backend)
                raise
            self.pool.record_success(backend)
            routed.info.cost_usd = result.cost_usd
            self._record_answer(routed, backend, result.completion_tokens, result.cost_usd, result.latency_ms)
            await self._finish(
                routed, status="ok", backend=backend, prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens, cost_usd=result.cost_usd, latency_ms=result.latency_ms,
            )
            response = result.body
            response["router"] = routed.info.model_dump(mode="json")
            return response, routed.info
        await self._finish(routed, status="error", error=str(last_error))
        raise self._terminal_error(routed, last_error)

    async def chat_stream(self, request: ChatCompletionRequest, caller: Principal | None = None) -> tuple[AsyncIterator[bytes], RouterInfo]:
        """Open the upstream stream (failing over before the first byte), then relay its SSE events.

        The `router` object rides on the first chunk and, with the cost, on the usage chunk at the end.
        A failure before the first event fails over like a failed open; one in mid-stream reaches the client
        as an SSE `error` event, never as a hang.
        """
        routed = await self.decide(request, "chat", caller)
        body = self.upstream_body(request)
        last_error: BackendError | None = None
        async for backend in self._attempts(routed):
            events = None
            try:
                events, usage = await self.pool.state(backend).client.open_stream(body)
                opening = await anext(events)  # an error in the first event still gets an HTTP status and failover
            except BackendError as error:
                last_error = error
                self._on_backend_failure(routed, error)
                if error.retryable and not routed.pinned:
                    continue
                break
            except BaseException:
                if events is not None:
                    await events.aclose()
                self.pool.release(backend)
                raise
            self.pool.record_success(backend)
            routed.info.backend = backend
            return self._relay(routed, backend, _prepend(opening, events), usage), routed.info
        await self._finish(routed, status="error", error=str(last_error))
        raise self._terminal_error(routed, last_error)

    async def _relay(self, routed: Routed, backend: str, events: AsyncIterator[dict[str, Any] | None], usage: Any) -> AsyncIterator[bytes]:
        first = True
        error: str | None = None
        try:
            async with contextlib.aclosing(events) as upstream:  # frees the backend slot if the client leaves
                async for event in upstream:
                    if event is None:
                        yield b"data: [DONE]\n\n"
                        continue
                    if event.get("usage"):
                        routed.info.cost_usd = usage.cost_usd
                    if first or event.get("usage"):
                        event["router"] = routed.info.model_dump(mode="json")
                        first = False
                    yield b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        except BackendError as exc:
            error = str(exc)
            self._on_backend_failure(routed, exc)
            kind = "backend_error" if exc.retryable else "upstream_invalid_request"
            payload = {"error": {"message": error, "type": kind, "code": exc.status if not exc.retryable else 502}}
            yield b"event: error\ndata: " + json.dumps(payload).encode() + b"\n\n"
        finally:
            if usage.completed and error is None:
                self._record_answer(routed, backend, usage.completion_tokens, usage.cost_usd, usage.latency_ms)
                fields = dict(status="ok", prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
                              cost_usd=usage.cost_usd, latency_ms=usage.latency_ms)
            else:
                fields = dict(status="error", error=error or "stream ended early (client gone or backend closed)",
                              cost_usd=usage.cost_usd or None, latency_ms=usage.latency_ms)
            self._spawn(self._finish(routed, backend=backend, **fields))

    # -- feedback ---------------------------------------------------------------------------------

    def _apply(
        self,
        decision: Decision,
        vector: np.ndarray,
        reward: float | None,
        preference: tuple[str, str] | None,
        learners: set[str] | None = None,
        with_router: bool = True,
    ) -> None:
        """Teach the core (all policies, or only `learners`) one logged reward or preference."""
        record = DecisionRecord.from_columns(
            decision.id, decision.policy, decision.backend, decision.propensity, decision.prompt_tokens_estimate,
            {"candidates": decision.candidates, "neighbours": decision.neighbours, "cost_weight": decision.cost_weight,
             "cost_scale": decision.cost_scale, "shadow": decision.shadow},
        )
        if preference is not None:
            self.core.learn_preference(record, vector, *preference, learners=learners)
            return
        cost = decision.cost_usd if decision.cost_usd is not None else (decision.predicted_cost_usd or 0.0)
        self.core.learn(record, vector, reward, cost, decision.latency_ms or 0.0, learners=learners, with_router=with_router)

    async def feedback(self, request: RewardRequest, caller: Principal | None = None) -> RewardResponse:
        """Record a reward or preference durably; every policy learns from it right after the commit.

        Only the key that made the decision may give feedback on it.
        """
        tenant = caller.tenant if caller else None
        pair = None if request.reward is not None else (request.winner, request.loser)
        if pair is not None:
            unknown = [b for b in pair if b not in self.pool]
            if unknown:
                raise BadRequest(f"unknown backends {unknown} in preference; known: {self.pool.names()}")

        def write(session: Any) -> tuple[Decision, np.ndarray | None, int, bool]:
            decision, vector = load_decision(session, request.decision_id)
            if caller is not None and decision.tenant != tenant:
                raise Forbidden(f"decision {decision.id} was made by another key; only that key may give feedback on it")
            if decision.status == "error":
                raise Conflict(f"decision {decision.id} produced no answer ({decision.error}); nothing to reward")
            if pair is not None:
                return (decision, vector, *add_preference(session, decision.id, *pair))
            return (decision, vector, *add_reward(session, decision.id, request.reward))

        def learn(written: tuple[Decision, np.ndarray | None, int, bool]) -> None:
            decision, vector, feedback_id, duplicate = written
            if duplicate:
                return
            if vector is not None:
                try:
                    self._apply(decision, vector, request.reward, pair)
                except PolicyError as exc:  # stored already; a policy that cannot use it must not fail the call
                    log.warning("decision %s: policy could not learn: %s", decision.id, exc)
            rewards, preferences = self._learned
            self._learned = (max(rewards, feedback_id), preferences) if pair is None else (rewards, max(preferences, feedback_id))
            self._since_snapshot += 1

        decision, _, _, duplicate = await self.writer.submit(write, learn)
        kind = "reward" if pair is None else "preference"
        if not duplicate:
            self.metrics.rewards.labels(kind).inc()
            if self._since_snapshot >= self.config.snapshot_every:
                self._since_snapshot = 0
                self._spawn(self.save_snapshot())
        return RewardResponse(decision_id=decision.id, kind=kind, duplicate=duplicate)

    async def save_snapshot(self) -> None:
        """Every policy's and the router's state, marked with the last feedback they include.

        Taken in one step of the event loop, where learning also happens, so it is consistent.
        """
        states = {name: policy.snapshot() for name, policy in self.policies.items()}
        states[ROUTER_STATE] = self.core.snapshot()
        learned = self._learned
        await self.writer.submit(lambda session: write_snapshot(session, states, *learned))

    # -- inspection -------------------------------------------------------------------------------

    async def _predictor_stats(self) -> dict[str, Any] | None:
        if self.predictors is None:
            return None
        return {
            "models": await asyncio.to_thread(self.predictors.describe),
            "next_run": self.training.next_run() if self.training else None,
            "runs": await asyncio.to_thread(recent_runs, self.db),
        }

    async def stats(self) -> dict[str, Any]:
        summary = await asyncio.to_thread(self.store.summary)
        core = self.core.stats()
        policies = {
            name: {**policy.stats(), "decisions": summary["policies"].get(name, {}), "shadow": core["shadow"][name]}
            for name, policy in self.policies.items()
        }
        return {
            "active_policy": self.active_policy,
            "policies": policies,
            "pinned": summary["policies"].get(PINNED, {}),
            "backends": summary["backends"],
            "budget": core["budget"],
            "expected_output_tokens": core["expected_output_tokens"],
            "memory_queries": len(self.memory),
            "tenant_spend": self.spend.describe(),
            "predictors": await self._predictor_stats(),
            "failover": {
                name: {"failures": self.pool.state(name).failures, "breaker": self.pool.state(name).breaker.describe()}
                for name in self.pool.names()
            },
        }
