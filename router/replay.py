"""Offline replay of recorded outcomes through the routing core: one online pass per seed.

Each step the core sees a prompt (its cached embedding), predicts costs, lets the policy choose, and is
then told only the chosen model's recorded quality and cost (bandit feedback): a policy never sees an
outcome it did not choose. The decision path (FAISS memory, cost prediction, cap, pacing, policy) is the
one the service runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policies import registry
from router.budget import BudgetPacer, OutputLengthModel
from router.core import Candidate, RoutingCore
from router.evaluation import aiq, apgr, cpt, upper_hull
from router.memory import Memory


@dataclass(frozen=True)
class Outcome:
    quality: float
    cost_usd: float
    output_tokens: float | None


@dataclass(frozen=True)
class Prompt:
    id: str
    prompt: str
    prompt_tokens: int
    outcomes: dict[str, Outcome]


@dataclass
class Dataset:
    name: str
    prompts: list[Prompt]
    models: list[Candidate]

    @property
    def model_names(self) -> list[str]:
        return [m.name for m in self.models]


class DatasetError(ValueError):
    pass


def load_dataset(path: str | Path, models: list[str] | None = None) -> Dataset:
    """A routing file (`*_routing.jsonl`) and, when present, its `*_models.json` with prices.

    Without a models file, each model's price per token is inferred from its recorded costs.
    """
    path = Path(path)
    prompts = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                outcomes = {
                    name: Outcome(float(o["quality"]), float(o["cost_usd"]), None if o.get("output_tokens") is None else float(o["output_tokens"]))
                    for name, o in row["outcomes"].items()
                }
                prompts.append(Prompt(str(row["id"]), row["prompt"], int(row["prompt_tokens"]), outcomes))
            except (KeyError, TypeError, ValueError) as exc:
                raise DatasetError(f"{path}:{number}: not a routing record ({exc})") from exc
    if not prompts:
        raise DatasetError(f"{path}: no records")
    names = list(prompts[0].outcomes)
    if models:
        unknown = [m for m in models if m not in names]
        if unknown:
            raise DatasetError(f"models {unknown} not in {path.name}; it has {names}")
        names = models
    missing = [p.id for p in prompts if any(n not in p.outcomes for n in names)]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} records lack an outcome for some model (e.g. {missing[0]})")
    return Dataset(path.name, prompts, _prices(path, prompts, names))


def _prices(path: Path, prompts: list[Prompt], names: list[str]) -> list[Candidate]:
    models_file = path.with_name(path.name.replace("_routing.jsonl", "_models.json"))
    known: dict[str, Candidate] = {}
    if models_file.exists() and models_file != path:
        for model in json.loads(models_file.read_text()).get("models", []):
            known[model["name"]] = Candidate(model["name"], float(model["price_per_1m_input_tokens_usd"]), float(model["price_per_1m_output_tokens_usd"]))
    candidates = []
    for name in names:
        if name in known:
            candidates.append(known[name])
            continue
        per_token = [p.outcomes[name].cost_usd / max(p.prompt_tokens + (p.outcomes[name].output_tokens or 0), 1) for p in prompts]
        price = float(np.median(per_token)) * 1e6
        candidates.append(Candidate(name, price, price))
    return candidates


def embed_dataset(dataset_path: str | Path, dataset: Dataset, embedder: Any, cache_dir: Path) -> np.ndarray:
    """Embeddings of every prompt, computed once per (embedder, content) and cached on disk."""
    digest = hashlib.sha256("\x1e".join(p.prompt for p in dataset.prompts).encode()).hexdigest()[:16]
    cache = cache_dir / f"{Path(dataset_path).stem}-{embedder.name}-{digest}.npy"
    if cache.exists():
        return np.load(cache)
    vectors = embedder.embed([p.prompt for p in dataset.prompts])
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(".tmp.npy")
    np.save(temporary, vectors)
    temporary.rename(cache)
    return vectors


@dataclass
class PassResult:
    qualities: np.ndarray
    costs: np.ndarray
    decision_ms: np.ndarray
    choices: list[str]
    routed: np.ndarray | None = None  # prompt indices measured (all, unless a history part came first)


PREDICTOR_POLICIES = ("forc", "hybrid")


@dataclass(frozen=True)
class TrainFraction:
    """`--train-fraction`: the first `fraction` of each shuffled stream is history, the rest is routed.

    Predictor policies train on the history with every model's outcome (as `llm-router import` gives
    them); bandits learn from it online with bandit feedback, unmeasured. Only the rest is measured.
    """

    fraction: float
    settings: Any = None  # router.predictors.TrainSettings; None: their defaults


def _predictions(dataset: Dataset, order: list[int], split: int, policy: str, seed: int, train: TrainFraction) -> list[Any]:
    """Train the policy's predictor on the history part and predict every routed prompt (in one batch)."""
    from policies import Predictions
    from router.predictors import Outcome as Observed
    from router.predictors import TrainSettings, train_forc, train_hybrid

    prices = {m.name: m for m in dataset.models}
    history = [
        Observed(dataset.prompts[i].prompt, name, o.quality, round(_output_tokens(o, dataset.prompts[i], prices[name])), float(position))
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
    hybrid = train_hybrid(history, small, large, 0.0, 0.5, settings).predictor
    return [Predictions(small_ok=p, small=small, large=large, threshold=hybrid.threshold) for p in hybrid.prob_small_ok(texts)]


def replay_pass(
    dataset: Dataset,
    vectors: np.ndarray,
    policy: str,
    seed: int,
    budget_usd: float | None = None,
    policy_options: dict[str, Any] | None = None,
    neighbours: int = 20,
    train: TrainFraction | None = None,
) -> PassResult:
    """One online pass in a seed-shuffled order with bandit feedback only (measured after the history
    part when `train` is given)."""
    order = np.random.default_rng(seed).permutation(len(dataset.prompts))
    split = round(len(order) * train.fraction) if train else 0
    predicted = _predictions(dataset, order.tolist(), split, policy, seed, train) if train and policy in PREDICTOR_POLICIES else None
    core = RoutingCore(
        policies={policy: registry.create(policy, seed=seed, **(policy_options or {}))},
        active=policy,
        memory=Memory(vectors.shape[1]),
        pacer=BudgetPacer(target_usd_per_query=budget_usd),
        output_lengths=OutputLengthModel(),
        neighbours=neighbours,
    )
    prices = {m.name: m for m in dataset.models}
    qualities, costs, timings, choices = [], [], [], []
    routed_indices = order[split:]
    for step, index in enumerate(order.tolist()):
        prompt = dataset.prompts[index]
        started = time.perf_counter()
        predictions = predicted[step - split] if predicted is not None and step >= split else None
        decided = core.decide(f"r{step}", step, vectors[index], prompt.prompt_tokens, dataset.models, predictions=predictions)
        elapsed_ms = (time.perf_counter() - started) * 1000
        arm = decided.choice.arm
        outcome = prompt.outcomes[arm]
        core.record_outcome(decided.record.decision_id, arm, outcome.cost_usd, _output_tokens(outcome, prompt, prices[arm]))
        core.learn(decided.record, vectors[index], outcome.quality, outcome.cost_usd)
        if step < split:  # history: learned from, not measured
            continue
        timings.append(elapsed_ms)
        qualities.append(outcome.quality)
        costs.append(outcome.cost_usd)
        choices.append(arm)
    return PassResult(np.array(qualities), np.array(costs), np.array(timings), choices, routed_indices)


def _output_tokens(outcome: Outcome, prompt: Prompt, price: Candidate) -> float:
    """Recorded answer length, or the length the recorded cost implies (data that bills input only -> 0)."""
    if outcome.output_tokens is not None:
        return outcome.output_tokens
    if price.price_per_1m_output_tokens_usd <= 0:
        return 0.0
    output_cost = outcome.cost_usd - prompt.prompt_tokens * price.price_per_1m_input_tokens_usd / 1e6
    return max(0.0, output_cost * 1e6 / price.price_per_1m_output_tokens_usd)


def references(dataset: Dataset, subsets: list[np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Oracle (best model per prompt, cheapest among ties), best single model in hindsight, uniform
    random, and the cheapest model: what any router should be compared with. With `subsets` (the routed
    prompts of each seed), over those prompts, each prompt counted once per seed that routed it."""
    names = dataset.model_names
    rows = [dataset.prompts[i] for subset in subsets for i in subset] if subsets else dataset.prompts
    quality = np.array([[p.outcomes[n].quality for n in names] for p in rows])
    cost = np.array([[p.outcomes[n].cost_usd for n in names] for p in rows])
    best = quality.max(axis=1, keepdims=True)
    oracle_cost = np.where(quality >= best - 1e-12, cost, np.inf).min(axis=1)
    single = int(quality.mean(axis=0).argmax())
    cheapest = int(cost.mean(axis=0).argmin())
    return {
        "oracle": {"quality": float(best.mean()), "cost_usd": float(oracle_cost.mean())},
        "best_single": {"model": names[single], "quality": float(quality[:, single].mean()), "cost_usd": float(cost[:, single].mean())},
        "random": {"quality": float(quality.mean()), "cost_usd": float(cost.mean())},
        "cheapest": {"model": names[cheapest], "quality": float(quality[:, cheapest].mean()), "cost_usd": float(cost[:, cheapest].mean())},
    }


def report(dataset: Dataset, policy: str, seeds: list[int], passes: list[PassResult], budget_usd: float | None,
           train: TrainFraction | None = None) -> dict[str, Any]:
    half = len(passes[0].qualities) // 2
    timings = np.concatenate([p.decision_ms for p in passes])
    extra: dict[str, Any] = {}
    if train is not None:
        extra = {"train_fraction": train.fraction, "n_routed": len(passes[0].qualities),
                 "history_use": "predictors: every model's outcome; bandits: online, bandit feedback"}
    return {**extra,
        "policy": policy,
        "dataset": dataset.name,
        "n_prompts": len(dataset.prompts),
        "models": dataset.model_names,
        "seeds": seeds,
        "budget_usd": budget_usd,
        "mean_quality": float(np.mean([p.qualities.mean() for p in passes])),
        "mean_quality_second_half": float(np.mean([p.qualities[half:].mean() for p in passes])),
        "mean_cost_usd": float(np.mean([p.costs.mean() for p in passes])),
        "mean_cost_usd_second_half": float(np.mean([p.costs[half:].mean() for p in passes])),
        "decision_ms_p50": float(np.percentile(timings, 50)),
        "decision_ms_p99": float(np.percentile(timings, 99)),
        "per_seed": [
            {"seed": s, "mean_quality": float(p.qualities.mean()), "mean_cost_usd": float(p.costs.mean())}
            for s, p in zip(seeds, passes)
        ],
        "references": references(dataset, [p.routed for p in passes] if train is not None else None),
    }


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """Markdown: one row per policy (peers marked), then the references."""
    extra = [key for key in ("aiq", "apgr", "cpt50", "cpt80") if any(key in r for r in reports)]
    lines = [
        "| policy | mean quality | quality, 2nd half | mean cost (USD) | decision p50 (ms) | decision p99 (ms) |"
        + "".join(f" {key.upper()} |" for key in extra),
        "|---|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for r in reports:
        name = r["policy"] + (" (peer)" if r.get("peer") else "")
        cells = "".join(f" {r[key]:.4f} |" if key in r else " |" for key in extra)
        lines.append(
            f"| {name} | {r['mean_quality']:.4f} | {r['mean_quality_second_half']:.4f} | {r['mean_cost_usd']:.3g} "
            f"| {r['decision_ms_p50']:.3f} | {r['decision_ms_p99']:.3f} |{cells}"
        )
    for name, ref in reports[0]["references"].items():
        label = f"{name} ({ref['model']})" if "model" in ref else name
        lines.append(f"| *{label}* | {ref['quality']:.4f} | | {ref['cost_usd']:.3g} | | |" + " |" * len(extra))
    return "\n".join(lines) + "\n"


PEER_COST_WEIGHTS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)  # peers trade quality for cost through a fixed lambda


class Evaluation:
    """Runs policies (and peers) over one dataset: the main passes, budget sweeps, and the metrics."""

    def __init__(self, dataset: Dataset, vectors: np.ndarray, seeds: list[int], policy_options: dict[str, dict[str, Any]] | None = None,
                 train: TrainFraction | None = None) -> None:
        self.dataset = dataset
        self.vectors = vectors
        self.seeds = seeds
        self.policy_options = policy_options or {}
        self.train = train

    def passes(self, method: str, peer: bool, budget_usd: float | None = None, cost_weight: float = 0.0) -> list[PassResult]:
        if peer:
            from router.peers import peer_pass

            return [peer_pass(self.dataset, self.vectors, method, seed, cost_weight=cost_weight) for seed in self.seeds]
        return [
            replay_pass(self.dataset, self.vectors, method, seed, budget_usd, self.policy_options.get(method), train=self.train)
            for seed in self.seeds
        ]

    def sweep(self, method: str, peer: bool, budgets: list[float]) -> list[dict[str, float]]:
        """(budget or lambda, mean cost, mean quality, share of calls per model) for each sweep setting."""
        settings = [("cost_weight", w) for w in PEER_COST_WEIGHTS] if peer else [("budget_usd", b) for b in budgets]
        points = []
        for key, value in settings:
            runs = self.passes(method, peer, budget_usd=value if key == "budget_usd" else None, cost_weight=value if key == "cost_weight" else 0.0)
            choices = [c for run in runs for c in run.choices]
            points.append({
                key: value,
                "mean_cost_usd": float(np.mean([r.costs.mean() for r in runs])),
                "mean_quality": float(np.mean([r.qualities.mean() for r in runs])),
                "shares": {m: choices.count(m) / len(choices) for m in self.dataset.model_names},
            })
        return points

    def two_model_budgets(self) -> list[float]:
        """Budgets spanning the weak model's cost to the strong one's: the strong-call-share sweep."""
        weak, strong = self._weak_strong()
        costs = {m: np.mean([p.outcomes[m].cost_usd for p in self.dataset.prompts]) for m in (weak, strong)}
        return [float(costs[weak] + share * (costs[strong] - costs[weak])) for share in np.linspace(0.1, 0.9, 9)]

    def _weak_strong(self) -> tuple[str, str]:
        first, second = self.dataset.model_names
        quality = {m: np.mean([p.outcomes[m].quality for p in self.dataset.prompts]) for m in (first, second)}
        return (first, second) if quality[first] <= quality[second] else (second, first)

    def routellm_metrics(self, sweep: list[dict[str, Any]]) -> dict[str, float | str]:
        weak, strong = self._weak_strong()
        q = {m: float(np.mean([p.outcomes[m].quality for p in self.dataset.prompts])) for m in (weak, strong)}
        shares = [point["shares"][strong] for point in sweep]
        qualities = [point["mean_quality"] for point in sweep]
        return {
            "weak_model": weak,
            "strong_model": strong,
            "apgr": apgr(shares, qualities, q[weak], q[strong]),
            "cpt50": cpt(0.5, shares, qualities, q[weak], q[strong]),
            "cpt80": cpt(0.8, shares, qualities, q[weak], q[strong]),
        }


def run(
    data: str | Path,
    policies: list[str],
    seeds: list[int],
    budget_usd: float | None,
    out: Path,
    embedder: Any,
    models: list[str] | None = None,
    policy_options: dict[str, dict[str, Any]] | None = None,
    cache_dir: Path | None = None,
    budgets: list[float] | None = None,
    peers: bool = False,
    train: TrainFraction | None = None,
) -> list[dict[str, Any]]:
    """Replay `policies` (and peers) over `data`; write report.json per method, a table and plots."""
    dataset = load_dataset(data, models)
    vectors = embed_dataset(data, dataset, embedder, cache_dir or Path.home() / ".cache" / "llm-router" / "embeddings")
    evaluation = Evaluation(dataset, vectors, seeds, policy_options, train)
    two_models = len(dataset.models) == 2
    sweep_budgets = budgets or (evaluation.two_model_budgets() if two_models else None)
    methods = [(p, False) for p in policies]
    if peers:
        from router.peers import PEERS

        methods += [(p, True) for p in PEERS]
    reports, runs = [], {}
    for method, peer in methods:
        passes = evaluation.passes(method, peer, budget_usd=budget_usd)
        result = report(dataset, method, seeds, passes, budget_usd, None if peer else train)
        result["peer"] = peer
        if sweep_budgets:
            result["budget_sweep"] = evaluation.sweep(method, peer, sweep_budgets)
            if two_models:
                result.update(evaluation.routellm_metrics(result["budget_sweep"]))
        reports.append(result)
        runs[method] = passes
    if sweep_budgets:
        max_cost = max(point["mean_cost_usd"] for r in reports for point in r["budget_sweep"])
        for r in reports:
            r["aiq"] = aiq([(p["mean_cost_usd"], p["mean_quality"]) for p in r["budget_sweep"]], max_cost)
            r["aiq_max_cost_usd"] = max_cost
    several = len(reports) > 1
    for r in reports:
        target = out / r["policy"] if several else out
        target.mkdir(parents=True, exist_ok=True)
        (target / "report.json").write_text(json.dumps(r, indent=2))
    if several:
        (out / "comparison.md").write_text(comparison_table(reports))
        plot(reports, runs, out)
    return reports


def plot(reports: list[dict[str, Any]], runs: dict[str, list[PassResult]], out: Path) -> None:
    """`running_quality.png` (running mean quality along the stream, with the references) and, after a
    budget sweep, `cost_quality.png` (each method's sweep points and hull)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 5.5))
    for r in reports:
        curves = [np.cumsum(p.qualities) / np.arange(1, len(p.qualities) + 1) for p in runs[r["policy"]]]
        axis.plot(np.mean(curves, axis=0), label=r["policy"] + (" (peer)" if r.get("peer") else ""),
                  linestyle="--" if r.get("peer") else "-", linewidth=1.2)
    for name, ref in reports[0]["references"].items():
        axis.axhline(ref["quality"], color="grey", linestyle=":", linewidth=0.8)
        axis.annotate(name, (0, ref["quality"]), fontsize=7, color="grey", va="bottom")
    axis.set(xlabel="prompts seen", ylabel="running mean quality", title=f"{reports[0]['dataset']}: online replay, mean over seeds")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "running_quality.png", dpi=120)
    plt.close(figure)
    if "budget_sweep" not in reports[0]:
        return
    figure, axis = plt.subplots(figsize=(9, 5.5))
    for r in reports:
        points = [(p["mean_cost_usd"], p["mean_quality"]) for p in r["budget_sweep"]]
        hull = upper_hull(points)
        line = axis.plot([x for x, _ in hull], [y for _, y in hull], linestyle="--" if r.get("peer") else "-",
                         label=f"{r['policy']} (AIQ {r['aiq']:.3f})")
        axis.scatter([x for x, _ in points], [y for _, y in points], s=12, color=line[0].get_color())
    for name, ref in reports[0]["references"].items():
        axis.scatter([ref["cost_usd"]], [ref["quality"]], marker="x", color="black")
        axis.annotate(name, (ref["cost_usd"], ref["quality"]), fontsize=7)
    axis.set(xlabel="mean cost per query (USD)", ylabel="mean quality", title=f"{reports[0]['dataset']}: budget sweep")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "cost_quality.png", dpi=120)
    plt.close(figure)
