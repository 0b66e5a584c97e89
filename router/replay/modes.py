"""Replay of the answer-aware modes (`llm-router replay --mode cascade|parallel`) from recorded answers.

One pass per seed in the order `default_rng(seed).permutation(n)`, as for single-call policies. With a
history part (`--train-fraction F`), the first F of the stream is history: the answer scorer trains on it
with every model's answer and quality, the cascade learns its order from it, and the engine's policy
learns from it online with bandit feedback (one call per prompt, as in `route`). The rest is routed and
measured; every call a mode makes is paid.

- `parallel`: the engine decides (`router.engine.build_engine`, the same engine as the service); the k
  backends are its choice and the next k-1 by the policy's scores (`record.fallbacks`); the selector
  delivers the answer it scores highest (ties: the earlier call). Quality is the delivered answer's
  recorded quality, cost the sum of the k calls (the budget's pacing sees that sum); the policy learns the
  delivered backend's quality and own cost, the other answers are not rewarded.
- `cascade`: backends on the history's cost-quality frontier (by mean cost and mean quality: each one
  better than every cheaper one), cheapest first; of the chains along it that end at its best backend
  (at most `cascade_max_calls` long), the one whose threshold sweep has the highest AIQ on calibration
  prompts (the history prompts the scorer validated on: scores it did not train on). Each routed prompt
  calls down the chain, scores each answer and stops at the first scored >= the threshold; it delivers the
  best-scored answer seen and pays every call. The threshold is the knob: the config's
  `modes.cascade_threshold`, or, with a budget, the largest threshold whose mean cost on the calibration
  prompts is within it; `--budgets` sweeps it into a cost-quality curve and AIQ. The cascade is fixed
  after the history (no online learning in the replay).

Selectors: `scorer` (the trained cross-encoder, `router.predictors.scorer`), `agreement` (the answer
most similar to the others by cosine of the replay embedder's embeddings: training-free, parallel only,
undecided between two answers), `length` (longer is better). The report says which one delivered and
what each reaches on the same stream.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from policies import PREDICTED_POLICIES
from router.config import RouterConfig
from router.engine import build_engine
from router.evaluation import aiq, auc, upper_hull
from router.modes import agreement
from router.progress import ticking
from router.replay.data import Dataset, load_answers, output_tokens
from router.replay.passes import PassResult, TrainFraction, replay_config

MODES = ("cascade", "parallel")
THRESHOLDS = tuple(round(t, 2) for t in np.linspace(0.0, 1.0, 21)) + (1.01,)  # 1.01: never stop early
SCORER_CACHE_VERSION = 2  # bump when the scorer's training changes, to retrain cached models


@dataclass
class ModePassResult(PassResult):
    """A pass of a mode: per routed prompt, also the calls made and the best quality among them."""

    calls: np.ndarray = field(default_factory=lambda: np.zeros(0))
    called_best: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the best quality among the answers paid for
    first: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the first call's quality (what route would deliver)
    called: list[list[str]] = field(default_factory=list)  # the backends called, in order


@dataclass
class Scorers:
    """One seed's selectors, with score caches keyed by (prompt index, model). With `scores_file` (beside a
    cached scorer), the trained scorer's scores persist by content (query and answer), so another run of
    the same scorer does not score an answer twice."""

    dataset: Dataset
    answers: list[dict[str, str]]
    embedder: Any
    trained: Any = None  # router.predictors.AnswerScorer, or None
    training: dict[str, Any] | None = None
    calibration: list[int] = field(default_factory=list)  # history prompts the scorer did not train on
    _scores: dict[tuple[int, str], float] = field(default_factory=dict)
    _vectors: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    scorer_seconds: float = 0.0
    scored: int = 0
    scores_file: Path | None = None
    _persisted: dict[str, float] | None = None

    def _key(self, index: int, model: str) -> str:
        text = f"{self.dataset.prompts[index].prompt}\x1f{model}\x1f{self.answers[index][model]}"
        return hashlib.sha1(text.encode()).hexdigest()[:20]

    def _stored(self) -> dict[str, float]:
        if self._persisted is None:
            found = self.scores_file is not None and self.scores_file.is_file()
            self._persisted = json.loads(self.scores_file.read_text()) if found else {}  # type: ignore[union-attr]
        return self._persisted

    def save(self) -> None:
        """Write the persisted scores (atomically) when there is a file for them."""
        if self.scores_file is None or self._persisted is None:
            return
        partial = self.scores_file.with_suffix(".partial")
        partial.write_text(json.dumps(self._persisted))
        partial.replace(self.scores_file)

    @property
    def names(self) -> list[str]:
        return (["scorer"] if self.trained is not None else []) + ["agreement", "length"]

    def prefetch(self, pairs: Sequence[tuple[int, str]]) -> None:
        """Score the trained scorer's missing (prompt, model) pairs in one batched pass."""
        missing = list(dict.fromkeys(pair for pair in pairs if pair not in self._scores))
        if self.trained is None or not missing:
            return
        stored = self._stored()
        for pair in missing:
            if (key := self._key(*pair)) in stored:
                self._scores[pair] = stored[key]
        missing = [pair for pair in missing if pair not in self._scores]
        if not missing:
            return
        started = time.perf_counter()
        values = self.trained.score_pairs([self.dataset.prompts[i].prompt for i, _ in missing],
                                          [self.answers[i][m] for i, m in missing], [m for _, m in missing])
        self.scorer_seconds += time.perf_counter() - started
        self.scored += len(missing)
        self._scores.update(zip(missing, values))
        stored.update({self._key(*pair): value for pair, value in zip(missing, values)})

    def score(self, selector: str, index: int, models: Sequence[str]) -> list[float]:
        if selector == "scorer":
            self.prefetch([(index, m) for m in models])
            return [self._scores[(index, m)] for m in models]
        if selector == "length":
            from router.predictors import length_scores

            return length_scores([self.answers[index][m] for m in models])
        if selector == "agreement":
            missing = [m for m in models if (index, m) not in self._vectors]
            if missing:
                vectors = self.embedder.embed([self.answers[index][m] for m in missing])
                self._vectors.update({(index, m): v for m, v in zip(missing, vectors)})
            return agreement([self.answers[index][m] for m in models], np.stack([self._vectors[(index, m)] for m in models]))
        raise ValueError(f"unknown selector {selector!r}")


