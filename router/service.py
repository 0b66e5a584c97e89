"""The routing service: async orchestration around the engine.

It embeds the query, asks the engine to decide, reserves the caller's spend, logs the decision, calls
the backends with failover, records the outcome, learns from feedback, and owns the lifecycle (restart
recovery, health checks, snapshots, the predictor schedule). It takes plain requests and hands back
plain results and stream events: HTTP, SSE framing and the response's `router` object belong to
`router.api`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import numpy as np

from backends.breaker import BreakerSettings
from backends.client import BackendError, BackendSpec, StreamUsage
from backends.pool import BackendPool, BackendState, FailoverExhausted, Failure
from policies import PREDICTED_POLICIES, Arm, Policy, Predictions
from router.budget import SpendLedger, period_start
from router.config import BackendConfig, RouterConfig
from router.db import create_db_engine, migrate
from router.embedding import Embedder, TextBatcher
from router.engine import PINNED, DecisionRecord, build_engine
from router.errors import BadGateway, BadRequest, Conflict, Forbidden, GatewayTimeout, NotFound, ServiceUnavailable, UpstreamClientError
from router.memory import Memory
from router.metrics import RouterMetrics
from router.modes import ROUTE, Call, Plan, agreement, answer_text
from router.modes import plan as plan_calls
from router.modes import run as run_mode
from router.predicting import PredictorSet
from router.store import (
    Finish,
    GroupWriter,
    NewDecision,
    Store,
    StoredDecision,
    add_decision,
    add_preference,
    add_reward,
    finish_decision,
    load_decision,
    purge_answers,
    write_snapshot,
)
from router.training import TrainingScheduler, recent_runs

log = logging.getLogger("llm_router")

ROUTER_STATE = "_router"  # snapshot row of the router-level state (pacing, answer lengths, shadow estimates)
T = TypeVar("T")
FEEDBACK_WAIT_S = 60.0  # how long feedback on a decision still being answered waits for its final write
ANSWER_PURGE_EVERY_S = 3600.0


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


@dataclass(frozen=True)
class RoutingRequest:
    """What the service needs of a chat request (the API builds it from the OpenAI body)."""

    query: str  # what is embedded: the question being asked
    prompt: str  # every message's text: prices the prompt
    model: str  # "auto" routes; a backend name pins that backend
    output_limit: int  # the most tokens the answer may have (the client's limit, else the router's cap)
    body: dict[str, Any]  # what a backend is sent
    policy: str | None = None
    max_cost_usd: float | None = None
    mode: str | None = None  # None: the config's default mode




@dataclass
class Routed:
    """A decision in the service: the engine's record, who asked, and what happened to its calls."""

    record: DecisionRecord
    kind: str  # chat | route
    tenant: str | None
    pinned: bool
    plan: Plan
    failures: list[Failure] = field(default_factory=list)  # each failed or skipped backend, with its reason
    cost_usd: float | None = None  # the answer's real cost (every call's), once known
    calls: list[Call] = field(default_factory=list)  # an answer-aware mode's calls

    @property
    def decision_id(self) -> str:
        return self.record.decision_id

    @property
    def order(self) -> list[str]:
        """Where the call goes: the choice, then the fallbacks (a pinned call has no fallback)."""
        return [self.record.chosen] if self.pinned else [self.record.chosen, *self.record.fallbacks]


@dataclass(frozen=True)
class StreamError:
    """A stream failed after its first event: the API ends it with an SSE error event."""

    message: str
    retryable: bool
    status: int


StreamEvent = dict[str, Any] | StreamError | None  # a chunk, a mid-stream error, or None for the end marker


@dataclass(frozen=True)
class FeedbackResult:
    decision_id: str
    kind: str  # reward | preference
    duplicate: bool


