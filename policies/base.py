"""The policy interface: pure decision logic over a routing context.

A policy sees the query embedding, the prompt length, the k nearest past decisions and the candidate
backends (arms) with their prices; it returns a score per arm, its choice and the probability with
which it made that choice (the propensity, needed for off-policy evaluation). It learns from feedback.
Arms come and go at run time, so a policy must accept arms it has never seen and keep state for arms
that are absent today. Nothing here knows about HTTP, the database or backends.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np


class PolicyError(ValueError):
    """Invalid input to a policy (no candidates, reward out of range, unknown arm)."""


@dataclass(frozen=True, slots=True)
class Arm:
    """A candidate backend as a policy sees it."""

    name: str
    price_per_1m_input_tokens_usd: float
    price_per_1m_output_tokens_usd: float
    predicted_cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Neighbour:
    """A past decision close to the current query, with its reward if one arrived."""

    decision_id: str
    arm: str
    similarity: float
    reward: float | None


@dataclass(frozen=True, slots=True)
class Context:
    embedding: np.ndarray
    prompt_tokens: int
    arms: tuple[Arm, ...]
    neighbours: tuple[Neighbour, ...] = ()

    @property
    def arm_names(self) -> list[str]:
        return [arm.name for arm in self.arms]


@dataclass(frozen=True, slots=True)
class Choice:
    arm: str
    propensity: float
    scores: dict[str, float]


@dataclass(frozen=True, slots=True)
class Feedback:
    """The outcome of one decision: the arm that served it and the reward it earned."""

    context: Context
    arm: str
    reward: float
    propensity: float
    cost_usd: float = 0.0
    latency_ms: float = 0.0


@dataclass
class ArmTally:
    pulls: int = 0
    rewards: int = 0
    reward_sum: float = 0.0

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.rewards if self.rewards else None


class Policy(ABC):
    """Base class: public methods validate and keep tallies, private hooks hold each policy's logic."""

    name: ClassVar[str]
    maturity: ClassVar[Literal["supported", "experimental"]] = "supported"

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = random.Random(seed)
        self._tallies: dict[str, ArmTally] = {}

    def choose(self, context: Context) -> Choice:
        if not context.arms:
            raise PolicyError("no candidate backends to choose from")
        choice = self._choose(context)
        if choice.arm not in context.arm_names:
            raise AssertionError(f"{self.name} chose {choice.arm!r}, not a candidate")
        self._tally(choice.arm).pulls += 1
        return choice

    def learn(self, feedback: Feedback) -> None:
        if not 0.0 <= feedback.reward <= 1.0:
            raise PolicyError(f"reward must be in [0, 1], got {feedback.reward}")
        if not 0.0 < feedback.propensity <= 1.0:
            raise PolicyError(f"propensity must be in (0, 1], got {feedback.propensity}")
        tally = self._tally(feedback.arm)
        tally.rewards += 1
        tally.reward_sum += feedback.reward
        self._learn(feedback)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable picture of the whole state, enough for `restore` to continue from."""
        return {
            "tallies": {arm: vars(t).copy() for arm, t in self._tallies.items()},
            "rng": _encode_rng(self._rng.getstate()),
            "state": self._snapshot(),
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        self._tallies = {arm: ArmTally(**t) for arm, t in snapshot["tallies"].items()}
        self._rng.setstate(_decode_rng(snapshot["rng"]))
        self._restore(snapshot["state"])

    def stats(self) -> dict[str, Any]:
        """`pulls`: choices this policy made since start; `feedback`: rewards it learned from (any policy's)."""
        return {
            "name": self.name,
            "maturity": self.maturity,
            "arms": {
                arm: {"pulls": t.pulls, "feedback": t.rewards, "mean_reward": t.mean_reward}
                for arm, t in sorted(self._tallies.items())
            },
            "internals": self._internals(),
        }

    def _tally(self, arm: str) -> ArmTally:
        return self._tallies.setdefault(arm, ArmTally())

    @abstractmethod
    def _choose(self, context: Context) -> Choice: ...

    @abstractmethod
    def _learn(self, feedback: Feedback) -> None: ...

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


@dataclass
class _Registry:
    classes: dict[str, type[Policy]] = field(default_factory=dict)

    def register(self, cls: type[Policy]) -> type[Policy]:
        self.classes[cls.name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self.classes)

    def create(self, name: str, seed: int | None = None, **options: Any) -> Policy:
        if name not in self.classes:
            raise PolicyError(f"unknown policy {name!r}; known: {self.names()}")
        try:
            return self.classes[name](seed=seed, **options)
        except TypeError as exc:
            raise PolicyError(f"bad options for policy {name!r}: {exc}") from exc


registry = _Registry()