def _pick(scores: Sequence[float]) -> int:
    """The highest score; ties go to the earlier call."""
    return int(np.argmax(np.asarray(scores)))


# -- the scorer on the history part ------------------------------------------------------------------


def train_history_scorer(dataset: Dataset, answers: list[dict[str, str]], history: list[int], seed: int,
                         train: TrainFraction, cache_dir: Path | None) -> tuple[Any, dict[str, Any], list[int]]:
    """The answer scorer trained on the history prompts (every model's answer and quality, at their place in
    the stream); cached on disk by content, settings and seed. Returns (scorer, training facts, the history
    prompts it validated on)."""
    from router.predictors import AnswerSample, AnswerScorer, TrainSettings, train_scorer

    settings = (train.settings or TrainSettings()).model_copy(update={"seed": seed})
    digest = hashlib.sha256(json.dumps([SCORER_CACHE_VERSION, settings.model_dump(exclude={"threads"}), dataset.model_names]).encode())
    for i in history:
        digest.update(dataset.prompts[i].prompt.encode() + b"\x1e")
        for name in dataset.model_names:
            digest.update(f"{dataset.prompts[i].outcomes[name].quality!r}\x1f".encode() + answers[i][name].encode() + b"\x1e")
    folder = cache_dir / digest.hexdigest()[:24] if cache_dir is not None else None
    if folder is not None and (folder / "training.json").is_file():
        try:
            facts = json.loads((folder / "training.json").read_text())
            return AnswerScorer.load(folder), facts | {"cached": True, "folder": str(folder)}, facts["calibration"]
        except Exception:  # noqa: BLE001 - a stale or broken cache entry is trained again
            shutil.rmtree(folder, ignore_errors=True)
    samples = [
        AnswerSample(dataset.prompts[i].prompt, name, answers[i][name], dataset.prompts[i].outcomes[name].quality, float(position))
        for position, i in enumerate(history)
        for name in dataset.model_names
    ]
    result = train_scorer(samples, settings)
    validated = {sample.prompt for sample in result.validation}
    calibration = [i for i in history if dataset.prompts[i].prompt in validated]
    facts = {
        "samples": result.samples.model_dump(), "validation_loss": result.validation_loss, "baseline_loss": result.baseline_loss,
        "validation_metric": "mean selection regret (best quality - quality of the top-scored answer) over the validation prompts",
        "duration_s": result.duration_s, "backbone": result.backbone, "calibration": calibration,
    }
    if folder is not None:
        scratch = folder.with_name(folder.name + ".partial")
        shutil.rmtree(scratch, ignore_errors=True)
        result.predictor.save(scratch)
        (scratch / "training.json").write_text(json.dumps(facts))
        if not folder.exists():
            scratch.rename(folder)
    return result.predictor, facts | {"cached": False, "folder": str(folder) if folder else None}, calibration