class RouterService:
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
        self.engine = build_engine(config, self.embedder.dim)
        self._embed_batcher = TextBatcher(self.embedder.embed)  # concurrent requests share one encode
        self._background: set[asyncio.Task[Any]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._learned = (0, 0)  # highest (reward id, preference id) whose learning is in the policies
        self._since_snapshot = 0
        self._answering: dict[str, asyncio.Future[None]] = {}  # chat decisions whose final write is pending
        self.spend = SpendLedger(config.auth.keys)
        self.predictors = PredictorSet(config.predictors.artifacts_dir, [b.name for b in config.backends])
        self.predictors.reload()
        # Only when a predictor policy runs: it costs an encoder pass per query.
        self._predicting = bool(set(PREDICTED_POLICIES) & set(config.policy_names))
        self._predict_batcher = TextBatcher(self.predictors.predict, name="predict") if self._predicting else None
        self.training: TrainingScheduler | None = None
        self._load_memory()
        self._restore_state()
        self._load_spend()

    @property
    def policies(self) -> dict[str, Policy]:
        return self.engine.policies

    @property
    def memory(self) -> Memory:
        return self.engine.memory

    @property
    def active_policy(self) -> str:
        return self.engine.active

    def set_active_policy(self, name: str) -> None:
        if name not in self.engine.policies:
            raise BadRequest(f"unknown policy {name!r}; this router runs {sorted(self.engine.policies)}")
        self.engine.active = name

    # -- start-up -------------------------------------------------------------------------------

    def _load_memory(self) -> None:
        for ids, vectors, entries in self.store.memory_rows(self.embedder.name):
            self.memory.add(ids, vectors, entries)
        self.metrics.memory_size.set(len(self.memory))

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
            self.engine.restore(router_row.state)
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
        if self._predicting or self.config.answers.store:  # predictor policies, or answers to train the scorer on
            self.training = TrainingScheduler(self.config, self._trained)
            self.training.start()

    async def train(self, trigger: str = "api") -> list[dict[str, Any]]:
        """One predictor training run now (in the worker process), then the hot swap."""
        if self.training is None:
            raise BadRequest(
                f"no predictor policy ({', '.join(PREDICTED_POLICIES)}) runs and answers are not stored (answers.store); nothing to train"
            )
        return await self.training.run(trigger)

    async def _trained(self, runs: list[dict[str, Any]]) -> None:
        if any(run["promoted"] for run in runs):
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
        purged = 0.0
        while True:
            await asyncio.sleep(self.config.health.interval_s)
            try:
                await self.check_backends()
                if self.config.answers.store and time.monotonic() - purged > ANSWER_PURGE_EVERY_S:
                    purged = time.monotonic()
                    await self.purge_answers()
            except Exception:  # a failed round must not stop later ones
                log.exception("backend health check failed")

    async def purge_answers(self) -> int:
        """Erase stored answers older than the retention period (runs hourly while answers are stored)."""
        before = datetime.now(UTC) - timedelta(days=self.config.answers.retention_days)
        return await self.writer.submit(lambda session: purge_answers(session, before))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- deciding ---------------------------------------------------------------------------------

    async def embed(self, text: str) -> np.ndarray:
        return await self._embed_batcher.one(text)

    async def _predict(self, query: str) -> Predictions | None:
        if self._predict_batcher is None or not self.predictors.ready:
            return None
        return await self._predict_batcher.one(query)

    async def decide(self, request: RoutingRequest, kind: str, tenant: str | None) -> Routed:
        """Decide and log. The caller's spending limit is read and the worst case reserved in one step
        of the event loop (after the embedding await), so concurrent requests cannot overshoot it."""
        started = time.perf_counter()
        policy_name = request.policy or self.active_policy
        if policy_name not in self.policies:
            raise BadRequest(f"unknown policy {policy_name!r}; this router runs {sorted(self.policies)}")
        pinned = request.model if request.model != "auto" else None
        if pinned is not None and pinned not in self.pool:
            raise NotFound(f"unknown backend {pinned!r}; use \"auto\" or one of {self.pool.names()}")
        names = [pinned] if pinned else [s.spec.name for s in self.pool.eligible(estimate_tokens(request.prompt))]
        if not names:
            raise ServiceUnavailable("no backend available: every backend's circuit breaker is open after failures")

        vector, predictions = await asyncio.gather(self.embed(request.query), self._predict(request.query))
        cap = request.max_cost_usd if request.max_cost_usd is not None else (self.config.budget.default_max_cost_usd or None)
        candidates = [
            Arm(n, self.pool.state(n).spec.price_per_1m_input_tokens_usd, self.pool.state(n).spec.price_per_1m_output_tokens_usd)
            for n in names
        ]
        decision_id = "dec_" + uuid.uuid4().hex
        memory_id = uuid.uuid4().int >> 65  # 63 bits: a positive int64 id for FAISS
        limit = self.spend.limit(tenant)
        record = self.engine.decide(
            decision_id, memory_id, vector, estimate_tokens(request.prompt), candidates, policy=policy_name, pinned=pinned,
            max_cost_usd=cap, output_limit=request.output_limit, spend_limit=limit, predictions=predictions,
        )
        plan = self._plan(request, record, kind, cap, pinned is not None)
        if limit is not None and plan.worst_case_usd > limit.remaining_usd:  # every call must fit: fall back to one
            plan = self._plan(request, record, "route", cap, True)
        record.mode = plan.mode
        self.spend.reserve(tenant, decision_id, plan.worst_case_usd)
        self.engine.pacer.reserve(decision_id, plan.predicted_usd)
        routed = Routed(record, kind, tenant, pinned is not None, plan)
        new = NewDecision(record, kind, tenant, request.model, request.query, (time.perf_counter() - started) * 1000, memory_id,
                          self.embedder.name, vector)
        if kind == "chat":
            self._answering[decision_id] = asyncio.get_running_loop().create_future()
        try:
            await self.writer.submit(lambda session: add_decision(session, new))
        except BaseException:  # not logged, so not remembered either (and not counted against the tenant)
            self.engine.forget(decision_id)
            self.spend.settle(tenant, decision_id, 0.0)
            self._answered(decision_id)
            raise
        if kind == "route":  # the client calls the backend itself: the predicted cost is what it spends
            self.spend.settle(tenant, decision_id, record.predicted_cost_usd)
            self.engine.record_outcome(decision_id, record.chosen, record.predicted_cost_usd, None)
        self.metrics.memory_size.set(len(self.memory))
        self.metrics.decisions.labels(record.policy, record.chosen, kind).inc()
        self.metrics.decision_seconds.observe(time.perf_counter() - started)
        return routed

    def _plan(self, request: RoutingRequest, record: DecisionRecord, kind: str, cap: float | None, pinned: bool) -> Plan:
        """The calls the request's mode will make (`/v1/route` decides one backend: always `route`)."""
        mode = (request.mode or self.config.modes.default) if kind == "chat" else ROUTE
        quality = self.engine.quality_estimates(record.policy) if mode == "cascade" else {}
        return plan_calls(mode, record, self.config.modes, quality, request.output_limit, cap, pinned)

    async def route(self, request: RoutingRequest, tenant: str | None = None) -> Routed:
        return await self.decide(request, "route", tenant)

    # -- generating -------------------------------------------------------------------------------

    def _on_backend_error(self, routed: Routed, error: BackendError) -> None:
        self.metrics.requests.labels(error.backend, "error").inc()
        log.warning("decision %s: %s", routed.decision_id, error)

    def _terminal_error(self, routed: Routed, exhausted: FailoverExhausted) -> Exception:
        error = exhausted.last_error
        if error is not None and not error.retryable:
            return UpstreamClientError(str(error), error.status)
        detail = f"; last error: {error}" if error else ""
        if error is not None and error.status == 504 and len(routed.order) == 1:
            return GatewayTimeout(f"backend {error.backend} timed out{detail}")
        if routed.pinned:
            return BadGateway(f"backend {routed.order[0]} failed{detail}")
        reasons = "; ".join(f"{f.backend}: {f.reason}" for f in routed.failures)
        return ServiceUnavailable(f"every candidate backend failed ({reasons})")

    def _answered(self, decision_id: str) -> None:
        """The decision's final write is done (or will never come): feedback on it may proceed."""
        waiting = self._answering.pop(decision_id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def _finish(self, routed: Routed, finish: Finish) -> None:
        """The final write of a chat decision; the tenant's reservation becomes the real cost."""
        try:
            self.spend.settle(routed.tenant, routed.decision_id, finish.cost_usd or 0.0)
            await self.writer.submit(lambda session: finish_decision(session, routed.decision_id, finish))
        finally:
            self._answered(routed.decision_id)

    def _record_answer(self, routed: Routed, backend: str, completion_tokens: int, cost_usd: float, latency_ms: float) -> None:
        routed.record.backend = backend
        routed.cost_usd = cost_usd
        self.engine.record_outcome(routed.decision_id, backend, cost_usd, completion_tokens)
        if routed.plan.mode == ROUTE:  # a mode counts each of its calls as it makes them
            self.metrics.requests.labels(backend, "ok").inc()
            self.metrics.cost.labels(backend).inc(cost_usd)
        self.metrics.backend_seconds.labels(backend).observe(latency_ms / 1000)

    def _failures(self, routed: Routed) -> list[dict[str, Any]]:
        return [{"backend": f.backend, "status": f.status, "reason": f.reason} for f in routed.failures]

    async def _fail(self, routed: Routed, exhausted: FailoverExhausted) -> Exception:
        self.engine.record_failure(routed.decision_id)
        await self._finish(routed, Finish("error", self._failures(routed), error=str(exhausted.last_error)))
        return self._terminal_error(routed, exhausted)

    async def _call(self, routed: Routed, call: Callable[[BackendState], Awaitable[T]]) -> tuple[str, T]:
        """`call` the decision's backends with failover; a decision that gets no answer is finished as an error."""
        try:
            return await self.pool.call_with_failover(
                routed.order, call, pinned=routed.pinned, failures=routed.failures,
                on_error=lambda error: self._on_backend_error(routed, error),
            )
        except FailoverExhausted as exhausted:
            raise await self._fail(routed, exhausted) from None
        except BaseException:
            self.engine.record_failure(routed.decision_id)
            self._spawn(self._finish(routed, Finish("error", self._failures(routed), error="request cancelled")))
            raise

    async def chat(self, request: RoutingRequest, tenant: str | None = None) -> tuple[dict[str, Any], Routed]:
        """A routed completion: the backend's response body (as it sent it) and the decision."""
        routed = await self.decide(request, "chat", tenant)
        if routed.plan.mode != ROUTE:
            return await self._answer_with_mode(routed, request), routed
        backend, result = await self._call(routed, lambda state: state.client.chat(request.body))
        self._record_answer(routed, backend, result.completion_tokens, result.cost_usd, result.latency_ms)
        await self._finish(routed, Finish(
            "ok", self._failures(routed), backend=backend, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens, cost_usd=result.cost_usd, latency_ms=result.latency_ms,
            answer=self._kept(answer_text(result.body)),
        ))
        return result.body, routed

    def _kept(self, answer: str | None) -> str | None:
        """Answer texts are stored only when configured (privacy)."""
        return answer if self.config.answers.store else None

    async def _call_for_mode(self, routed: Routed, backend: str, role: str, body: dict[str, Any]) -> Call:
        """One call of a mode, failing over to candidates the plan does not already ask at this step."""
        planned = {*routed.plan.first, *routed.plan.second}
        order = [backend] if routed.pinned else [backend, *[b for b in routed.order if b not in planned]]
        call = Call(0, role, backend)
        started = time.perf_counter()
        try:
            answered_by, result = await self.pool.call_with_failover(
                order, lambda state: state.client.chat(body), pinned=routed.pinned, failures=routed.failures,
                on_error=lambda error: self._on_backend_error(routed, error),
            )
        except FailoverExhausted as exhausted:
            call.status, call.error = "error", str(exhausted.last_error or exhausted)
            call.latency_ms = (time.perf_counter() - started) * 1000
            return call
        call.backend, call.body, call.answer = answered_by, result.body, answer_text(result.body)
        call.prompt_tokens, call.completion_tokens = result.prompt_tokens, result.completion_tokens
        call.cost_usd, call.latency_ms = result.cost_usd, result.latency_ms
        self.metrics.requests.labels(answered_by, "ok").inc()
        self.metrics.cost.labels(answered_by).inc(result.cost_usd)
        return call

    async def _score_answers(self, query: str, answers: list[str]) -> tuple[list[float], str]:
        """The answer scorer's scores when one is trained, else agreement among the answers."""
        scores = await asyncio.to_thread(self.predictors.score, query, answers)
        if scores is not None:
            return list(scores), "scorer"
        vectors = await asyncio.to_thread(self.embedder.embed, answers) if len(answers) > 1 else None
        return agreement(answers, vectors), "agreement"

    def _cascade_bar(self, record: DecisionRecord, next_backend: str) -> float | None:
        """Stop before `next_backend` when an answer scores this much: the configured threshold, lowered by
        lambda times that call's predicted cost in reward units. None: no scorer, no absolute score."""
        if self.predictors.scorer is None:
            return None
        arm = next((a for a in record.arms if a.name == next_backend), None)
        penalty = record.cost_weight * (arm.predicted_cost_usd if arm else 0.0) / record.cost_scale if record.cost_scale else 0.0
        bar = self.config.modes.cascade_threshold
        return bar - min(bar, penalty)

    async def _answer_with_mode(self, routed: Routed, request: RoutingRequest) -> dict[str, Any]:
        """Run an answer-aware mode: every call logged under the decision, the delivered answer's body back."""
        started = time.perf_counter()
        try:
            result = await run_mode(
                routed.plan, request.query, request.body,
                lambda backend, role, body: self._call_for_mode(routed, backend, role, body),
                self._score_answers, lambda backend: self._cascade_bar(routed.record, backend),
            )
        except BaseException:
            self.engine.record_failure(routed.decision_id)
            self._spawn(self._finish(routed, Finish("error", self._failures(routed), error="request cancelled")))
            raise
        routed.calls = result.calls
        answered = [c for c in result.calls if c.status == "ok"]
        routed.cost_usd = sum(c.cost_usd or 0.0 for c in answered)
        latency_ms = (time.perf_counter() - started) * 1000
        calls = tuple(replace_answer(c, self._kept(c.answer)) for c in result.calls)
        delivered = result.delivered
        if delivered is None or delivered.body is None:
            exhausted = FailoverExhausted(None, routed.failures)
            self.engine.record_failure(routed.decision_id)
            await self._finish(routed, Finish("error", self._failures(routed), error="no call of the mode answered",
                                              cost_usd=routed.cost_usd or None, latency_ms=latency_ms, calls=calls))
            raise self._terminal_error(routed, exhausted)
        for call in answered:
            if call is not delivered and call.completion_tokens is not None:
                self.engine.observe_answer_length(call.backend, call.completion_tokens)
        self._record_answer(routed, delivered.backend, delivered.completion_tokens or 0, routed.cost_usd, latency_ms)
        await self._finish(routed, Finish(
            "ok", self._failures(routed), backend=delivered.backend, prompt_tokens=delivered.prompt_tokens,
            completion_tokens=delivered.completion_tokens, cost_usd=routed.cost_usd, latency_ms=latency_ms,
            answer=self._kept(delivered.answer), calls=calls,
        ))
        body = dict(delivered.body)
        body["usage"] = _summed_usage(answered)
        return body

    async def chat_stream(self, request: RoutingRequest, tenant: str | None = None) -> tuple[AsyncIterator[StreamEvent], Routed]:
        """Open the upstream stream (failing over before the first event), then relay its events.

        A failure before the first event fails over like a failed open; one in mid-stream ends the
        relay with a `StreamError`, never a hang.
        """
        routed = await self.decide(request, "chat", tenant)
        if routed.plan.mode != ROUTE:  # a mode must see whole answers: the delivered one streams once chosen
            return _as_stream(await self._answer_with_mode(routed, request)), routed

        async def open_stream(state: BackendState) -> tuple[AsyncIterator[dict[str, Any] | None], StreamUsage, dict[str, Any] | None]:
            events, usage = await state.client.open_stream(request.body)
            try:
                first = await anext(events)  # an error in the first event still gets an HTTP status and failover
            except BaseException:
                await events.aclose()
                raise
            return events, usage, first

        backend, (events, usage, first) = await self._call(routed, open_stream)
        routed.record.backend = backend
        return self._relay(routed, backend, first, events, usage), routed

    async def _relay(
        self, routed: Routed, backend: str, first: dict[str, Any] | None, events: AsyncIterator[dict[str, Any] | None], usage: StreamUsage
    ) -> AsyncIterator[StreamEvent]:
        error: BackendError | None = None
        try:
            yield first
            async with contextlib.aclosing(events) as upstream:  # frees the backend slot if the client leaves
                async for event in upstream:
                    if event is not None and event.get("usage"):
                        routed.cost_usd = usage.cost_usd
                    yield event
        except BackendError as exc:
            error = exc
            routed.failures.append(Failure(backend, exc.status, str(exc)))
            self.pool.record_error(exc)
            self._on_backend_error(routed, exc)
            yield StreamError(str(exc), exc.retryable, exc.status)
        finally:
            if usage.completed and error is None:
                self._record_answer(routed, backend, usage.completion_tokens, usage.cost_usd, usage.latency_ms)
                finish = Finish("ok", self._failures(routed), backend=backend, prompt_tokens=usage.prompt_tokens,
                                completion_tokens=usage.completion_tokens, cost_usd=usage.cost_usd, latency_ms=usage.latency_ms)
            else:
                self.engine.record_failure(routed.decision_id)
                finish = Finish("error", self._failures(routed), backend=backend,
                                error=str(error) if error else "stream ended early (client gone or backend closed)",
                                cost_usd=usage.cost_usd or None, latency_ms=usage.latency_ms)
            self._spawn(self._finish(routed, finish))

    # -- feedback ---------------------------------------------------------------------------------

    def _apply(
        self,
        decision: StoredDecision,
        vector: np.ndarray,
        reward: float | None,
        preference: tuple[str, str] | None,
        learners: set[str] | None = None,
        with_router: bool = True,
    ) -> None:
        """Teach the engine (all policies, or only `learners`) one logged reward or preference."""
        if preference is not None:
            self.engine.learn_preference(decision.record, vector, *preference, learners=learners)
            return
        assert reward is not None
        self.engine.learn(decision.record, vector, reward, decision.cost_for_learning, decision.latency_ms or 0.0,
                          learners=learners, with_router=with_router)

    async def _wait_until_answered(self, decision_id: str) -> None:
        """Feedback on a decision still being answered (a stream in progress) waits for its final write,
        so learning always sees the backend that answered and the real cost."""
        waiting = self._answering.get(decision_id)
        if waiting is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(waiting), FEEDBACK_WAIT_S)
        except TimeoutError:
            raise Conflict(f"decision {decision_id} is still being answered; post feedback once the answer is complete") from None

    async def feedback(
        self, decision_id: str, tenant: str | None, reward: float | None = None, preference: tuple[str, str] | None = None
    ) -> FeedbackResult:
        """Record a reward or a preference durably; every policy learns from it right after the commit.

        Only the key that made the decision may give feedback on it.
        """
        if preference is not None:
            unknown = [b for b in preference if b not in self.pool]
            if unknown:
                raise BadRequest(f"unknown backends {unknown} in preference; known: {self.pool.names()}")
        await self._wait_until_answered(decision_id)

        def write(session: Any) -> tuple[StoredDecision, np.ndarray | None, int, bool]:
            decision, vector = load_decision(session, decision_id)
            if decision.tenant != tenant:
                raise Forbidden(f"decision {decision_id} was made by another key; only that key may give feedback on it")
            if decision.status == "error":
                raise Conflict(f"decision {decision_id} produced no answer ({decision.error}); nothing to reward")
            if preference is not None:
                return (decision, vector, *add_preference(session, decision_id, *preference))
            assert reward is not None
            return (decision, vector, *add_reward(session, decision_id, reward))

        def learn(written: tuple[StoredDecision, np.ndarray | None, int, bool]) -> None:
            decision, vector, feedback_id, duplicate = written
            if duplicate:
                return
            if vector is not None:
                self._apply(decision, vector, reward, preference)
            rewards, preferences = self._learned
            self._learned = (max(rewards, feedback_id), preferences) if preference is None else (rewards, max(preferences, feedback_id))
            self._since_snapshot += 1

        _, _, _, duplicate = await self.writer.submit(write, learn)
        kind = "reward" if preference is None else "preference"
        if not duplicate:
            self.metrics.rewards.labels(kind).inc()
            if self._since_snapshot >= self.config.snapshot_every:
                self._since_snapshot = 0
                self._spawn(self.save_snapshot())
        return FeedbackResult(decision_id, kind, duplicate)

    async def save_snapshot(self) -> None:
        """Every policy's and the router's state, marked with the last feedback they include.

        Taken in one step of the event loop, where learning also happens, so it is consistent.
        """
        states = {name: policy.snapshot() for name, policy in self.policies.items()}
        states[ROUTER_STATE] = self.engine.snapshot()
        learned = self._learned
        await self.writer.submit(lambda session: write_snapshot(session, states, *learned))

    # -- inspection -------------------------------------------------------------------------------

    async def _predictor_stats(self) -> dict[str, Any] | None:
        if self.training is None:
            return None
        return {
            "models": await asyncio.to_thread(self.predictors.describe),
            "next_run": self.training.next_run() if self.training else None,
            "runs": await asyncio.to_thread(recent_runs, self.db),
        }

    async def stats(self) -> dict[str, Any]:
        summary = await asyncio.to_thread(self.store.summary)
        engine = self.engine.stats()
        policies = {
            name: {**policy.stats(), "decisions": summary["policies"].get(name, {}), "shadow": engine["shadow"][name],
                   "learn_errors": engine["learn_errors"][name]}
            for name, policy in self.policies.items()
        }
        return {
            "active_policy": self.active_policy,
            "policies": policies,
            "pinned": summary["policies"].get(PINNED, {}),
            "backends": summary["backends"],
            "budget": engine["budget"],
            "expected_output_tokens": engine["expected_output_tokens"],
            "memory_queries": len(self.memory),
            "tenant_spend": self.spend.describe(),
            "predictors": await self._predictor_stats(),
            "failover": {
                name: {"failures": self.pool.state(name).failures, "breaker": self.pool.state(name).breaker.describe()}
                for name in self.pool.names()
            },
        }


def replace_answer(call: Call, answer: str | None) -> Call:
    """The call as logged: its answer text only when kept, and never the response body."""
    return dataclasses.replace(call, answer=answer, body=None)


def _summed_usage(calls: list[Call]) -> dict[str, int]:
    """Usage of a multi-call answer: every call's tokens (what was paid for)."""
    prompt = sum(c.prompt_tokens or 0 for c in calls)
    completion = sum(c.completion_tokens or 0 for c in calls)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _as_stream(body: dict[str, Any]) -> AsyncIterator[StreamEvent]:
    """A whole answer as chat-completion chunks: the content, the finish reason, the usage, the end."""
    choice = (body.get("choices") or [{}])[0]
    base = {"id": body.get("id", ""), "object": "chat.completion.chunk", "created": body.get("created", int(time.time())),
            "model": body.get("model", "")}
    content = (choice.get("message") or {}).get("content") or ""
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}]}
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason") or "stop"}]}
    yield {**base, "choices": [], "usage": body.get("usage")}
    yield None
