"""Reports of replay passes: the reference points over exactly the prompts measured, the per-method
report, the comparison table, and the evaluation (main passes, budget sweeps, RouteLLM metrics)."""

from __future__ import annotations

from typing import Any

import numpy as np

from router.config import RouterConfig
from router.evaluation import apgr, cpt
from router.replay.data import Dataset
from router.replay.passes import PassResult, TrainFraction, budget_fields, budgeted, replay_config, replay_pass

PEER_COST_WEIGHTS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)  # peers trade quality for cost through a fixed lambda
PEER_NOTE = "peer: no budget (run unconstrained)"


def references(dataset: Dataset, subsets: list[np.ndarray] | None = None) -> dict[str, dict[str, Any]]:
    """Oracle (best model per prompt, cheapest among ties), best single model in hindsight, uniform
    random, and the cheapest model: what any router should be compared with. With `subsets` (the
    measured prompts of each seed), over those prompts, each prompt counted once per seed that measured it."""
    names = dataset.model_names
    rows = [dataset.prompts[i] for subset in subsets for i in subset] if subsets is not None else dataset.prompts
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


def _coverage(train: TrainFraction | None) -> dict[str, str]:
    part = "each seed's stream" if train is None else f"each seed's routed part (after the first {train.fraction:g} as history)"
    return {
        "references": f"the second half of {part}, as mean_quality_second_half; each prompt once per seed",
        "references_all": f"all of {part}, as mean_quality; each prompt once per seed",
    }


def report(
    dataset: Dataset,
    policy: str,
    seeds: list[int],
    passes: list[PassResult],
    config: RouterConfig | None = None,
    train: TrainFraction | None = None,
    *,
    peer: bool = False,
    shadows: list[str] | None = None,
) -> dict[str, Any]:
    """One method's report. `references` cover the prompts `mean_quality_second_half` measures (the second
    half of each seed's measured stream), `references_all` those `mean_quality` measures (all of it).

    `config` is the config the passes ran (its budget is reported); a peer runs unconstrained, so its
    `budget_usd` is None, with a note when the run next to it is budgeted."""
    config = replay_config(config)
    timings = np.concatenate([p.decision_ms for p in passes])
    extra: dict[str, Any] = {}
    if train is not None:
        extra = {"train_fraction": train.fraction, "n_routed": len(passes[0].qualities),
                 "history_use": "predictors: every model's outcome; bandits: online, bandit feedback"}
    budget = budget_fields(config)
    if peer:
        budget = {"budget_usd": None}
        if budgeted(config):
            budget["note"] = PEER_NOTE
    return {**extra,
        "policy": policy,
        "dataset": dataset.name,
        "n_prompts": len(dataset.prompts),
        "models": dataset.model_names,
        "seeds": seeds,
        **budget,
        "peer": peer,
        "shadows": list(shadows or []),
        "mean_quality": float(np.mean([p.qualities.mean() for p in passes])),
        "mean_quality_second_half": float(np.mean([p.qualities[p.half:].mean() for p in passes])),
        "mean_cost_usd": float(np.mean([p.costs.mean() for p in passes])),
        "mean_cost_usd_second_half": float(np.mean([p.costs[p.half:].mean() for p in passes])),
        "decision_ms_p50": float(np.percentile(timings, 50)),
        "decision_ms_p99": float(np.percentile(timings, 99)),
        "per_seed": [
            {"seed": s, "mean_quality": float(p.qualities.mean()), "mean_cost_usd": float(p.costs.mean())}
            for s, p in zip(seeds, passes)
        ],
        "references": references(dataset, [p.second_half for p in passes]),
        "references_all": references(dataset, [p.routed for p in passes]),
        "references_cover": _coverage(None if peer else train),
    }


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """Markdown: one row per method (peers marked, and marked unbudgeted next to a budgeted run), then the
    references of the same prompts as each column: `references_all` under the columns over every measured
    prompt, `references` under the second-half columns."""
    extra = [key for key in ("aiq", "apgr", "cpt50", "cpt80") if any(key in r for r in reports)]
    lines = [
        "| policy | mean quality | quality, 2nd half | mean cost (USD) | cost, 2nd half (USD) | decision p50 (ms) | decision p99 (ms) |"
        + "".join(f" {key.upper()} |" for key in extra),
        "|---|---|---|---|---|---|---|" + "---|" * len(extra),
    ]
    for r in reports:
        marks = ["peer"] if r.get("peer") else []
        if r.get("note") == PEER_NOTE:
            marks.append("no budget")
        name = r["policy"] + (f" ({', '.join(marks)})" if marks else "")
        cells = "".join(f" {r[key]:.4f} |" if key in r else " |" for key in extra)
        lines.append(
            f"| {name} | {r['mean_quality']:.4f} | {r['mean_quality_second_half']:.4f} | {r['mean_cost_usd']:.3g} "
            f"| {r['mean_cost_usd_second_half']:.3g} | {r['decision_ms_p50']:.3f} | {r['decision_ms_p99']:.3f} |{cells}"
        )
    first = reports[0]
    for name, half in first["references"].items():
        whole = first["references_all"][name]
        label = name
        if "model" in half:
            label += f" ({half['model']})" if half["model"] == whole["model"] else f" (2nd half: {half['model']}; all: {whole['model']})"
        lines.append(
            f"| *{label}* | {whole['quality']:.4f} | {half['quality']:.4f} | {whole['cost_usd']:.3g} | {half['cost_usd']:.3g} | | |"
            + " |" * len(extra)
        )
    cover = first["references_cover"]
    notes = [f"\nReferences (rows in italics) cover the prompts of each column: 'mean' columns {cover['references_all']}; "
             f"'2nd half' columns {cover['references']}."]
    if any(r.get("note") == PEER_NOTE for r in reports):
        budget = next((r for r in reports if not r.get("peer")), {})
        target = f"${budget['budget_usd']:.3g} per query" if budget.get("budget_usd") else "the config's budget"
        notes.append(f"Our policies ran under {target}; peers marked 'no budget' ran unconstrained.")
    shadows = next((r["shadows"] for r in reports if r.get("shadows")), None)
    if shadows:
        notes.append(f"Decision times include the shadow policies' scoring ({', '.join(shadows)} besides the deciding one).")
    return "\n".join(lines) + "\n" + "\n".join(notes) + "\n"