# -- parallel -----------------------------------------------------------------------------------------


def parallel_pass(dataset: Dataset, vectors: np.ndarray, policy: str, seed: int, k: int, selector: str, scorers: Scorers,
                  config: RouterConfig, split: int, budget_usd: float | None = None,
                  predicted: list[Any] | None = None) -> ModePassResult:
    """One online pass: history with one call per prompt, then k calls per routed prompt and a selection."""
    config = replay_config(config, budget_usd)
    order = np.random.default_rng(seed).permutation(len(dataset.prompts))
    engine = build_engine(config, vectors.shape[1], policies=[policy], active=policy, seed=seed)
    cap = config.budget.default_max_cost_usd or None
    prices = {m.name: m for m in dataset.models}
    qualities, costs, timings, choices, calls, best, first, made = [], [], [], [], [], [], [], []
    for step, index in enumerate(ticking(order.tolist(), f"parallel {policy}, seed {seed}")):
        prompt = dataset.prompts[index]
        predictions = predicted[step - split] if predicted is not None and step >= split else None
        started = time.perf_counter()
        record = engine.decide(f"r{step}", step, vectors[index], prompt.prompt_tokens, dataset.models,
                               max_cost_usd=cap, predictions=predictions)
        elapsed_ms = (time.perf_counter() - started) * 1000
        called = [record.chosen] if step < split else [record.chosen, *record.fallbacks[: k - 1]]
        delivered = called[_pick(scorers.score(selector, index, called))] if len(called) > 1 else called[0]
        outcome = prompt.outcomes[delivered]
        paid = sum(prompt.outcomes[m].cost_usd for m in called)
        record.backend = delivered
        engine.record_outcome(record.decision_id, delivered, paid, output_tokens(outcome, prompt, prices[delivered]))
        engine.learn(record, vectors[index], outcome.quality, outcome.cost_usd)
        if step < split:
            continue
        timings.append(elapsed_ms)
        qualities.append(outcome.quality)
        costs.append(paid)
        choices.append(delivered)
        calls.append(len(called))
        best.append(max(prompt.outcomes[m].quality for m in called))
        first.append(prompt.outcomes[called[0]].quality)
        made.append(called)
    return ModePassResult(np.array(qualities), np.array(costs), np.array(timings), choices, order[split:],
                          calls=np.array(calls, dtype=float), called_best=np.array(best), first=np.array(first), called=made)


# -- cascade ------------------------------------------------------------------------------------------


def frontier(dataset: Dataset, prompts: Sequence[int]) -> list[str]:
    """Backends on the upper-left cost-quality frontier of `prompts` (mean cost, mean quality), cheapest first:
    each one has a higher mean quality than every cheaper one."""
    stats = sorted(
        (float(np.mean([dataset.prompts[i].outcomes[m].cost_usd for i in prompts])),
         -float(np.mean([dataset.prompts[i].outcomes[m].quality for i in prompts])), m)
        for m in dataset.model_names
    )
    chain, best = [], -np.inf
    for _, negative_quality, name in stats:
        if -negative_quality > best:
            chain.append(name)
            best = -negative_quality
    return chain


def chains(on_frontier: list[str], max_calls: int) -> list[list[str]]:
    """Sub-chains of the frontier (in its order) that end at its best backend, at most `max_calls` long."""
    *cheaper, top = on_frontier
    found: list[list[str]] = []
    for mask in range(1 << len(cheaper)):
        chosen = [m for bit, m in enumerate(cheaper) if mask >> bit & 1]
        if len(chosen) + 1 <= max_calls:
            found.append([*chosen, top])
    return sorted(found, key=lambda c: (len(c), c))


@dataclass(frozen=True)
class CascadeOutcome:
    quality: float
    cost: float
    calls: int
    delivered: str
    called_best: float
    first: float
    called: list[str]


