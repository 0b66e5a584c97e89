"""`vw`: a Vowpal Wabbit contextual bandit (`cb_explore_adf`), the MetaLLM / MixLLM style of router.

Why VW: one online linear model of each backend's cost given the query, learned by importance-weighted
regression (`cb_type mtr`), with exploration that shrinks as the model gets sure (SquareCB, or a fixed
epsilon). Backends are action-dependent features, so they can appear and disappear with no model change.

Features. Shared line: `e`, the embedding's dimensions as dense features; `p`, log(1 + prompt tokens).
Action lines (`a`): the backend id (one-hot by name), its log predicted cost relative to the other
candidates, and the budget penalty lambda * cost in reward units. The label carries that penalty, so
this feature lets one learned weight follow lambda when the pacer moves it, where the backend ids alone
would keep avoiding a pricier backend after lambda falls again. `-q ea -q pa` gives every backend its
own linear model of the query.

Updates: `--adaptive --invariant`, i.e. VW's default without `--normalized`. Normalised updates give
each of the 384 embedding features as large a share of an update as a backend's id, so a backend's own
level is learned slowly and a new backend is adopted late. Plain AdaGrad steps overshoot on hundreds of
small dense features instead (scores biased ~0.2 high), unless the embedding namespace is scaled by
1/sqrt(dim) so that a unit vector weighs about as much as one unit feature; the prompt length is scaled
to about 0..1 for the same reason.

Label. VW minimises cost: the chosen action costs -(reward - lambda * cost) = -utility. MTR weighs
the labelled sample by 1 / (label probability) times VW's running (events / actions), i.e. 1 / (K * p)
for K candidates. Two things keep that weight correct:

- Position. With `cb_explore_adf` (squarecb and epsilon alike), VW 9.x resets the label probability to
  1 on every action line but the last before MTR reads it. Measured on 9.11, one update of a fresh model
  with 3 actions: at positions 0 and 1 the labelled score moves to 0.58 whether p is 0.1, 0.9 or 1; at
  position 2 to 0.94 at p=0.1 and 0.60 at p=0.9. The weight thus depended on the order the backends
  were listed in: 1/K on all lines but the last, 1/(K * p), up to 1000/K, on the last. `_learn` writes
  the labelled action line last; each action line carries its own features and MTR updates on the
  labelled one only, so the order of the lines is otherwise immaterial (the model comes out identical).
- Clipping. The label probability is 1 / (K * w), with w = 1 / (K * propensity), the inverse propensity
  relative to uniform, clipped to [1/10, `max_importance_weight`]. MTR then weighs the sample by w
  (exactly while K is constant). The default cap is 1, the uniform logger's weight: a backend the logger
  over-samples (the greedy one) is weighed down to 1/(K * p), but a rarely explored one is never weighed
  up, because one noisy reward at 10x swings that backend's whole regression. Measured over seeds 0-4
  (second half of each pass, `llm-router replay --policy vw` with `max_importance_weight` set): cap 10
  gave alpaca_eval 0.652 and llmrouter 0.582, cap 3 0.660 and 0.587, cap 1 0.661 and 0.606; the order
  held on both files, so the cap is a variance choice, not a fit to one of them.

`Feedback.weight` is not applied on top: for another policy's logged sample the router sets it to
`importance_weight(propensity, K)`, the very weight derived here from the propensity, so multiplying
would count the correction twice; for this policy's own samples it is 1, and the propensity still
carries VW's own exploration probability, which MTR needs to stay unbiased. (VW's text CB label has no
weight field either.)

Persistence. VW saves only to files; since 9.0 a saved model carries the resume state (weights, AdaGrad
sums, the explore counters), so restoring it learns on exactly as the original would. The model and its
options travel together: VW rejects a different `--random_seed` and silently replaces saved interactions
with new ones, so `restore` adopts the snapshot's options.
"""

from __future__ import annotations

