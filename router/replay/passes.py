"""Online replay passes through the engine the service runs, built by `router.engine.build_engine`.

Each step the engine sees a prompt (its cached embedding), recalls neighbours, predicts costs, applies the
config's per-request cap and budget pacing, lets the policy choose (while shadow policies score the same
context, with `shadows`), and is then told only the chosen model's recorded quality and cost (bandit
feedback): a policy never sees an outcome it did not choose. One pass per seed, in the order
`default_rng(seed).permutation(n)`, with the engine's policies seeded with that seed.

Nothing here imports the peer libraries (`router.replay.peers` imports this module, not the reverse).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies import PREDICTED_POLICIES, HistoryPrompt, registry
from router.config import BudgetConfig, RouterConfig, load_config
from router.engine import build_engine
from router.progress import ticking
from router.replay.data import Dataset, output_tokens


@dataclass
class PassResult:
    """What one pass measured, in stream order. `routed` holds the dataset indices of the measured prompts
    (the whole shuffled stream, or the part after the history with `--train-fraction`)."""

    qualities: np.ndarray
    costs: np.ndarray
    decision_ms: np.ndarray
    choices: list[str]
    routed: np.ndarray

    @property
    def half(self) -> int:
        """Where the second half of the measured stream starts (`mean_quality_second_half`)."""
        return len(self.qualities) // 2

    @property
    def second_half(self) -> np.ndarray:
        return self.routed[self.half:]


@dataclass(frozen=True)
class TrainFraction:
    """`--train-fraction`: the first `fraction` of each shuffled stream is history, the rest is routed.

    Predictor policies train on the history with every model's outcome (as `llm-router import` gives
    them); bandits learn from it online with bandit feedback, unmeasured. Only the rest is measured.
    """

    fraction: float
    settings: Any = None  # router.predictors.TrainSettings; None: their defaults


def replay_config(config: RouterConfig | None = None, budget_usd: float | None = None) -> RouterConfig:
    """The config a replay runs: `config` (default: the embedded defaults, without environment
    overrides), with `budget_usd` (when given) as its per-query target in place of any target it sets."""
    config = config or load_config(None, environ={})
    if budget_usd is None:
        return config
    budget = BudgetConfig.model_validate(
        {**config.budget.model_dump(), "target_usd_per_query": budget_usd, "target_usd_per_hour": 0.0}
    )
    return config.model_copy(update={"budget": budget})


def budget_fields(config: RouterConfig) -> dict[str, Any]:
    """The report's budget: `budget_usd` (the per-query target, or None) and the hourly target when set."""
    fields: dict[str, Any] = {"budget_usd": config.budget.target_usd_per_query or None}
    if config.budget.target_usd_per_hour:
        fields["budget_usd_per_hour"] = config.budget.target_usd_per_hour
    return fields


def budgeted(config: RouterConfig) -> bool:
    return bool(config.budget.target_usd_per_query or config.budget.target_usd_per_hour)


def shadow_names(config: RouterConfig, policy: str) -> list[str]:
    """The config's other policies, which score every decision as shadows (`--shadows`)."""
    return [p for p in config.policy_names if p != policy]


def select_policies(spec: str, with_history: bool) -> tuple[list[str], list[str]]:
    """`--policy`: one name, a comma-separated list, or `all`. Returns (policies, skipped).

    `all` without a history part (`--train-fraction`) skips the predictor policies: without trained
    predictors they only run their fallback bandit, and their rows would repeat it.
    """
    known = registry.names()
    if spec.strip() == "all":
        if with_history:
            return known, []
        return [p for p in known if p not in PREDICTED_POLICIES], [p for p in known if p in PREDICTED_POLICIES]
    names = list(dict.fromkeys(p.strip() for p in spec.split(",") if p.strip()))
    unknown = [p for p in names if p not in known] or ([] if names else [spec])
    if unknown:
        raise ValueError(f"unknown policy {unknown[0]!r}; known: {known} or 'all'")
    return names, []


_PREDICTED: dict[tuple, list[Any]] = {}  # (dataset, policy, seed, split, settings) -> predictions: a sweep trains once


def _predictions(dataset: Dataset, order: list[int], split: int, policy: str, seed: int, train: TrainFraction,
                 config: RouterConfig, vectors: np.ndarray | None = None) -> list[Any]:
    """Train the policy's predictor on the history part and predict every routed prompt (in one batch);
    the same training is reused by the passes of a budget sweep."""
    key = (dataset.name, tuple(dataset.model_names), len(dataset.prompts), policy, seed, split, repr(train.settings),
           config.predictors.model_dump_json(), None if vectors is None else vectors.shape)
    if key not in _PREDICTED:
        if len(_PREDICTED) >= 64:
            _PREDICTED.pop(next(iter(_PREDICTED)))
        if policy == "mf":
            _PREDICTED[key] = _train_and_predict_mf(dataset, vectors, order, split, seed)
        else:
            _PREDICTED[key] = _train_and_predict(dataset, order, split, policy, seed, train, config)
    return _PREDICTED[key]


