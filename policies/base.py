"""The policy interface: pure decision logic over a routing context.

A policy sees the query embedding, the prompt length, the k nearest past decisions and the candidate
backends (arms) with their predicted costs; it returns its probability of choosing each arm, a score per
arm, and its choice. It learns from feedback: a scalar reward, or a pairwise preference. Arms come and
go at run time, so a policy must accept arms it has never seen and keep state for arms absent today.
Nothing here knows about HTTP, the database or backends.

Budget: every policy optimises reward - lambda * cost. The context carries lambda (`cost_weight`, set by
the router's pacing) and the cost it is measured against (`cost_scale`, USD), so `Context.penalty(arm)`
is in reward units whatever the price scale of the backends.
"""

from __future__ import annotations

import importlib
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

MAX_IMPORTANCE_WEIGHT = 10.0


class PolicyError(ValueError):
    """Invalid input to a policy (no candidates, reward out of range, bad option)."""


@dataclass(frozen=True, slots=True)
class Arm:
    """A candidate backend as a policy sees it."""

    name: str
    price_per_1m_input_tokens_usd: float
    price_per_1m_output_tokens_usd: float
    predicted_cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A past decision close to the current query: its arm, its reward and/or preference if known."""

    decision_id: str
    arm: str
    similarity: float
    reward: float | None = None
    preference: tuple[str, str] | None = None  # (winner, loser) posted for that query
    output_tokens: float | None = None  # answer length, for cost prediction


@dataclass(frozen=True, slots=True)
class Predictions:
    """What trained predictors say about this query; a field is None while its model is not trained.

    `quality`, `output_tokens`: FORC's per-arm estimates (a length is None where training saw none);
    `cost_usd`: the router's pricing of them. `small_ok`: Hybrid-LLM's P(the small backend is good
    enough), with the pair it was trained on and its calibrated threshold. `mf_quality`: RouteLLM's matrix
    factorisation's per-arm quality estimate (`router.predictors.mf`).
    """

    quality: Mapping[str, float] | None = None
    output_tokens: Mapping[str, float | None] | None = None
    cost_usd: Mapping[str, float] | None = None
    small_ok: float | None = None
    small: str | None = None
    large: str | None = None
    threshold: float | None = None
    mf_quality: Mapping[str, float] | None = None  # RouteLLM's matrix factorisation: per-arm quality estimate


@dataclass(frozen=True, slots=True)
class HistoryPrompt:
    """One prompt of imported history (`llm-router import`): every backend's recorded quality on it (and
    cost where known), with the query as a policy sees it. What `Policy.warm_start` learns from."""

    embedding: np.ndarray
    prompt_tokens: int
    qualities: Mapping[str, float]
    costs: Mapping[str, float] | None = None


@dataclass(frozen=True, slots=True)
class Context:
    embedding: np.ndarray
    prompt_tokens: int
    arms: tuple[Arm, ...]
    neighbours: tuple[Neighbour, ...] = ()
    cost_weight: float = 0.0  # lambda: reward given up per `cost_scale` USD of predicted cost
    cost_scale: float = 1.0  # USD
    predictions: Predictions = Predictions()
    max_cost_usd: float | None = None  # the per-request cap the arms were filtered with

    @property
    def arm_names(self) -> list[str]:
        return [arm.name for arm in self.arms]

    def penalty(self, arm: Arm) -> float:
        """lambda * cost in reward units."""
        if self.cost_weight == 0.0 or self.cost_scale <= 0.0:
            return 0.0
        return self.cost_weight * arm.predicted_cost_usd / self.cost_scale

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms if a.name == name), None)


@dataclass(frozen=True, slots=True)
class Choice:
    """The chosen arm, the policy's probability of each arm (sums to 1), and its score of each arm."""

    arm: str
    probabilities: dict[str, float]
    scores: dict[str, float]

    @property
    def propensity(self) -> float:
        return self.probabilities[self.arm]