class Evaluation:
    """Runs policies (and peers) over one dataset: the main passes, budget sweeps, and the metrics."""

    def __init__(self, dataset: Dataset, vectors: np.ndarray, seeds: list[int], config: RouterConfig | None = None,
                 train: TrainFraction | None = None, shadows: bool = False) -> None:
        self.dataset = dataset
        self.vectors = vectors
        self.seeds = seeds
        self.config = replay_config(config)
        self.train = train
        self.shadows = shadows

    def passes(self, method: str, peer: bool, budget_usd: float | None = None, cost_weight: float = 0.0,
               shadows: bool | None = None) -> list[PassResult]:
        """One pass per seed: a peer with `cost_weight`, a policy under the config (`budget_usd` overriding
        its target), with shadows when the evaluation runs them (or as `shadows` says)."""
        if peer:
            from router.replay.peers import peer_pass

            return [peer_pass(self.dataset, self.vectors, method, seed, cost_weight=cost_weight) for seed in self.seeds]
        with_shadows = self.shadows if shadows is None else shadows
        return [
            replay_pass(self.dataset, self.vectors, method, seed, self.config, budget_usd=budget_usd, shadows=with_shadows, train=self.train)
            for seed in self.seeds
        ]

    def sweep(self, method: str, peer: bool, budgets: list[float]) -> list[dict[str, float]]:
        """(budget or lambda, mean cost, mean quality, share of calls per model) for each sweep setting.
        Shadows are left out: they change decision times, not choices."""
        settings = [("cost_weight", w) for w in PEER_COST_WEIGHTS] if peer else [("budget_usd", b) for b in budgets]
        points = []
        for key, value in settings:
            runs = self.passes(method, peer, budget_usd=value if key == "budget_usd" else None,
                               cost_weight=value if key == "cost_weight" else 0.0, shadows=False)
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
