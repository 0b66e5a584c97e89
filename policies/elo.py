"""`elo`: Eagle (arXiv 2409.15518), training-free ELO routing from pairwise comparisons.

Each backend has a global ELO rating, updated by every comparison ever seen, and a local rating computed
fresh at decision time from the comparisons among the query's N nearest past queries. An arm scores
P * global + (1 - P) * local. Comparisons come from:

- Preferences: `learn_preference(winner, loser)` is one game won by `winner` (global); a neighbour that
  carries a preference is one such game in the local replay.
- Scalar rewards: two observations of different backends are a game, won by the higher reward when
  the rewards differ by more than `margin`, else a draw. When feedback for arm A arrives, A plays every
  one of the first N neighbours known at decision time that used another arm and has a reward, with K
  scaled by the neighbour's similarity (a far neighbour is weak evidence) and by `feedback.weight`
  (importance weight). With no such neighbour (no memory, or all neighbours on A) A plays the other
  candidates' running mean rewards instead, so global ratings still learn from bandit feedback alone.
- Local ratings replay, from the initial rating, every pair of the first N neighbours (most similar
  first) with different arms and known rewards (same rule) and their preferences, with the full K: the
  N nearest are the neighbourhood, and shrinking K by similarity would only shrink local ratings
  against global ones, i.e. silently raise P. Starting from the initial rating, not the global ratings,
  keeps local ratings pure neighbourhood evidence, so P means what it says: an arm the neighbourhood
  says nothing about sits at the neutral rating and its global rating alone sets it apart.

Ratings measure answer quality: games compare raw rewards (neighbours carry no cost, and preferences
are about quality), and cost enters once, at decision time. The blended rating becomes a reward-like
number, its expected score against the candidates' mean rating, 1 / (1 + 10^((mean - rating) / 400)),
before `context.penalty(arm)` (lambda * cost) is subtracted. Choice: epsilon-greedy on that score, ties
split evenly, so a cold start (all ratings equal) picks at random and every arm, a new one included,
keeps being observed and compared.
"""

from __future__ import annotations

import math
from typing import Any

from policies.base import (
    Choice,
    Context,
    Feedback,
    Neighbour,
    Policy,
    PolicyError,
    epsilon_greedy_probabilities,
    registry,
)


def expected_score(rating: float, opponent: float) -> float:
    """ELO: probability that `rating` beats `opponent`."""
    return 1.0 / (1.0 + 10.0 ** ((opponent - rating) / 400.0))