@dataclass(frozen=True, slots=True)
class Feedback:
    """The outcome of one decision: the arm that served it and what it earned.

    `propensity` is the logging policy's probability of that arm; `weight` is the importance weight this
    policy gives the sample (1 for the policy that decided; see `importance_weight` for the others).
    """

    context: Context
    arm: str
    reward: float
    propensity: float
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    weight: float = 1.0

    @property
    def utility(self) -> float:
        """reward - lambda * cost, with the lambda and cost scale in force when the decision was made."""
        arm = self.context.arm(self.arm)
        if arm is None or self.context.cost_weight == 0.0:
            return self.reward
        return self.reward - self.context.penalty(Arm(arm.name, 0, 0, self.cost_usd or arm.predicted_cost_usd))


def importance_weight(propensity: float, n_arms: int) -> float:
    """Weight of another policy's logged sample: inverse propensity relative to uniform, clipped.

    A uniform logger gives weight 1; an arm the logger rarely picks counts more (up to 10x), an arm it
    nearly always picks counts less (down to 0.1x), which corrects most of the selection bias of learning
    from someone else's choices without letting one rare sample dominate.
    """
    return min(MAX_IMPORTANCE_WEIGHT, max(1.0 / MAX_IMPORTANCE_WEIGHT, 1.0 / (max(n_arms, 1) * propensity)))


def softmax(values: dict[str, float], temperature: float = 1.0) -> dict[str, float]:
    top = max(values.values())
    exps = {k: math.exp((v - top) / max(temperature, 1e-9)) for k, v in values.items()}
    total = sum(exps.values())
    return {k: e / total for k, e in exps.items()}


def epsilon_greedy_probabilities(scores: dict[str, float], epsilon: float) -> dict[str, float]:
    """Uniform with probability epsilon, else uniform among the arms tied for the best score."""
    best = max(scores.values())
    greedy = [a for a, s in scores.items() if s >= best - 1e-12]
    n = len(scores)
    return {a: epsilon / n + ((1.0 - epsilon) / len(greedy) if a in greedy else 0.0) for a in scores}


@dataclass
class ArmTally:
    pulls: int = 0
    feedback: int = 0
    reward_sum: float = 0.0

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.feedback if self.feedback else None


