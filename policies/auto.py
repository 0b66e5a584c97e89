"""`auto`: routes with whichever of its member policies is doing best on this traffic.

Which policy suits a deployment depends on its traffic (on one recorded file `thompson` is best, on a
one held out `gradient` beat it on a seed), and a user cannot know in advance. `auto` runs its members
(`members`, by default the supported bandits, thompson twice: as it is and per query cluster, see
`DEFAULT_MEMBER_OPTIONS`; an alias names its policy in `member_options`) side by side and learns, from its own log, which one to
follow.

Deciding. Every member scores the query (its probability p_m(a) of each backend). `auto` picks a member
at random with probability q_m and routes with that member's distribution, so its probability of
backend a is the mixture P(a) = sum_m q_m p_m(a), and that is the propensity it reports: exact, since
it is the probability with which the backend is drawn. q is the probability that each member is the
best one under the current estimates (Thompson sampling over policies, below), mixed with
`exploration` spread evenly over the members, so every member keeps a share and the estimates stay
usable (an importance ratio p_m / P is at most members / exploration).

Judging. For every reward, each member's off-policy value gets the doubly robust term
x_m = b + (r - b) * p_m(a) / p_log(a), where p_log is the logging propensity (auto's own mixture when
it decided, another policy's when auto was a shadow), p_m(a) the member's probability of the logged
backend as the member stands when the reward comes, before it learns from it (scored with fixed random
draws: a function of what the member has learnt alone, so a restart that replays the log after a
snapshot gets exactly the same estimates; in a replay the reward follows its decision at once, so this
is the decision's probability), and b the mean reward so far (a constant control variate, which only
lowers the variance: the estimate is IPS when b = 0; ratios are clipped at `max_ratio`). The estimate
of member m is the mean of its x_m (a member that agrees with the log gets ratios near 1 and the
baseline cancels). Because every member is judged on the same rewards, their estimates are strongly
correlated: two members that agree on most queries differ only where they disagree. So `auto` keeps
the running covariance of the x vectors and treats the members' values as N(mean, covariance / n): a
difference is significant when the evidence where the members disagree says so, not when each estimate
alone is tight. P(member is best) under that distribution, counted over `samples` fixed draws, is q
before exploration (Thompson sampling over policies, in expectation; the fixed draws make q a function
of the estimates). Estimates forget with `half_life` (decisions; 0 keeps everything).

Learning. Every member learns from every reward with the weight `auto` was given (1 when auto decided),
so each is as warm as if it had run alone on auto's traffic; preferences go to every member too.

Stats (`_internals`): the member it follows (highest q) and why: each member's estimate with a
95% interval (estimate +- 2 standard errors), its share q and P(best).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from policies.base import Choice, Context, Feedback, HistoryPrompt, Policy, PolicyError, registry

DEFAULT_MEMBERS = ("thompson", "thompson-clusters", "qlearning", "vw", "elo", "gradient")
# A member is a registered policy, or an alias whose options name the policy ({"policy": "thompson", ...}).
DEFAULT_MEMBER_OPTIONS: dict[str, dict[str, Any]] = {
    # Thompson sampling per region of the embedding space (16 spherical k-means clusters), each region
    # shrunk toward the backend's global mean by 25 pseudo-observations: where the best backend depends
    # on the task (llmrouter) it beats plain thompson, where one backend is best everywhere (alpaca_eval)
    # it explores more; auto keeps both and follows whichever does better.
    "thompson-clusters": {"policy": "thompson", "clusters": 16, "prior_strength": 25.0},
}
_FIXED_NUMPY = np.random.default_rng(0).bit_generator.state


@contextmanager
def _fixed_randomness(policy: Policy) -> Iterator[None]:
    """The member scores with fixed random draws (its own generators are put back afterwards), so its
    probabilities are a function of what it has learnt alone, the same in a replay after a restart as
    when the reward first came."""
    saved = policy._rng.getstate()
    generator = getattr(policy, "_np_rng", None)
    saved_numpy = generator.bit_generator.state if isinstance(generator, np.random.Generator) else None
    policy._rng.seed(0)
    if saved_numpy is not None:
        generator.bit_generator.state = _FIXED_NUMPY
    try:
        yield
    finally:
        policy._rng.setstate(saved)
        if saved_numpy is not None:
            generator.bit_generator.state = saved_numpy


@registry.register
class AutoPolicy(Policy):
    name = "auto"
    maturity = "supported"
    contextual = True

    def __init__(
        self,
        seed: int | None = None,
        members: list[str] | tuple[str, ...] = DEFAULT_MEMBERS,
        member_options: dict[str, dict[str, Any]] | None = None,
        exploration: float = 0.05,
        samples: int = 512,
        half_life: float = 0.0,
        max_ratio: float = 100.0,
    ) -> None:
        members = list(members)
        if not members or len(set(members)) != len(members):
            raise PolicyError(f"members must be distinct policy names, got {members!r}")
        if "auto" in members:
            raise PolicyError("auto cannot be its own member")
        if not 0.0 < exploration <= 1.0:
            raise PolicyError(f"exploration must be in (0, 1], got {exploration}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise PolicyError(f"samples must be a positive integer, got {samples!r}")
        if not (half_life >= 0.0 and math.isfinite(half_life)):
            raise PolicyError(f"half_life must be >= 0 decisions (0: never forget), got {half_life}")
        if not max_ratio >= 1.0:
            raise PolicyError(f"max_ratio must be >= 1, got {max_ratio}")
        options = {name: dict(value) for name, value in DEFAULT_MEMBER_OPTIONS.items() if name in members}
        for name, value in (member_options or {}).items():
            options[name] = {**options.get(name, {}), **value}
        unknown = set(options) - set(members)
        if unknown:
            raise PolicyError(f"member_options for policies that are not members: {sorted(unknown)}")
        super().__init__(seed)
        self.members: dict[str, Policy] = {}
        for name in members:
            settings = dict(options.get(name, {}))
            policy = settings.pop("policy", name)
            if policy == "auto":
                raise PolicyError("auto cannot be its own member")
            if policy not in registry.names():
                raise PolicyError(f"member {name!r} is neither a policy nor an alias with a 'policy' option; known: {registry.names()}")
            self.members[name] = registry.create(policy, seed=seed, **settings)
        self.exploration = float(exploration)
        self.samples = samples
        self.half_life = float(half_life)
        self.max_ratio = float(max_ratio)
        m = len(members)
        self._n = 0.0  # (discounted) rewards judged
        self._sum = np.zeros(m)  # sum of x
        self._outer = np.zeros((m, m))  # sum of x x^T
        self._rewards = [0.0, 0.0]  # [count, mean reward]: the control variate b
        self._normal = np.random.default_rng(0).standard_normal((samples, m))  # fixed draws: q is a function of the estimates

    @property
    def names(self) -> list[str]:
        return list(self.members)

    # --- judging -----------------------------------------------------------------------------------------

    def estimates(self) -> tuple[np.ndarray, np.ndarray]:
        """Each member's value estimate and the covariance of the estimates."""
        m = len(self.members)
        if self._n < 2.0:
            return np.full(m, self._rewards[1]), np.eye(m)
        mean = self._sum / self._n
        covariance = (self._outer / self._n - np.outer(mean, mean)) * self._n / (self._n - 1.0)
        covariance = (covariance + covariance.T) / 2 + np.eye(m) * 1e-9
        return mean, covariance / self._n

    def shares(self) -> tuple[np.ndarray, np.ndarray]:
        """(q, P(best)): each member's share of the decisions, and its probability of being the best under
        N(estimates, covariance), counted over `samples` fixed standard-normal draws (common random
        numbers: the same estimates always give the same shares, after a restart too)."""
        mean, covariance = self.estimates()
        m = len(mean)
        draws = mean + self._normal @ np.linalg.cholesky(covariance).T
        best = np.bincount(draws.argmax(axis=1), minlength=m) / self.samples
        return (1.0 - self.exploration) * best + self.exploration / m, best

    def _member_probabilities(self, context: Context) -> dict[str, Choice]:
        return {name: member.score(context) for name, member in self.members.items()}

    # --- the policy hooks ----------------------------------------------------------------------------------

    def _choose(self, context: Context) -> Choice:
        choices = self._member_probabilities(context)
        q, _ = self.shares()
        arms = context.arm_names
        probabilities = {a: float(sum(q[i] * choices[name].probabilities[a] for i, name in enumerate(self.members))) for a in arms}
        total = sum(probabilities.values())
        probabilities = {a: p / total for a, p in probabilities.items()}
        arm = arms[int(self._rng.choices(range(len(arms)), weights=[probabilities[a] for a in arms])[0])]
        leader = self.names[int(np.argmax(q))]
        return Choice(arm=arm, probabilities=probabilities, scores=dict(choices[leader].scores))

    def _judged_probabilities(self, context: Context) -> dict[str, dict[str, float]]:
        """Each member's probabilities for a logged decision, as it stands before learning its reward."""
        probabilities = {}
        for name, member in self.members.items():
            with _fixed_randomness(member):
                probabilities[name] = member.score(context).probabilities
        return probabilities

    def _learn(self, feedback: Feedback) -> None:
        judged = self._judged_probabilities(feedback.context) if feedback.arm in feedback.context.arm_names else None
        if judged is not None:
            baseline = self._rewards[1] if self._rewards[0] else feedback.reward
            ratios = np.array([min(self.max_ratio, judged[name][feedback.arm] / feedback.propensity) for name in self.members])
            x = baseline + (feedback.reward - baseline) * ratios
            decay = 0.5 ** (1.0 / self.half_life) if self.half_life else 1.0
            self._n = decay * self._n + 1.0
            self._sum = decay * self._sum + x
            self._outer = decay * self._outer + np.outer(x, x)
        self._rewards[0] += 1.0
        self._rewards[1] += (feedback.reward - self._rewards[1]) / self._rewards[0]
        for member in self.members.values():
            member.learn(feedback)

    def _learn_preference(self, context: Context, winner: str, loser: str) -> None:
        for member in self.members.values():
            member.learn_preference(context, winner, loser)

    def _warm_start(self, history: list[HistoryPrompt]) -> int:
        """Every member warm-starts from the history; the members' estimates start from the live traffic
        (judging them on the history they were just fitted to would favour the ones that overfit it)."""
        return max(member.warm_start(history) for member in self.members.values())

    def _snapshot(self) -> dict[str, Any]:
        return {
            "members": {name: member.snapshot() for name, member in self.members.items()},
            "n": self._n, "sum": self._sum.tolist(), "outer": self._outer.tolist(), "rewards": self._rewards,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        if list(state["members"]) != self.names:
            raise PolicyError(f"snapshot holds members {list(state['members'])}, this auto has {self.names}")
        for name, member in self.members.items():
            member.restore(state["members"][name])
        self._n = float(state["n"])
        self._sum = np.array(state["sum"], dtype=float)
        self._outer = np.array(state["outer"], dtype=float)
        self._rewards = list(state["rewards"])

    def _internals(self) -> dict[str, Any]:
        mean, covariance = self.estimates()
        q, best = self.shares()
        errors = np.sqrt(np.clip(np.diag(covariance), 0.0, None))
        leader = int(np.argmax(q))
        members = {
            name: {
                "estimate": round(float(mean[i]), 4),
                "interval_95": [round(float(mean[i] - 2 * errors[i]), 4), round(float(mean[i] + 2 * errors[i]), 4)],
                "share": round(float(q[i]), 4),
                "p_best": round(float(best[i]), 4),
                "internals": self.members[name].stats()["internals"],
            }
            for i, name in enumerate(self.members)
        }
        return {
            "following": self.names[leader],
            "why": (f"{self.names[leader]} is the best member with probability {best[leader]:.2f} "
                    f"(estimate {mean[leader]:.4f} +- {2 * errors[leader]:.4f} over {self._n:.0f} rewards)"),
            "rewards_judged": round(self._n, 3),
            "exploration": self.exploration,
            "half_life": self.half_life,
            "members": members,
        }