import base64
import math
import tempfile
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
from vowpalwabbit import Workspace

from policies.base import (
    MAX_IMPORTANCE_WEIGHT,
    Arm,
    Choice,
    Context,
    Feedback,
    HistoryPrompt,
    Policy,
    PolicyError,
    importance_weight,
    registry,
)

MIN_PROBABILITY = 1e-3  # floor on every arm's probability, so logged propensities stay usable


@cache
def _embedding_template(dim: int) -> str:
    """'0:%.6g 1:%.6g ...': one `%` format of the whole vector is ~2x faster than formatting each."""
    return " ".join(f"{i}:%.6g" for i in range(dim))


def _shared_line(context: Context) -> str:
    """The query: the embedding scaled by 1/sqrt(dim), the length scaled to ~0..1 (see Updates above)."""
    dim = len(context.embedding)
    embedding = _embedding_template(dim) % tuple(np.asarray(context.embedding).tolist())
    tokens = math.log1p(max(context.prompt_tokens, 0)) / 10
    return f"shared |e:{1 / math.sqrt(dim):.6g} {embedding} |p tokens:{tokens:.6g}"


def _action_lines(context: Context) -> list[str]:
    """One line per arm; names are percent-encoded because VW's text format splits on space, ':' and '|'.

    The price is log(1 + predicted micro-USD) relative to the candidates' mean: centred, it cannot act as
    a second intercept shared by all arms, which blurs the backend ids and the penalty's weight."""
    prices = [math.log1p(max(arm.predicted_cost_usd, 0.0) * 1e6) for arm in context.arms]
    mean = sum(prices) / len(prices)
    return [
        f"|a id={quote(arm.name, safe='')} price:{price - mean:.6g} penalty:{context.penalty(arm):.6g}"
        for arm, price in zip(context.arms, prices)
    ]