class Policy(ABC):
    """Base class: public methods validate and keep tallies, private hooks hold each policy's logic."""

    name: ClassVar[str]
    maturity: ClassVar[Literal["supported", "experimental"]] = "supported"
    contextual: ClassVar[bool] = True  # uses the query (embedding or neighbours), not just arm averages

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._tallies: dict[str, ArmTally] = {}
        self._warm_prompts = 0  # history prompts `warm_start` learnt from

    def choose(self, context: Context) -> Choice:
        """Decide for a query: the choice this policy would make, counted as a pull."""
        choice = self.score(context)
        self._tally(choice.arm).pulls += 1
        return choice

    def score(self, context: Context) -> Choice:
        """Decide without counting a pull (shadow evaluation)."""
        if not context.arms:
            raise PolicyError("no candidate backends to choose from")
        choice = self._choose(context)
        names = set(context.arm_names)
        if choice.arm not in names or set(choice.probabilities) != names:
            raise AssertionError(f"{self.name} returned arms outside the candidates")
        return choice

    def learn(self, feedback: Feedback) -> None:
        if not 0.0 <= feedback.reward <= 1.0:
            raise PolicyError(f"reward must be in [0, 1], got {feedback.reward}")
        if not 0.0 < feedback.propensity <= 1.0:
            raise PolicyError(f"propensity must be in (0, 1], got {feedback.propensity}")
        if not feedback.weight > 0.0:
            raise PolicyError(f"weight must be positive, got {feedback.weight}")
        tally = self._tally(feedback.arm)
        tally.feedback += 1
        tally.reward_sum += feedback.reward
        self._learn(feedback)

    def learn_preference(self, context: Context, winner: str, loser: str) -> None:
        """Pairwise feedback: for this query `winner` answered better than `loser`."""
        if winner == loser:
            raise PolicyError("winner and loser must differ")
        self._learn_preference(context, winner, loser)

    def warm_start(self, history: list[HistoryPrompt]) -> int:
        """Seed what the policy knows from imported history, where every backend's outcome on each prompt
        is known (full information, unlike the one answer per query the policy learns from online), so a
        deployment with history does not start from zero. Returns the prompts used (0: this policy has
        no warm start). Outcomes of backends the policy never routes to do no harm; qualities must be in
        [0, 1]."""
        for prompt in history:
            bad = [q for q in prompt.qualities.values() if not 0.0 <= q <= 1.0]
            if bad:
                raise PolicyError(f"history qualities must be in [0, 1], got {bad[0]}")
        used = self._warm_start([p for p in history if p.qualities])
        self._warm_prompts += used
        return used

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable picture of the whole state, enough for `restore` to continue from."""
        return {
            "tallies": {arm: vars(t).copy() for arm, t in self._tallies.items()},
            "rng": _encode_rng(self._rng.getstate()),
            "state": self._snapshot(),
            "warm_start_prompts": self._warm_prompts,
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        self._tallies = {arm: ArmTally(**t) for arm, t in snapshot["tallies"].items()}
        self._rng.setstate(_decode_rng(snapshot["rng"]))
        self._restore(snapshot["state"])
        self._warm_prompts = snapshot.get("warm_start_prompts", 0)

    def stats(self) -> dict[str, Any]:
        """`pulls`: choices this policy made since start; `feedback`: rewards it learned from (any policy's)."""
        return {
            "name": self.name,
            "maturity": self.maturity,
            "arms": {
                arm: {"pulls": t.pulls, "feedback": t.feedback, "mean_reward": t.mean_reward}
                for arm, t in sorted(self._tallies.items())
            },
            "internals": self._internals(),
            "warm_start_prompts": self._warm_prompts,
        }

    def _tally(self, arm: str) -> ArmTally:
        return self._tallies.setdefault(arm, ArmTally())

    @abstractmethod
    def _choose(self, context: Context) -> Choice: ...

    @abstractmethod
    def _learn(self, feedback: Feedback) -> None: ...

    def _learn_preference(self, context: Context, winner: str, loser: str) -> None:
        """Policies that learn from scalar rewards only ignore preferences."""

    def _warm_start(self, history: list[HistoryPrompt]) -> int:
        """Policies without a warm start (random, fixed) ignore history."""
        return 0

    def _snapshot(self) -> dict[str, Any]:
        return {}

    def _restore(self, state: dict[str, Any]) -> None:
        return None

    def _internals(self) -> dict[str, Any]:
        return {}


def _encode_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _decode_rng(encoded: list) -> tuple:
    version, internal, gauss = encoded
    return (version, tuple(internal), gauss)


# name -> module that defines it: the registry imports a policy's module only when the policy is used,
# so importing the shared types (as router.memory and router.budget do) loads no policy and no VW.
POLICY_MODULES = {
    "auto": "policies.auto",
    "elo": "policies.elo",
    "fixed": "policies.fixed",
    "forc": "policies.forc",
    "gradient": "policies.gradient",
    "hybrid": "policies.hybrid",
    "mf": "policies.mf",
    "qlearning": "policies.qlearning",
    "random": "policies.random_policy",
    "thompson": "policies.thompson",
    "vw": "policies.vw",
}
# Policies that route on trained predictors; the predictor kinds (router.predictors) carry their names.
PREDICTED_POLICIES = ("forc", "hybrid", "mf")


class _Registry:
    """Policies by name. A module registers its class with `@registry.register` when it is imported."""

    def __init__(self, modules: dict[str, str]) -> None:
        self._modules = modules
        self._classes: dict[str, type[Policy]] = {}

    def register(self, cls: type[Policy]) -> type[Policy]:
        self._classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._modules)

    def get(self, name: str) -> type[Policy]:
        if name not in self._modules:
            raise PolicyError(f"unknown policy {name!r}; known: {self.names()}")
        if name not in self._classes:
            importlib.import_module(self._modules[name])
        return self._classes[name]

    def create(self, name: str, seed: int | None = None, **options: Any) -> Policy:
        cls = self.get(name)
        try:
            return cls(seed=seed, **options)
        except TypeError as exc:
            raise PolicyError(f"bad options for policy {name!r}: {exc}") from exc


registry = _Registry(POLICY_MODULES)
