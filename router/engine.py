"""The routing engine: pure and in memory, the one decide/learn object the service and replay share.

Given a query embedding and the candidate backends it recalls the nearest past decisions, predicts each
backend's cost, applies the caller's spending limit, the per-request cap and pacing, lets the deciding
policy choose while every other policy scores the same context (shadow evaluation), and learns from
feedback. No I/O: the service (`router.service`) wraps it with embedding, the database and backend
calls; the replay (`router.replay`) feeds it recorded outcomes. `build_engine` makes it from a config
for both.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from policies import Arm, Choice, Context, Feedback, Neighbour, Policy, Predictions, importance_weight, registry
from router.budget import BudgetPacer, OutputLengthModel, SpendLimit, predict_cost
from router.config import RouterConfig
from router.memory import Memory, MemoryEntry

log = logging.getLogger("llm_router")

PINNED = "pinned"  # the `policy` of a decision the client pinned to a backend


@dataclass
class DecisionRecord:
    """The engine's decision, and everything needed to learn from it later (stored with it, so also
    after a restart).

    `chosen` is the deciding policy's pick and `propensity` its probability. `backend` is the backend
    whose answer was delivered: the chosen one, another after a failover, or the one an answer-aware
    mode selected (None until an answer came). `shadow` holds every policy's probabilities over the
    candidates (the deciding one's included).
    """

    decision_id: str
    policy: str
    chosen: str
    propensity: float
    prompt_tokens: int
    arms: list[Arm]
    neighbours: list[Neighbour]
    cost_weight: float
    cost_scale: float
    shadow: dict[str, dict[str, float]] = field(default_factory=dict)  # policy -> probabilities
    shadow_choices: dict[str, str] = field(default_factory=dict)  # policy -> backend it would have chosen
    backend: str | None = None
    mode: str = "route"  # route: one call; the answer-aware modes (router.modes) make several
    # known when deciding, not needed to learn (not stored in the learning columns)
    scores: dict[str, float] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)  # other candidates, best score first: where a failed call goes
    max_cost_usd: float | None = None
    over_budget: bool = False  # no candidate fitted the per-request cap; the cheapest was chosen
    worst_case_usd: float = 0.0  # the chosen backend's cost at the full output limit: what a key's budget reserves

    @property
    def answered_by(self) -> str:
        return self.backend or self.chosen

    @property
    def failed_over(self) -> bool:
        return self.backend is not None and self.backend != self.chosen

    @property
    def predicted_cost_usd(self) -> float:
        arm = next((a for a in self.arms if a.name == self.chosen), None)
        return arm.predicted_cost_usd if arm else 0.0

    @property
    def learning_propensity(self) -> float:
        """The logging probability of the backend that answered.

        Without a failover it is the chosen backend's propensity. After one, the answering backend was
        reached by choosing it, or by choosing the backend that failed: the sum of the two logged
        probabilities (exact when it was the failed backend's first fallback, a lower bound otherwise).
        """
        if not self.failed_over:
            return self.propensity
        logged = self.shadow.get(self.policy, {})
        return min(1.0, self.propensity + logged.get(self.answered_by, 0.0))

    def context(self, embedding: np.ndarray) -> Context:
        return Context(embedding, self.prompt_tokens, tuple(self.arms), tuple(self.neighbours), self.cost_weight, self.cost_scale)

    def columns(self) -> dict[str, Any]:
        """The JSON-friendly learning parts, as stored on the decision row."""
        return {
            "candidates": [asdict(a) for a in self.arms],
            "neighbours": [
                [n.decision_id, n.arm, n.similarity, n.reward, list(n.preference) if n.preference else None, n.output_tokens]
                for n in self.neighbours
            ],
            "cost_weight": self.cost_weight,
            "cost_scale": self.cost_scale,
            "shadow": {"probabilities": self.shadow, "choices": self.shadow_choices},
        }

    @classmethod
    def from_columns(
        cls, decision_id: str, policy: str, chosen: str, backend: str | None, propensity: float, prompt_tokens: int, columns: dict[str, Any]
    ) -> DecisionRecord:
        shadow = columns.get("shadow") or {}
        return cls(
            decision_id=decision_id,
            policy=policy,
            chosen=chosen,
            backend=backend,
            propensity=propensity,
            prompt_tokens=prompt_tokens,
            arms=[Arm(**a) for a in columns["candidates"]],
            neighbours=[Neighbour(d, a, s, r, tuple(p) if p else None, o) for d, a, s, r, p, o in columns.get("neighbours") or []],
            cost_weight=columns.get("cost_weight") or 0.0,
            cost_scale=columns.get("cost_scale") or 1.0,
            shadow=shadow.get("probabilities", {}),
            shadow_choices=shadow.get("choices", {}),
        )


@dataclass
class ShadowEstimate:
    """Off-policy value of a policy from logged decisions it did not necessarily make (IPS, SNIPS).

    Decisions answered by a failover backend are left out (`excluded_failover`): the answering
    backend's logging probability is not known exactly, so they would bias the estimate. So are
    decisions of the answer-aware modes (`excluded_multi_call`): what they delivered depended on
    answers, not on the policy's probabilities alone.
    """

    rewards: int = 0
    ips_sum: float = 0.0
    weight_sum: float = 0.0
    matches: int = 0
    excluded_failover: int = 0
    excluded_multi_call: int = 0

    def add(self, reward: float, policy_probability: float, logged_propensity: float, matched: bool) -> None:
        ratio = policy_probability / logged_propensity
        self.rewards += 1
        self.ips_sum += reward * ratio
        self.weight_sum += ratio
        self.matches += int(matched)

    def view(self) -> dict[str, Any]:
        return {
            "rewards": self.rewards,
            "matching_decisions": self.matches,
            "excluded_failover": self.excluded_failover,
            "excluded_multi_call": self.excluded_multi_call,
            "ips": self.ips_sum / self.rewards if self.rewards else None,
            "snips": self.ips_sum / self.weight_sum if self.weight_sum else None,
        }


def add_shadow_reward(estimates: dict[str, ShadowEstimate], record: DecisionRecord, reward: float) -> None:
    """Every policy's off-policy estimate takes one reward of a logged decision: the one rule, for the
    engine's running estimates and for the dashboard's estimates over time (`router.timeline`)."""
    for name, probabilities in record.shadow.items():
        estimate = estimates.get(name)
        if estimate is None:
            continue
        if record.mode != "route":
            estimate.excluded_multi_call += 1
        elif record.failed_over:
            estimate.excluded_failover += 1
        else:
            estimate.add(reward, probabilities.get(record.chosen, 0.0), record.propensity, record.shadow_choices.get(name) == record.chosen)


class RoutingEngine:
    def __init__(
        self,
        policies: dict[str, Policy],
        active: str,
        memory: Memory,
        pacer: BudgetPacer,
        output_lengths: OutputLengthModel,
        neighbours: int = 20,
    ) -> None:
        self.policies = policies
        self.active = active
        self.memory = memory
        self.pacer = pacer
        self.output_lengths = output_lengths
        self.neighbours = neighbours
        self.shadow: dict[str, ShadowEstimate] = {name: ShadowEstimate() for name in policies}
        self.learn_errors: Counter[str] = Counter()  # per policy: feedback it failed to learn from

    def decide(
        self,
        decision_id: str,
        memory_id: int,
        embedding: np.ndarray,
        prompt_tokens: int,
        candidates: list[Arm],
        *,
        policy: str | None = None,
        pinned: str | None = None,
        max_cost_usd: float | None = None,
        output_limit: int | None = None,
        spend_limit: SpendLimit | None = None,
        predictions: Predictions | None = None,
        headroom_usd: float | None = None,
    ) -> DecisionRecord:
        """Choose among `candidates` (backends with their prices; the engine predicts their costs),
        remember the query, and reserve the predicted cost with the pacer.

        `max_cost_usd` is a soft cap (the cheapest backend is used when none fits). `spend_limit` is
        hard: a backend whose worst case (the whole `output_limit` generated) does not fit it is not a
        candidate, and when none fits the limit's 429 is raised before anything is remembered.
        `headroom_usd` replaces the pacer's own headroom (several replicas: the one held in the database).
        """
        neighbours = self.memory.search(embedding, self.neighbours)
        arms = [
            Arm(c.name, c.price_per_1m_input_tokens_usd, c.price_per_1m_output_tokens_usd,
                predict_cost(c.price_per_1m_input_tokens_usd, c.price_per_1m_output_tokens_usd, prompt_tokens,
                             self.output_lengths.expected(c.name, neighbours, output_limit)))
            for c in candidates
        ]
        worst = {a.name: self._worst_case(a, prompt_tokens, output_limit) for a in arms}
        if spend_limit is not None:
            fitting = [a for a in arms if worst[a.name] <= spend_limit.remaining_usd]
            if not fitting:
                raise spend_limit.refuse(min(worst.values()))
            arms = fitting
        affordable = [a for a in arms if max_cost_usd is None or a.predicted_cost_usd <= max_cost_usd]
        over_budget = not affordable
        if over_budget:
            affordable = [min(arms, key=lambda a: a.predicted_cost_usd)]
        headroom = self.pacer.headroom() if headroom_usd is None else headroom_usd
        if headroom is not None and pinned is None:
            paced = [a for a in affordable if a.predicted_cost_usd <= headroom]
            affordable = paced or [min(affordable, key=lambda a: a.predicted_cost_usd)]
        context = Context(
            embedding=embedding,
            prompt_tokens=prompt_tokens,
            arms=tuple(affordable),
            neighbours=neighbours,
            cost_weight=self.pacer.lam,
            cost_scale=self.pacer.cost_scale([a.predicted_cost_usd for a in affordable]),
            predictions=self._priced(predictions, arms, prompt_tokens) if predictions else Predictions(),
            max_cost_usd=max_cost_usd,
        )
        deciding = policy or self.active
        shadow: dict[str, Choice] = {}
        if pinned is not None:
            choice = Choice(pinned, {pinned: 1.0}, {})
            deciding = PINNED
        else:
            choice = self.policies[deciding].choose(context)
            shadow = {name: (choice if name == deciding else p.score(context)) for name, p in self.policies.items()}
        others = [a.name for a in context.arms if a.name != choice.arm]
        record = DecisionRecord(
            decision_id=decision_id,
            policy=deciding,
            chosen=choice.arm,
            propensity=choice.propensity,
            prompt_tokens=prompt_tokens,
            arms=list(context.arms),
            neighbours=list(neighbours),
            cost_weight=context.cost_weight,
            cost_scale=context.cost_scale,
            shadow={name: c.probabilities for name, c in shadow.items()},
            shadow_choices={name: c.arm for name, c in shadow.items()},
            scores=choice.scores,
            fallbacks=sorted(others, key=lambda a: -choice.scores.get(a, 0.0)),
            max_cost_usd=max_cost_usd,
            over_budget=over_budget,
            worst_case_usd=worst.get(choice.arm, 0.0),
        )
        self.memory.add(np.array([memory_id], dtype=np.int64), embedding.reshape(1, -1), [MemoryEntry(decision_id, choice.arm)])
        self.pacer.reserve(decision_id, record.predicted_cost_usd)
        return record

    @staticmethod
    def _worst_case(arm: Arm, prompt_tokens: int, output_limit: int | None) -> float:
        if output_limit is None:
            return arm.predicted_cost_usd
        return predict_cost(arm.price_per_1m_input_tokens_usd, arm.price_per_1m_output_tokens_usd, prompt_tokens, output_limit)

    @staticmethod
    def _priced(predictions: Predictions, arms: list[Arm], prompt_tokens: int) -> Predictions:
        """FORC's lengths turned into costs with each backend's prices (the router's estimate where it has none)."""
        if predictions.output_tokens is None:
            return predictions
        costs = {}
        for arm in arms:
            tokens = predictions.output_tokens.get(arm.name)
            costs[arm.name] = (
                arm.predicted_cost_usd if tokens is None
                else predict_cost(arm.price_per_1m_input_tokens_usd, arm.price_per_1m_output_tokens_usd, prompt_tokens, tokens)
            )
        return replace(predictions, cost_usd=costs)

    def forget(self, decision_id: str) -> None:
        """A decision that was never logged: out of the memory and the pacer's reservations."""
        self.memory.remove(decision_id)
        self.pacer.release(decision_id)

    def record_outcome(self, decision_id: str, backend: str, cost_usd: float, output_tokens: float | None) -> None:
        """An answer was produced (possibly by a failover backend): spend, answer length, memory."""
        self.pacer.observe(cost_usd, decision_id)
        if output_tokens is not None:
            self.output_lengths.observe(backend, output_tokens)
        entry = self.memory.entry(decision_id)
        if entry is not None:
            entry.backend = backend
            entry.output_tokens = output_tokens

    def observe_answer_length(self, backend: str, output_tokens: float) -> None:
        """An answer that was not delivered (another call of a multi-call decision) still tells its length."""
        self.output_lengths.observe(backend, output_tokens)

    def quality_estimates(self, policy: str) -> dict[str, float]:
        """Mean reward per backend as `policy` has learned it (what the cascade orders backends by)."""
        chosen = self.policies.get(policy) or self.policies[self.active]
        return {backend: mean for backend, arm in chosen.stats()["arms"].items() if (mean := arm["mean_reward"]) is not None}

    def record_failure(self, decision_id: str) -> None:
        """No backend answered: nothing spent."""
        self.pacer.release(decision_id)

    def _each_policy(self, learners: set[str] | None, teach: Any) -> None:
        """Run `teach(name, policy)` for every policy (or only `learners`); one that raises is logged and
        counted, and the others still learn."""
        for name, policy in self.policies.items():
            if learners is not None and name not in learners:
                continue
            try:
                teach(name, policy)
            except Exception:
                self.learn_errors[name] += 1
                log.exception("policy %s could not learn", name)

    def learn(
        self,
        record: DecisionRecord,
        embedding: np.ndarray,
        reward: float,
        cost_usd: float = 0.0,
        latency_ms: float = 0.0,
        learners: set[str] | None = None,
        with_router: bool = True,
    ) -> None:
        """Every policy (or only `learners`) learns about the backend that answered: the one that
        decided at full weight, the others importance-weighted. `with_router` also updates the shadow
        estimates and the memory."""
        context = record.context(embedding)
        backend, propensity = record.answered_by, record.learning_propensity

        def teach(name: str, policy: Policy) -> None:
            weight = 1.0 if name == record.policy else importance_weight(propensity, len(record.arms))
            policy.learn(Feedback(context, backend, reward, propensity, cost_usd, latency_ms, weight))

        self._each_policy(learners, teach)
        if not with_router:
            return
        add_shadow_reward(self.shadow, record, reward)
        entry = self.memory.entry(record.decision_id)
        if entry is not None:
            entry.reward = reward

    def learn_preference(
        self, record: DecisionRecord, embedding: np.ndarray, winner: str, loser: str, learners: set[str] | None = None
    ) -> None:
        context = record.context(embedding)
        self._each_policy(learners, lambda _, policy: policy.learn_preference(context, winner, loser))
        entry = self.memory.entry(record.decision_id)
        if entry is not None:
            entry.preference = (winner, loser)

    def snapshot(self) -> dict[str, Any]:
        """Router-level state (policies snapshot themselves): pacing, answer lengths, shadow estimates."""
        return {
            "pacer": self.pacer.snapshot(),
            "output_lengths": self.output_lengths.snapshot(),
            "shadow": {name: asdict(estimate) for name, estimate in self.shadow.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.pacer.restore(state["pacer"])
        self.output_lengths.restore(state["output_lengths"])
        for name, estimate in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name] = ShadowEstimate(**estimate)

    def stats(self) -> dict[str, Any]:
        return {
            "active_policy": self.active,
            "budget": self.pacer.stats(),
            "expected_output_tokens": self.output_lengths.stats(),
            "shadow": {name: estimate.view() for name, estimate in self.shadow.items()},
            "learn_errors": {name: self.learn_errors[name] for name in self.policies},
        }


def build_engine(
    config: RouterConfig,
    dim: int,
    *,
    policies: list[str] | None = None,
    active: str | None = None,
    seed: int | None = None,
) -> RoutingEngine:
    """The engine a config describes, for `serve` and `replay` alike: its policies with their options,
    the budget (targets, lambda, pacing step, carry-over) and the number of neighbours recalled.

    `policies` replaces the config's policy set (replay runs one policy, or one with the config's
    shadows); `active` defaults to the config's default policy when it runs, else the first one.
    """
    names = policies or config.policy_names
    chosen_seed = config.seed if seed is None else seed
    budget = config.budget
    return RoutingEngine(
        policies={name: registry.create(name, seed=chosen_seed, **config.policy_options.get(name, {})) for name in names},
        active=active or (config.default_policy if config.default_policy in names else names[0]),
        memory=Memory(dim, config.memory),
        pacer=BudgetPacer(
            target_usd_per_query=budget.target_usd_per_query or None,
            target_usd_per_hour=budget.target_usd_per_hour or None,
            cost_weight=budget.cost_weight,
            step=budget.pacing_step,
            max_carryover_hours=budget.max_carryover_hours,
        ),
        output_lengths=OutputLengthModel(default_tokens=budget.default_output_tokens),
        neighbours=config.embedder.neighbours,
    )
