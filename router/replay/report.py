"""Reports of replay passes: the reference points over exactly the prompts measured, the per-method
report, the comparison table, and the evaluation (main passes, budget sweeps, RouteLLM metrics)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from router.config import RouterConfig
from router.evaluation import apgr, cpt
from router.replay.data import Dataset, Outcome
from router.replay.passes import PassResult, TrainFraction, budget_fields, budgeted, replay_config, replay_pass

PEER_COST_WEIGHTS = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0)  # peers trade quality for cost through a fixed lambda
PEER_NOTE = "peer: no budget (run unconstrained)"
CALL_SHARE_GAINS = (0.0, 0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5)  # quality a strong call must add, per sweep point
RANDOM_LEVEL_MARGIN = 0.02  # APGR within this (or two standard errors) of 0.5 is random routing's level


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
    mode: str | None = None,
    calls_per_prompt: float | None = None,
    warm_start: bool = False,
) -> dict[str, Any]:
    """One method's report. `references` cover the prompts `mean_quality_second_half` measures (the second
    half of each seed's measured stream), `references_all` those `mean_quality` measures (all of it).

    `config` is the config the passes ran (its budget is reported); a peer runs unconstrained, so its
    `budget_usd` is None, with a note when the run next to it is budgeted. An answer-aware mode
    (`router.replay.modes`) passes its `mode` and `calls_per_prompt`; its costs count every call."""
    config = replay_config(config)
    timings = np.concatenate([p.decision_ms for p in passes])
    extra: dict[str, Any] = {}
    if train is not None:
        extra = {"train_fraction": train.fraction, "n_routed": len(passes[0].qualities), "warm_start": warm_start,
                 "history_use": "predictors: every model's outcome; bandits: "
                                + ("warm start from every model's outcome (Policy.warm_start)" if warm_start
                                   else "online, bandit feedback (cold)")}
    budget = budget_fields(config)
    if mode is not None:
        extra |= {"mode": mode, "calls_per_prompt": calls_per_prompt}
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
        cells = "".join(f" {r[key]:.4f}{' (random level)' if key == 'apgr' and r.get('apgr_at_random_level') else ''} |"
                        if key in r else " |" for key in extra)
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
    if any(r.get("apgr_at_random_level") for r in reports):
        sweep = next(r["apgr_sweep"] for r in reports if "apgr_sweep" in r)
        notes_apgr = (f"APGR swept over the {sweep}; '(random level)': not above 0.5, what random routing gets at every "
                      "strong-call share, by more than two standard errors over the seeds (or 0.02).")
    else:
        notes_apgr = ""
    cover = first["references_cover"]
    notes = [f"\nReferences (rows in italics) cover the prompts of each column: 'mean' columns {cover['references_all']}; "
             f"'2nd half' columns {cover['references']}."]
    if notes_apgr:
        notes.append(notes_apgr)
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
                 train: TrainFraction | None = None, shadows: bool = False, warm_start: bool = False) -> None:
        self.dataset = dataset
        self.warm_start = warm_start
        self.vectors = vectors
        self.seeds = seeds
        self.config = replay_config(config)
        self.train = train
        self.shadows = shadows

    def passes(self, method: str, peer: bool, budget_usd: float | None = None, cost_weight: float = 0.0,
               shadows: bool | None = None, dataset: Dataset | None = None, static_lambda: float | None = None) -> list[PassResult]:
        """One pass per seed: a peer with `cost_weight`, a policy under the config (`budget_usd` overriding
        its target, or `static_lambda`: no target and that static lambda), with shadows when the evaluation
        runs them (or as `shadows` says); on `dataset` (the evaluation's, or its per-call-cost copy)."""
        dataset = dataset or self.dataset
        if peer:
            from router.replay.peers import peer_pass

            return [peer_pass(dataset, self.vectors, method, seed, cost_weight=cost_weight) for seed in self.seeds]
        with_shadows = self.shadows if shadows is None else shadows
        config = self.config
        if static_lambda is not None:
            budget = config.budget.model_copy(update={"target_usd_per_query": 0.0, "target_usd_per_hour": 0.0, "cost_weight": static_lambda})
            config = config.model_copy(update={"budget": budget})
        return [
            replay_pass(dataset, self.vectors, method, seed, config, budget_usd=budget_usd, shadows=with_shadows, train=self.train,
                        warm_start=self.warm_start)
            for seed in self.seeds
        ]

    def sweep(self, method: str, peer: bool, budgets: list[float], call_share: bool = False) -> list[dict[str, Any]]:
        """(budget or lambda, mean cost, mean quality, share of calls per model, and each seed's quality and
        shares) for each sweep setting. Shadows are left out: they change decision times, not choices.

        `call_share` (two models), as RouteLLM evaluates a router: every call of a model costs that model's
        mean cost (`per_call_costs`), and the sweep moves the threshold a query must clear to be worth the
        strong model, here the static lambda (`call_share_lambdas`: the quality gain, in reward units,
        that pays for a strong call), for policies and peers alike; each point's strong-call share is
        measured. With prices per token a dollar budget buys the strong model for short prompts and
        rations it on long ones, and a paced budget target spends by the clock (the pacer's headroom
        turns the strong model away once the recent spend is up, whatever the query): either way the
        sweep would measure prompt lengths or timing, not routing."""
        dataset = per_call_costs(self.dataset) if call_share else self.dataset
        if call_share:
            settings = [("cost_weight", w) for w in self.call_share_lambdas()]
        else:
            settings = [("cost_weight", w) for w in PEER_COST_WEIGHTS] if peer else [("budget_usd", b) for b in budgets]
        points = []
        for key, value in settings:
            runs = self.passes(method, peer, budget_usd=value if key == "budget_usd" else None,
                               cost_weight=value if key == "cost_weight" else 0.0, shadows=False, dataset=dataset,
                               static_lambda=value if call_share and not peer else None)
            choices = [c for run in runs for c in run.choices]
            points.append({
                key: value,
                "mean_cost_usd": float(np.mean([r.costs.mean() for r in runs])),
                "mean_quality": float(np.mean([r.qualities.mean() for r in runs])),
                "shares": {m: choices.count(m) / len(choices) for m in self.dataset.model_names},
                "per_seed": [
                    {"mean_quality": float(r.qualities.mean()),
                     "shares": {m: r.choices.count(m) / len(r.choices) for m in self.dataset.model_names}}
                    for r in runs
                ],
            })
        return points

    def call_share_lambdas(self) -> list[float]:
        """Static lambdas at which a strong call must gain CALL_SHARE_GAINS in quality: both our policies and
        the peers weigh cost as lambda * cost / the candidates' mean cost, so the strong call's extra penalty
        is lambda * (c_strong - c_weak) / mean(c_weak, c_strong)."""
        weak, strong = self._weak_strong()
        costs = {m: float(np.mean([p.outcomes[m].cost_usd for p in self.dataset.prompts])) for m in (weak, strong)}
        relative = (costs[strong] - costs[weak]) / ((costs[strong] + costs[weak]) / 2) if costs[strong] > costs[weak] else 1.0
        return [gain / relative for gain in CALL_SHARE_GAINS]

    def two_model_budgets(self) -> list[float]:
        """Budgets spanning the weak model's cost to the strong one's: the strong-call-share sweep."""
        weak, strong = self._weak_strong()
        costs = {m: np.mean([p.outcomes[m].cost_usd for p in self.dataset.prompts]) for m in (weak, strong)}
        return [float(costs[weak] + share * (costs[strong] - costs[weak])) for share in np.linspace(0.1, 0.9, 9)]

    def _weak_strong(self) -> tuple[str, str]:
        first, second = self.dataset.model_names
        quality = {m: np.mean([p.outcomes[m].quality for p in self.dataset.prompts]) for m in (first, second)}
        return (first, second) if quality[first] <= quality[second] else (second, first)

    def measured(self) -> list[np.ndarray]:
        """Each seed's measured prompts (its shuffled stream, after the history part with `--train-fraction`)."""
        n = len(self.dataset.prompts)
        split = round(n * self.train.fraction) if self.train else 0
        return [np.random.default_rng(seed).permutation(n)[split:] for seed in self.seeds]

    def routellm_metrics(self, sweep: list[dict[str, Any]], call_share: bool = False) -> dict[str, Any]:
        """APGR, CPT(50%), CPT(80%) over the measured prompts (the weak and strong models' qualities are
        theirs there), and how the APGR compares with random routing: a router that sends a random share s
        of the calls to the strong model has PGR s in expectation, so APGR 0.5 at every budget.
        `apgr_at_random_level`: the APGR is not above 0.5 by more than two standard errors over the seeds
        (or by 0.02, whichever is larger): what the policy learnt about which queries need the strong
        model does not show."""
        weak, strong = self._weak_strong()
        measured = self.measured()

        def pgr_inputs(points_quality: list[float], points_share: list[float], prompts: list[np.ndarray]) -> tuple:
            q = {m: float(np.mean([self.dataset.prompts[i].outcomes[m].quality for part in prompts for i in part])) for m in (weak, strong)}
            return points_share, points_quality, q[weak], q[strong]

        args = pgr_inputs([p["mean_quality"] for p in sweep], [p["shares"][strong] for p in sweep], measured)
        value = apgr(*args)
        per_seed = [
            apgr(*pgr_inputs([p["per_seed"][s]["mean_quality"] for p in sweep], [p["per_seed"][s]["shares"][strong] for p in sweep], [part]))
            for s, part in enumerate(measured)
            if all("per_seed" in p for p in sweep)
        ]
        error = float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else None
        return {
            "weak_model": weak,
            "strong_model": strong,
            "apgr": value,
            "cpt50": cpt(0.5, *args),
            "cpt80": cpt(0.8, *args),
            "apgr_sweep": "strong-call threshold (static lambda, per-call costs)" if call_share else "budget (USD per query)",
            "apgr_per_seed": per_seed,
            "apgr_random": 0.5,
            "apgr_vs_random": value - 0.5,
            "apgr_at_random_level": bool(value - 0.5 < max(RANDOM_LEVEL_MARGIN, 2 * (error or 0.0))),
        }


def per_call_costs(dataset: Dataset) -> Dataset:
    """The dataset with every call of a model costing that model's mean cost (and the mean prompt and
    answer lengths), so a budget between the weak and the strong model's cost is a share of strong calls."""
    names = dataset.model_names
    n = len(dataset.prompts)
    mean_cost = {m: sum(p.outcomes[m].cost_usd for p in dataset.prompts) / n for m in names}
    lengths = {m: [p.outcomes[m].output_tokens for p in dataset.prompts if p.outcomes[m].output_tokens is not None] for m in names}
    mean_tokens = {m: (sum(v) / len(v) if v else None) for m, v in lengths.items()}
    prompt_tokens = round(sum(p.prompt_tokens for p in dataset.prompts) / n)
    prompts = [
        replace(p, prompt_tokens=prompt_tokens, outcomes={
            m: (Outcome(o.quality, mean_cost[m], mean_tokens[m]) if m in mean_cost else o) for m, o in p.outcomes.items()
        })
        for p in dataset.prompts
    ]
    return Dataset(f"{dataset.name} (per-call costs)", prompts, dataset.models)