def cascade_one(dataset: Dataset, index: int, chain: Sequence[str], scores: Sequence[float], threshold: float) -> CascadeOutcome:
    """Call down `chain` (with the scores its answers get) until one scores >= threshold; deliver the best seen."""
    prompt = dataset.prompts[index]
    made = len(chain)
    for position, value in enumerate(scores):
        if value >= threshold:
            made = position + 1
            break
    called = list(chain[:made])
    delivered = called[_pick(list(scores[:made]))]
    return CascadeOutcome(
        quality=prompt.outcomes[delivered].quality, cost=sum(prompt.outcomes[m].cost_usd for m in called), calls=made,
        delivered=delivered, called_best=max(prompt.outcomes[m].quality for m in called), first=prompt.outcomes[called[0]].quality,
        called=called,
    )


def cascade_curve(dataset: Dataset, prompts: Sequence[int], chain: Sequence[str], scores: dict[int, list[float]],
                  thresholds: Sequence[float] = THRESHOLDS) -> list[dict[str, float]]:
    points = []
    for threshold in thresholds:
        results = [cascade_one(dataset, i, chain, scores[i], threshold) for i in prompts]
        points.append({"threshold": float(threshold), "mean_cost_usd": float(np.mean([r.cost for r in results])),
                       "mean_quality": float(np.mean([r.quality for r in results])),
                       "calls_per_prompt": float(np.mean([r.calls for r in results]))})
    return points


def learn_cascade(dataset: Dataset, history: list[int], calibration: list[int], scorers: Scorers, selector: str,
                  max_calls: int) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """(frontier, chosen chain, each candidate chain's AIQ on the calibration prompts)."""
    on_frontier = frontier(dataset, history)
    candidates = chains(on_frontier, max_calls)
    if selector == "scorer":
        scorers.prefetch([(i, m) for i in calibration for m in on_frontier])
    scores = {i: scorers.score(selector, i, on_frontier) for i in calibration}
    curves = []
    for chain in candidates:
        positions = [on_frontier.index(m) for m in chain]
        curve = cascade_curve(dataset, calibration, chain, {i: [scores[i][p] for p in positions] for i in calibration})
        curves.append((chain, curve))
    max_cost = max(point["mean_cost_usd"] for _, curve in curves for point in curve)
    ranked = [{"chain": chain, "aiq": aiq([(p["mean_cost_usd"], p["mean_quality"]) for p in curve], max_cost)} for chain, curve in curves]
    best = max(ranked, key=lambda r: r["aiq"])
    return on_frontier, best["chain"], ranked


def threshold_for_budget(curve: list[dict[str, float]], budget_usd: float) -> float:
    """The largest threshold whose mean cost on the calibration prompts is within `budget_usd` (the lowest if none)."""
    within = [p["threshold"] for p in curve if p["mean_cost_usd"] <= budget_usd]
    return max(within) if within else min(p["threshold"] for p in curve)


def cascade_pass(dataset: Dataset, seed: int, chain: Sequence[str], scores: dict[int, list[float]], threshold: float,
                 split: int) -> ModePassResult:
    order = np.random.default_rng(seed).permutation(len(dataset.prompts))
    routed = order[split:]
    results, timings = [], []
    for i in routed.tolist():
        started = time.perf_counter()
        results.append(cascade_one(dataset, i, chain, scores[i], threshold))
        timings.append((time.perf_counter() - started) * 1000)
    return ModePassResult(
        np.array([r.quality for r in results]), np.array([r.cost for r in results]), np.array(timings),
        [r.delivered for r in results], routed, calls=np.array([r.calls for r in results], dtype=float),
        called_best=np.array([r.called_best for r in results]), first=np.array([r.first for r in results]),
        called=[r.called for r in results],
    )


def stop_signal(dataset: Dataset, prompts: Sequence[int], chain: Sequence[str], scores: dict[int, list[float]]) -> dict[str, Any]:
    """How well the first answer's score tells when to stop, on `prompts`: the AUC of that score for "the first
    answer is at least as good as the last backend's" (0.5: no better than chance), and the threshold sweep a
    perfect absolute scorer would reach (each answer scored by its recorded quality): the bound on what a
    better scorer can buy a cascade that sees only the answers it has paid for."""
    first = np.array([scores[i][0] for i in prompts])
    qualities = np.array([[dataset.prompts[i].outcomes[m].quality for m in chain] for i in prompts])
    return {"auc_first_at_least_last": auc(first, qualities[:, 0] >= qualities[:, -1]),
            "perfect_scorer_sweep": cascade_curve(dataset, prompts, chain, {i: q.tolist() for i, q in zip(prompts, qualities)})}