@registry.register
class EloPolicy(Policy):
    name = "elo"
    maturity = "supported"
    contextual = True

    def __init__(
        self,
        seed: int | None = None,
        global_weight: float = 0.5,
        k_factor: float = 32.0,
        neighbours: int = 20,
        initial_rating: float = 1000.0,
        epsilon: float = 0.05,
        margin: float = 0.05,
    ) -> None:
        """`global_weight` is Eagle's P, `k_factor` its K, `neighbours` its N."""
        if not 0.0 <= global_weight <= 1.0:
            raise PolicyError(f"global_weight must be in [0, 1], got {global_weight}")
        if not k_factor > 0.0:
            raise PolicyError(f"k_factor must be positive, got {k_factor}")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 0:
            raise PolicyError(f"neighbours must be a non-negative integer, got {neighbours!r}")
        if not math.isfinite(initial_rating):
            raise PolicyError(f"initial_rating must be a finite rating, got {initial_rating}")
        if not 0.0 < epsilon <= 1.0:
            raise PolicyError(f"epsilon must be in (0, 1] so every arm keeps being tried, got {epsilon}")
        if not 0.0 <= margin < 1.0:
            raise PolicyError(f"margin must be in [0, 1), got {margin}")
        super().__init__(seed)
        self.global_weight = float(global_weight)
        self.k_factor = float(k_factor)
        self.n_neighbours = neighbours
        self.initial_rating = float(initial_rating)
        self.epsilon = float(epsilon)
        self.margin = float(margin)
        self._ratings: dict[str, float] = {}
        self._games: dict[str, int] = {}  # comparisons each arm took part in (global)
        self._means: dict[str, list[float]] = {}  # arm -> [weight, mean reward]: fallback opponents

    def outcome(self, reward: float, opponent_reward: float) -> float:
        """Scalar rewards as a game: 1 win, 0 loss, 0.5 draw within `margin`."""
        if reward > opponent_reward + self.margin:
            return 1.0
        if reward < opponent_reward - self.margin:
            return 0.0
        return 0.5

    def _play(self, ratings: dict[str, float], a: str, b: str, score_a: float, k: float) -> None:
        """One ELO game between a and b; `score_a` is a's result (1, 0.5 or 0)."""
        rating_a, rating_b = ratings.get(a, self.initial_rating), ratings.get(b, self.initial_rating)
        delta = k * (score_a - expected_score(rating_a, rating_b))
        ratings[a], ratings[b] = rating_a + delta, rating_b - delta

    def _play_global(self, a: str, b: str, score_a: float, k: float) -> None:
        self._play(self._ratings, a, b, score_a, k)
        for arm in (a, b):
            self._games[arm] = self._games.get(arm, 0) + 1

    def local_ratings(self, neighbours: tuple[Neighbour, ...]) -> dict[str, float]:
        """Ratings replayed from the initial rating over the games among the first N neighbours."""
        near = neighbours[: self.n_neighbours]
        ratings: dict[str, float] = {}
        for i, first in enumerate(near):
            if first.preference is not None:
                self._play(ratings, *first.preference, 1.0, self.k_factor)
            if first.reward is None:
                continue
            for second in near[i + 1 :]:
                if second.reward is not None and second.arm != first.arm:
                    self._play(ratings, first.arm, second.arm, self.outcome(first.reward, second.reward), self.k_factor)
        return ratings

    def _choose(self, context: Context) -> Choice:
        local = self.local_ratings(context.neighbours)
        blended = {
            arm: self.global_weight * self._ratings.get(arm, self.initial_rating)
            + (1.0 - self.global_weight) * local.get(arm, self.initial_rating)
            for arm in context.arm_names
        }
        mean = sum(blended.values()) / len(blended)
        scores = {arm.name: expected_score(blended[arm.name], mean) - context.penalty(arm) for arm in context.arms}
        probabilities = epsilon_greedy_probabilities(scores, self.epsilon)
        arm = self._rng.choices(list(probabilities), weights=list(probabilities.values()))[0]
        return Choice(arm=arm, probabilities=probabilities, scores=scores)

    def _learn(self, feedback: Feedback) -> None:
        """Games against the neighbours on other arms, else against the other arms' mean rewards."""
        opponents = [
            (n.arm, n.reward, _closeness(n))
            for n in feedback.context.neighbours[: self.n_neighbours]
            if n.reward is not None and n.arm != feedback.arm
        ]
        if not opponents:
            opponents = [
                (arm, self._means[arm][1], 1.0)
                for arm in feedback.context.arm_names
                if arm != feedback.arm and arm in self._means
            ]
        for arm, reward, closeness in opponents:
            k = self.k_factor * feedback.weight * closeness
            self._play_global(feedback.arm, arm, self.outcome(feedback.reward, reward), k)
        entry = self._means.setdefault(feedback.arm, [0.0, 0.0])
        entry[0] += feedback.weight
        entry[1] += feedback.weight / entry[0] * (feedback.reward - entry[1])

    def _learn_preference(self, context: Context, winner: str, loser: str) -> None:
        self._play_global(winner, loser, 1.0, self.k_factor)

    def _snapshot(self) -> dict[str, Any]:
        return {"ratings": self._ratings, "games": self._games, "means": self._means}

    def _restore(self, state: dict[str, Any]) -> None:
        self._ratings = dict(state["ratings"])
        self._games = dict(state["games"])
        self._means = {arm: list(entry) for arm, entry in state["means"].items()}

    def _internals(self) -> dict[str, Any]:
        return {
            "global_ratings": {arm: round(r, 3) for arm, r in sorted(self._ratings.items())},
            "P": self.global_weight,
            "K": self.k_factor,
            "N": self.n_neighbours,
            "comparisons": sum(self._games.values()) // 2,
            "comparisons_by_arm": dict(sorted(self._games.items())),
        }


def _closeness(neighbour: Neighbour) -> float:
    """A neighbour's similarity clipped to [0, 1]: the weight of the games it takes part in."""
    return min(1.0, max(0.0, neighbour.similarity))