def _train_and_predict_mf(dataset: Dataset, vectors: np.ndarray | None, order: list[int], split: int, seed: int) -> list[Any]:
    """RouteLLM's matrix factorisation on the history part (every model's outcome per prompt, on the
    prompts' cached embeddings, as the service has them), then its estimates for every routed prompt."""
    from policies import Predictions
    from router.predictors.mf import MfSample, MfSettings, train_mf

    if vectors is None:
        raise ValueError("mf needs the prompts' embeddings")
    history = [
        MfSample(vectors[i], {m: dataset.prompts[i].outcomes[m].quality for m in dataset.model_names}, (), float(position))
        for position, i in enumerate(order[:split])
    ]
    model = train_mf(history, dataset.model_names, MfSettings(seed=seed)).predictor
    return [Predictions(mf_quality=row) for row in model.quality(vectors[order[split:]])]


def _train_and_predict(dataset: Dataset, order: list[int], split: int, policy: str, seed: int, train: TrainFraction,
                       config: RouterConfig) -> list[Any]:
    from policies import Predictions
    from router.predictors import Outcome as Observed
    from router.predictors import TrainSettings, train_forc, train_hybrid

    prices = {m.name: m for m in dataset.models}
    history = [
        Observed(dataset.prompts[i].prompt, name, o.quality, round(output_tokens(o, dataset.prompts[i], prices[name])), float(position))
        for position, i in enumerate(order[:split])
        for name, o in dataset.prompts[i].outcomes.items()
        if name in prices
    ]
    settings = (train.settings or TrainSettings()).model_copy(update={"seed": seed})
    texts = [dataset.prompts[i].prompt for i in order[split:]]
    if policy == "forc":
        forc = train_forc(history, dataset.model_names, settings).predictor
        return [
            Predictions(quality={b: p.quality for b, p in row.items()}, output_tokens={b: p.output_tokens for b, p in row.items()})
            for row in forc.predict(texts)
        ]
    # The pair Hybrid-LLM is meant for: the cheapest model, and the best one on the history.
    small = min(dataset.models, key=lambda m: (m.price_per_1m_output_tokens_usd, m.price_per_1m_input_tokens_usd)).name
    known = [o for o in history if o.backend != small]
    large = max({o.backend for o in known}, key=lambda b: sum(o.quality for o in known if o.backend == b) / sum(o.backend == b for o in known))
    p = config.predictors
    hybrid = train_hybrid(history, small, large, p.hybrid_tolerance, p.target_large_share, settings).predictor
    return [Predictions(small_ok=q, small=small, large=large, threshold=hybrid.threshold) for q in hybrid.prob_small_ok(texts)]


def replay_pass(
    dataset: Dataset,
    vectors: np.ndarray,
    policy: str,
    seed: int,
    config: RouterConfig | None = None,
    *,
    budget_usd: float | None = None,
    shadows: bool = False,
    train: TrainFraction | None = None,
    warm_start: bool = False,
) -> PassResult:
    """One online pass in a seed-shuffled order with bandit feedback only (measured after the history
    part when `train` is given), through the engine `build_engine` makes from `config`: its budget
    (targets, lambda, pacing step, carry-over), per-request cap, neighbours and policy options.
    `budget_usd` overrides the config's target; `shadows` also runs the config's other policies as
    shadows, so the decision time includes their scoring, as in the service. `warm_start` (with `train`):
    the history part is imported history instead: every policy warm-starts from it (every model's outcome
    per prompt, `Policy.warm_start`) and routing starts after it, so "cold" (the default: the bandits learn
    the history online with bandit feedback) and "warm" route the same prompts."""
    config = replay_config(config, budget_usd)
    order = np.random.default_rng(seed).permutation(len(dataset.prompts))
    split = round(len(order) * train.fraction) if train else 0
    predicted = (
        _predictions(dataset, order.tolist(), split, policy, seed, train, config, vectors)
        if train and policy in PREDICTED_POLICIES else None
    )
    names = [policy, *shadow_names(config, policy)] if shadows else [policy]
    engine = build_engine(config, vectors.shape[1], policies=names, active=policy, seed=seed)
    start = 0
    if warm_start and train:
        history = [
            HistoryPrompt(vectors[i], dataset.prompts[i].prompt_tokens,
                          {m: dataset.prompts[i].outcomes[m].quality for m in dataset.model_names},
                          {m: dataset.prompts[i].outcomes[m].cost_usd for m in dataset.model_names})
            for i in order[:split].tolist()
        ]
        for member in engine.policies.values():
            member.warm_start(history)
        start = split
    cap = config.budget.default_max_cost_usd or None
    prices = {m.name: m for m in dataset.models}
    qualities, costs, timings, choices = [], [], [], []
    label = f"{policy}, seed {seed}" + (f", budget ${budget_usd:g}" if budget_usd is not None else "")
    for step, index in enumerate(ticking(order.tolist(), label)):
        if step < start:  # warm-started from it instead
            continue
        prompt = dataset.prompts[index]
        predictions = predicted[step - split] if predicted is not None and step >= split else None
        started = time.perf_counter()
        record = engine.decide(f"r{step}", step, vectors[index], prompt.prompt_tokens, dataset.models,
                               max_cost_usd=cap, predictions=predictions)
        elapsed_ms = (time.perf_counter() - started) * 1000
        arm = record.chosen
        outcome = prompt.outcomes[arm]
        engine.record_outcome(record.decision_id, arm, outcome.cost_usd, output_tokens(outcome, prompt, prices[arm]))
        engine.learn(record, vectors[index], outcome.quality, outcome.cost_usd)
        if step < split:  # history: learned from, not measured
            continue
        timings.append(elapsed_ms)
        qualities.append(outcome.quality)
        costs.append(outcome.cost_usd)
        choices.append(arm)
    return PassResult(np.array(qualities), np.array(costs), np.array(timings), choices, order[split:])