# -- the evaluation -----------------------------------------------------------------------------------


@dataclass
class ModeSettings:
    mode: str
    k: int
    threshold: float
    max_calls: int


def _summary(passes: list[ModePassResult]) -> dict[str, float]:
    return {
        "mean_quality": float(np.mean([p.qualities.mean() for p in passes])),
        "mean_cost_usd": float(np.mean([p.costs.mean() for p in passes])),
        "calls_per_prompt": float(np.mean([p.calls.mean() for p in passes])),
        "best_of_calls_quality": float(np.mean([p.called_best.mean() for p in passes])),
        "first_call_quality": float(np.mean([p.first.mean() for p in passes])),
    }


def single_models(dataset: Dataset, passes: list[ModePassResult], max_cost: float) -> dict[str, Any]:
    """Each model alone over the measured prompts, and the AIQ of their hull (any mix of single models)."""
    rows = [i for p in passes for i in p.routed.tolist()]
    points = {m: (float(np.mean([dataset.prompts[i].outcomes[m].cost_usd for i in rows])),
                  float(np.mean([dataset.prompts[i].outcomes[m].quality for i in rows]))) for m in dataset.model_names}
    return {
        "models": {m: {"quality": q, "cost_usd": c} for m, (c, q) in points.items()},
        "hull": [m for m in dataset.model_names if points[m] in upper_hull(list(points.values()))],
        "aiq": aiq(list(points.values()), max_cost),
    }


class ModeEvaluation:
    """Runs a mode over one dataset for every seed: scorer training, passes, comparisons, sweeps."""

    def __init__(self, data: str | Path, dataset: Dataset, vectors: np.ndarray, seeds: list[int], config: RouterConfig,
                 train: TrainFraction | None, embedder: Any, settings: ModeSettings, cache_dir: Path | None = None) -> None:
        if settings.mode not in MODES:
            raise ValueError(f"mode {settings.mode!r} cannot be replayed; replayable: route, {', '.join(MODES)}")
        if settings.mode == "cascade" and train is None:
            raise ValueError("--mode cascade needs --train-fraction: its order and its scorer come from the history part")
        self.dataset, self.vectors, self.seeds, self.config = dataset, vectors, seeds, replay_config(config)
        self.train, self.settings, self.cache_dir = train, settings, cache_dir
        self.answers = load_answers(data, dataset)
        self.embedder = embedder
        self._seeds: dict[int, Scorers] = {}

    def split(self) -> int:
        return round(len(self.dataset.prompts) * self.train.fraction) if self.train else 0

    def history(self, seed: int) -> list[int]:
        return np.random.default_rng(seed).permutation(len(self.dataset.prompts))[: self.split()].tolist()

    def scorers(self, seed: int) -> Scorers:
        if seed not in self._seeds:
            found = Scorers(self.dataset, self.answers, self.embedder)
            if self.train is not None:
                found.trained, found.training, found.calibration = train_history_scorer(
                    self.dataset, self.answers, self.history(seed), seed, self.train, self.cache_dir)
                if found.training.get("folder"):
                    found.scores_file = Path(found.training["folder"]) / "scores.json"
            self._seeds[seed] = found
        return self._seeds[seed]

    def selector(self) -> str:
        return "scorer" if self.train is not None else ("agreement" if self.settings.mode == "parallel" else "length")

    # parallel

    def _predictions(self, seed: int, policy: str) -> list[Any] | None:
        if self.train is None or policy not in PREDICTED_POLICIES:
            return None
        from router.replay.passes import _predictions

        order = np.random.default_rng(seed).permutation(len(self.dataset.prompts)).tolist()
        return _predictions(self.dataset, order, self.split(), policy, seed, self.train, self.config)

    def parallel(self, policy: str, selector: str, budget_usd: float | None = None) -> list[ModePassResult]:
        runs = []
        for seed in self.seeds:
            scorers = self.scorers(seed)
            runs.append(parallel_pass(self.dataset, self.vectors, policy, seed, self.settings.k, selector, scorers, self.config,
                                      self.split(), budget_usd, self._predictions(seed, policy)))
        return runs

    # cascade

    def cascade(self, selector: str, threshold: float | None = None, budget_usd: float | None = None
                ) -> tuple[list[ModePassResult], list[dict[str, Any]]]:
        """Passes at `threshold` (default: the config's, or the one calibrated to `budget_usd`), and per seed
        the learned chain, its threshold and the routed part's threshold sweep."""
        runs, learned = [], []
        split = self.split()
        for seed in self.seeds:
            scorers = self.scorers(seed)
            history = self.history(seed)
            calibration = scorers.calibration if selector == "scorer" else history
            on_frontier, chain, ranked = learn_cascade(self.dataset, history, calibration, scorers, selector, self.settings.max_calls)
            routed = np.random.default_rng(seed).permutation(len(self.dataset.prompts))[split:].tolist()
            if selector == "scorer":
                scorers.prefetch([(i, m) for i in routed for m in chain])
            scores = {i: scorers.score(selector, i, chain) for i in routed}
            chosen = threshold if threshold is not None else self.settings.threshold
            if budget_usd is not None:
                positions = [on_frontier.index(m) for m in chain]
                calibration_scores = {i: [scorers.score(selector, i, on_frontier)[p] for p in positions] for i in calibration}
                chosen = threshold_for_budget(cascade_curve(self.dataset, calibration, chain, calibration_scores), budget_usd)
            runs.append(cascade_pass(self.dataset, seed, chain, scores, chosen, split))
            learned.append({"seed": seed, "frontier": on_frontier, "chain": chain, "threshold": chosen,
                            "calibration_prompts": len(calibration), "chains": ranked,
                            "threshold_sweep": cascade_curve(self.dataset, routed, chain, scores),
                            "stop_signal": stop_signal(self.dataset, routed, chain, scores)})
        return runs, learned