@registry.register
class VowpalWabbitPolicy(Policy):
    name = "vw"
    maturity = "supported"

    def __init__(
        self,
        seed: int | None = None,
        exploration: Literal["squarecb", "epsilon"] = "squarecb",
        epsilon: float = 0.05,
        gamma_scale: float = 10.0,
        learning_rate: float = 0.5,
        quadratic: bool = True,
        max_importance_weight: float = 1.0,
        warm_passes: int = 2,
    ) -> None:
        if exploration not in ("squarecb", "epsilon"):
            raise PolicyError(f"exploration must be 'squarecb' or 'epsilon', got {exploration!r}")
        if not 0.0 <= epsilon <= 1.0:
            raise PolicyError(f"epsilon must be in [0, 1], got {epsilon}")
        if not (gamma_scale > 0 and math.isfinite(gamma_scale)):
            raise PolicyError(f"gamma_scale must be > 0, got {gamma_scale}")
        if not (learning_rate > 0 and math.isfinite(learning_rate)):
            raise PolicyError(f"learning_rate must be > 0, got {learning_rate}")
        if not isinstance(quadratic, bool):
            raise PolicyError(f"quadratic must be true or false, got {quadratic!r}")
        if not 0.1 <= max_importance_weight <= MAX_IMPORTANCE_WEIGHT:
            raise PolicyError(f"max_importance_weight must be in [0.1, {MAX_IMPORTANCE_WEIGHT:g}], got {max_importance_weight}")
        if isinstance(warm_passes, bool) or not isinstance(warm_passes, int) or warm_passes < 0:
            raise PolicyError(f"warm_passes must be a non-negative integer, got {warm_passes!r}")
        super().__init__(seed)
        self.warm_passes = warm_passes
        self.options: dict[str, Any] = {
            "exploration": exploration,
            "epsilon": float(epsilon),
            "gamma_scale": float(gamma_scale),
            "learning_rate": float(learning_rate),
            "quadratic": quadratic,
            "max_importance_weight": float(max_importance_weight),
            "random_seed": (seed or 0) % 2**31,
        }
        self._learned = 0
        self._vw = self._workspace()

    def _arguments(self) -> list[str]:
        o = self.options
        args = ["--cb_explore_adf", "--quiet", "--random_seed", str(o["random_seed"]), "--adaptive", "--invariant"]
        args += ["--learning_rate", str(o["learning_rate"])]
        if o["exploration"] == "squarecb":
            args += ["--squarecb", "--gamma_scale", str(o["gamma_scale"])]
        else:
            args += ["--epsilon", str(o["epsilon"])]
        if o["quadratic"]:
            args += ["-q", "ea", "-q", "pa"]
        return args

    def _workspace(self, model: Path | None = None) -> Workspace:
        return Workspace(arg_list=self._arguments() + (["--initial_regressor", str(model)] if model else []))

    def _choose(self, context: Context) -> Choice:
        examples = self._vw.parse([_shared_line(context), *_action_lines(context)])
        pmf = self._vw.predict(examples)  # in action order
        # each action's regression output: its predicted cost, which the exploration acts on
        costs = [example.get_partial_prediction() for example in examples[1:]]
        self._vw.finish_example(examples)
        floored = [max(p, MIN_PROBABILITY) for p in pmf]
        total = sum(floored)
        probabilities = {arm.name: p / total for arm, p in zip(context.arms, floored)}
        arm = self._rng.choices(list(probabilities), weights=list(probabilities.values()))[0]
        # scores: the predicted utility, reward - lambda * cost (VW's predicted cost, negated)
        return Choice(arm=arm, probabilities=probabilities, scores={a.name: -c for a, c in zip(context.arms, costs)})

    def _learn(self, feedback: Feedback) -> None:
        names = feedback.context.arm_names
        if feedback.arm not in names:  # the decision's candidates don't hold the arm: no action to label
            return
        # the labelled line goes last, the only position where VW keeps its probability (see Label above)
        actions = _action_lines(feedback.context)
        chosen = actions.pop(names.index(feedback.arm))
        weight = min(self.options.get("max_importance_weight", MAX_IMPORTANCE_WEIGHT), importance_weight(feedback.propensity, len(names)))
        probability = 1.0 / (len(names) * weight)  # in (0, 1]
        labelled = f"0:{-feedback.utility:.9g}:{probability:.9g} {chosen}"
        examples = self._vw.parse([_shared_line(feedback.context), *actions, labelled])
        self._vw.learn(examples)
        self._vw.finish_example(examples)
        self._learned += 1

    def _warm_start(self, history: list[HistoryPrompt]) -> int:
        """`warm_passes` passes over imported history: on every prompt, every backend's outcome is one
        labelled example, logged as if by a uniform router (propensity 1/K, importance weight 1), with the
        prompt's costs as the backends' predicted costs where the history has them."""
        for _ in range(self.warm_passes):
            for prompt in history:
                costs = prompt.costs or {}
                arms = tuple(Arm(name, 0.0, 0.0, costs.get(name, 0.0)) for name in prompt.qualities)
                context = Context(prompt.embedding, prompt.prompt_tokens, arms)
                for name, quality in prompt.qualities.items():
                    self._learn(Feedback(context, name, quality, 1.0 / len(arms)))
        return len(history) if self.warm_passes else 0

    def _snapshot(self) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.vw"
            self._vw.save(path)
            model = base64.b64encode(path.read_bytes()).decode("ascii")
        return {"options": self.options, "learned": self._learned, "model": model}

    def _restore(self, state: dict[str, Any]) -> None:
        self.options = dict(state["options"])
        self._learned = state["learned"]
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "model.vw"
            path.write_bytes(base64.b64decode(state["model"]))
            self._vw = self._workspace(path)

    def _internals(self) -> dict[str, Any]:
        return {
            "arguments": self._vw.get_arguments().strip(),
            "exploration": self.options["exploration"],
            "options": self.options,
            "examples_learned": self._learned,
        }
