"""The decision path shared by the service and the offline replay: recall, predict cost, decide, learn.

Pure and in memory (no I/O): given a query embedding and the candidate backends it recalls the nearest
past decisions, predicts each backend's cost, applies the per-request cap, lets the active policy choose
while every other policy scores the same context (shadow evaluation), and learns from feedback. The
service wraps it with embedding, the database and backend calls; the replay feeds it recorded outcomes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from policies import Arm, Choice, Context, Feedback, Neighbour, Policy, Predictions, importance_weight
from router.budget import BudgetPacer, OutputLengthModel, predict_cost
from router.memory import Memory, MemoryEntry

PINNED = "pinned"


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    price_per_1m_input_tokens_usd: float
    price_per_1m_output_tokens_usd: float


@dataclass
class DecisionRecord:
    """Everything needed to learn from a decision later, also after a restart (stored with it)."""

    decision_id: str
    policy: str
    arm: str
    propensity: float
    prompt_tokens: int
    arms: list[Arm]
    neighbours: list[Neighbour]
    cost_weight: float
    cost_scale: float
    shadow: dict[str, dict[str, float]] = field(default_factory=dict)  # policy -> probabilities
    shadow_choices: dict[str, str] = field(default_factory=dict)  # policy -> arm it would have chosen

    def context(self, embedding: np.ndarray) -> Context:
        return Context(embedding, self.prompt_tokens, tuple(self.arms), tuple(self.neighbours), self.cost_weight, self.cost_scale)

    def columns(self) -> dict[str, Any]:
        """The JSON-friendly parts, as stored on the decision row."""
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
    def from_columns(cls, decision_id: str, policy: str, arm: str, propensity: float, prompt_tokens: int, columns: dict[str, Any]) -> DecisionRecord:
        shadow = columns.get("shadow") or {}
        return cls(
            decision_id=decision_id,
            policy=policy,
            arm=arm,
            propensity=propensity,
            prompt_tokens=prompt_tokens,
            arms=[Arm(**a) for a in columns["candidates"]],
            neighbours=[Neighbour(d, a, s, r, tuple(p) if p else None, o) for d, a, s, r, p, o in columns.get("neighbours") or []],
            cost_weight=columns.get("cost_weight") or 0.0,
            cost_scale=columns.get("cost_scale") or 1.0,
            shadow=shadow.get("probabilities", {}),
            shadow_choices=shadow.get("choices", {}),
        )


class SpendLimitReached(Exception):
    """Not even the cheapest candidate fits the caller's remaining spending budget."""

    def __init__(self, cheapest_usd: float) -> None:
        super().__init__(f"the cheapest candidate costs about ${cheapest_usd:.6f}")
        self.cheapest_usd = cheapest_usd


@dataclass
class CoreDecision:
    record: DecisionRecord
    choice: Choice
    context: Context
    cap: float | None
    over_budget: bool

    @property
    def fallbacks(self) -> list[str]:
        """Other candidates, best score first: where a failed call is retried."""
        others = [a.name for a in self.context.arms if a.name != self.choice.arm]
        return sorted(others, key=lambda a: -self.choice.scores.get(a, 0.0))


@dataclass
class ShadowEstimate:
    """Off-policy value of a policy from logged decisions it did not necessarily make (IPS, SNIPS)."""

    rewards: int = 0
    ips_sum: float = 0.0
    weight_sum: float = 0.0
    matches: int = 0

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
            "ips": self.ips_sum / self.rewards if self.rewards else None,
            "snips": self.ips_sum / self.weight_sum if self.weight_sum else None,
        }