def mode_report(evaluation: ModeEvaluation, policy: str, budget_usd: float | None, budgets: list[float] | None) -> dict[str, Any]:
    """The report of one mode (with `policy` deciding in parallel): the single-call report's fields over the
    routed part, plus `mode`, `calls_per_prompt`, the scorer used and what each selector reaches, the
    threshold or budget sweep, AIQ, and each single model over the same prompts."""
    from router.replay.report import report

    settings, config = evaluation.settings, replay_config(evaluation.config, budget_usd)
    selector = evaluation.selector()
    if settings.mode == "parallel":
        passes = evaluation.parallel(policy, selector, budget_usd)
        learned = None
    else:
        passes, learned = evaluation.cascade(selector, budget_usd=budget_usd)
    name = policy if settings.mode == "parallel" else "frontier"  # what picks the backends
    result = report(evaluation.dataset, name, evaluation.seeds, list(passes), config, evaluation.train, mode=settings.mode,
                    calls_per_prompt=float(np.mean([p.calls.mean() for p in passes])))
    result["mode_settings"] = ({"k": settings.k} if settings.mode == "parallel"
                               else {"threshold": settings.threshold if budget_usd is None else None, "max_calls": settings.max_calls})
    used = {"name": selector}
    if selector == "scorer":
        seeds = [evaluation.scorers(seed) for seed in evaluation.seeds]
        used |= {
            "kind": "cross-encoder (router.predictors.scorer)", "settings": json.loads(evaluation.train.settings.model_dump_json())
            if evaluation.train and evaluation.train.settings else None,
            "training": [{"seed": seed, **{k: v for k, v in s.training.items() if k not in ("calibration", "folder")}}
                         for seed, s in zip(evaluation.seeds, seeds)],
            "scored_answers": sum(s.scored for s in seeds),
            "ms_per_answer": (1000 * sum(s.scorer_seconds for s in seeds) / sum(s.scored for s in seeds)
                              if any(s.scored for s in seeds) else None),  # batched, this run's new scores only
        }
    result["scorer"] = used
    result["selection"] = _summary(passes)
    compared: dict[str, Any] = {}
    for other in evaluation.scorers(evaluation.seeds[0]).names:
        if settings.mode == "cascade" and other == "agreement":
            compared[other] = {"note": "not applicable: a cascade decides on its first answer alone"}
            continue
        if other == selector:
            compared[other] = _summary(passes)
        elif settings.mode == "parallel":
            compared[other] = _summary(evaluation.parallel(policy, other, budget_usd))
        else:
            compared[other] = _summary(evaluation.cascade(other, budget_usd=budget_usd)[0])
    result["selectors"] = compared
    if learned is not None:
        result["cascade"] = learned
        result["threshold_sweep"] = _mean_sweep([seed["threshold_sweep"] for seed in learned])
        signals = [seed["stop_signal"] for seed in learned]
        found = [s["auc_first_at_least_last"] for s in signals if s["auc_first_at_least_last"] is not None]
        result["stop_signal"] = {"auc_first_at_least_last": float(np.mean(found)) if found else None,
                                 "perfect_scorer_sweep": _mean_sweep([s["perfect_scorer_sweep"] for s in signals])}
    points: list[tuple[float, float]] = []
    if budgets:
        result["budget_sweep"] = []
        for budget in budgets:
            runs = (evaluation.parallel(policy, selector, budget) if settings.mode == "parallel"
                    else evaluation.cascade(selector, budget_usd=budget)[0])
            summary = _summary(runs)
            result["budget_sweep"].append({"budget_usd": budget, **summary})
        points = [(p["mean_cost_usd"], p["mean_quality"]) for p in result["budget_sweep"]]
        result["aiq_from"] = "budget_sweep"
    elif learned is not None:
        points = [(p["mean_cost_usd"], p["mean_quality"]) for p in result["threshold_sweep"]]
        result["aiq_from"] = "threshold_sweep"
    max_cost = max([c for c, _ in points] + [result["mean_cost_usd"]])
    if points:
        result["aiq"] = aiq(points, max_cost)
    result["aiq_max_cost_usd"] = max_cost
    result["single_models"] = single_models(evaluation.dataset, list(passes), max_cost)
    for seed in evaluation.seeds:
        evaluation.scorers(seed).save()
    return result


def _mean_sweep(sweeps: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per threshold, the mean over seeds of each field."""
    return [{key: float(np.mean([sweep[i][key] for sweep in sweeps])) for key in sweeps[0][i]} for i in range(len(sweeps[0]))]


def plot_mode(report: dict[str, Any], out: Path) -> Path | None:
    """`cost_quality.png`: the mode's sweep (budget or threshold) with its hull, its main point, and each single
    model over the same prompts (their hull: the best any mix of single calls reaches). None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 5))
    sweep = report.get("budget_sweep") or report.get("threshold_sweep") or []
    label = f"{report['mode']} ({report['scorer']['name']})"
    if sweep:
        points = [(p["mean_cost_usd"], p["mean_quality"]) for p in sweep]
        hull = upper_hull(points)
        line = axis.plot([x for x, _ in hull], [y for _, y in hull], label=f"{label}, AIQ {report.get('aiq', float('nan')):.3f}")
        axis.scatter([x for x, _ in points], [y for _, y in points], s=10, color=line[0].get_color())
    bound = (report.get("stop_signal") or {}).get("perfect_scorer_sweep")
    if bound:
        hull = upper_hull([(p["mean_cost_usd"], p["mean_quality"]) for p in bound])
        axis.plot([x for x, _ in hull], [y for _, y in hull], linestyle="--", color="green",
                  label="the same cascade with a perfect absolute scorer (bound)")
    axis.scatter([report["mean_cost_usd"]], [report["mean_quality"]], marker="*", s=120, color="red", label=f"{label}, main point")
    singles = report["single_models"]["models"]
    hull = upper_hull([(m["cost_usd"], m["quality"]) for m in singles.values()])
    axis.plot([x for x, _ in hull], [y for _, y in hull], color="grey", linestyle=":",
              label=f"single models' hull, AIQ {report['single_models']['aiq']:.3f}")
    for name, model in singles.items():
        axis.scatter([model["cost_usd"]], [model["quality"]], marker="x", color="black", s=14)
        axis.annotate(name, (model["cost_usd"], model["quality"]), fontsize=6)
    axis.set_xscale("log")
    axis.set(xlabel="mean cost per prompt (USD, every call)", ylabel="mean quality",
             title=f"{report['dataset']}: {report['mode']}, routed part, mean over seeds {report['seeds']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    target = out / "cost_quality.png"
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