class RoutingCore:
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

    def decide(
        self,
        decision_id: str,
        memory_id: int,
        embedding: np.ndarray,
        prompt_tokens: int,
        candidates: list[Candidate],
        *,
        policy: str | None = None,
        pinned: str | None = None,
        max_cost_usd: float | None = None,
        output_limit: int | None = None,
        spend_limit_usd: float | None = None,
        predictions: Predictions | None = None,
    ) -> CoreDecision:
        """`max_cost_usd` is a soft cap (the cheapest backend is used when none fits); `spend_limit_usd`
        is hard: when nothing fits it, `SpendLimitReached` is raised before anything is remembered."""
        neighbours = self.memory.search(embedding, self.neighbours)
        arms = [
            Arm(c.name, c.price_per_1m_input_tokens_usd, c.price_per_1m_output_tokens_usd,
                predict_cost(c.price_per_1m_input_tokens_usd, c.price_per_1m_output_tokens_usd, prompt_tokens,
                             self.output_lengths.expected(c.name, neighbours, output_limit)))
            for c in candidates
        ]
        if spend_limit_usd is not None:
            arms = [a for a in arms if a.predicted_cost_usd <= spend_limit_usd] or self._reject(arms)
        affordable = [a for a in arms if max_cost_usd is None or a.predicted_cost_usd <= max_cost_usd]
        over_budget = not affordable
        if over_budget:
            affordable = [min(arms, key=lambda a: a.predicted_cost_usd)]
        headroom = self.pacer.headroom()
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
        record = DecisionRecord(
            decision_id=decision_id,
            policy=deciding,
            arm=choice.arm,
            propensity=choice.propensity,
            prompt_tokens=prompt_tokens,
            arms=list(context.arms),
            neighbours=list(neighbours),
            cost_weight=context.cost_weight,
            cost_scale=context.cost_scale,
            shadow={name: c.probabilities for name, c in shadow.items()},
            shadow_choices={name: c.arm for name, c in shadow.items()},
        )
        self.memory.add(np.array([memory_id], dtype=np.int64), embedding.reshape(1, -1), [MemoryEntry(decision_id, choice.arm)])
        return CoreDecision(record, choice, context, max_cost_usd, over_budget)

    @staticmethod
    def _priced(predictions: Predictions, arms: list[Arm], prompt_tokens: int) -> Predictions:
        """FORC's lengths turned into costs with each arm's prices (the router's estimate where it has none)."""
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

    @staticmethod
    def _reject(arms: list[Arm]) -> list[Arm]:
        raise SpendLimitReached(min(a.predicted_cost_usd for a in arms))

    def record_outcome(self, decision_id: str, backend: str, cost_usd: float, output_tokens: float | None) -> None:
        """An answer was produced (possibly by a failover backend): spend, answer length, memory."""
        self.pacer.observe(cost_usd)
        if output_tokens is not None:
            self.output_lengths.observe(backend, output_tokens)
        entry = self.memory.entry(decision_id)
        if entry is not None:
            entry.backend = backend
            entry.output_tokens = output_tokens

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
        """Every policy (or only `learners`) learns: the one that decided at full weight, the others
        importance-weighted. `with_router` also updates the shadow estimates and the memory."""
        context = record.context(embedding)
        for name, policy in self.policies.items():
            if learners is None or name in learners:
                weight = 1.0 if name == record.policy else importance_weight(record.propensity, len(record.arms))
                policy.learn(Feedback(context, record.arm, reward, record.propensity, cost_usd, latency_ms, weight))
        if not with_router:
            return
        for name, probabilities in record.shadow.items():
            if name in self.shadow:
                matched = record.shadow_choices.get(name) == record.arm
                self.shadow[name].add(reward, probabilities.get(record.arm, 0.0), record.propensity, matched)
        entry = self.memory.entry(record.decision_id)
        if entry is not None:
            entry.reward = reward

    def learn_preference(
        self, record: DecisionRecord, embedding: np.ndarray, winner: str, loser: str, learners: set[str] | None = None
    ) -> None:
        context = record.context(embedding)
        for name, policy in self.policies.items():
            if learners is None or name in learners:
                policy.learn_preference(context, winner, loser)
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
        }
