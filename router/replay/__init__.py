"""Offline replay of recorded outcomes through the routing engine the service runs.

Layout (imports point down only; nothing imports `peers` but the evaluation, lazily):
- `data`: the routing files, their prices and cached embeddings.
- `passes`: one online pass per seed through `router.engine.build_engine`'s engine (and predictor
  training for `--train-fraction`).
- `peers`: MABWiser and river on the same stream (imports `passes`, never the reverse).
- `report`: references, reports, the comparison table, budget sweeps and RouteLLM metrics.
- `modes`: the answer-aware modes (`cascade`, `parallel`) from the answers file beside the routing file,
  with the answer scorer trained on the history part.
- `plots`: matplotlib figures.
`run` below is what `llm-router replay` calls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from router.config import RouterConfig
from router.evaluation import aiq
from router.progress import ticking
from router.replay.data import Dataset, DatasetError, Outcome, Prompt, embed_dataset, load_dataset
from router.replay.passes import PassResult, TrainFraction, replay_config, replay_pass, select_policies, shadow_names
from router.replay.report import Evaluation, comparison_table, references, report

__all__ = [
    "Dataset", "DatasetError", "Evaluation", "Outcome", "PassResult", "Prompt", "TrainFraction", "comparison_table",
    "embed_dataset", "load_dataset", "references", "replay_config", "replay_pass", "report", "run", "select_policies",
]


def run(
    data: str | Path,
    policies: list[str],
    seeds: list[int],
    budget_usd: float | None,
    out: Path,
    embedder: Any,
    models: list[str] | None = None,
    config: RouterConfig | None = None,
    cache_dir: Path | None = None,
    budgets: list[float] | None = None,
    peers: bool = False,
    train: TrainFraction | None = None,
    shadows: bool = False,
    mode: str = "route",
    k: int | None = None,
    warm_start: bool = False,
) -> list[dict[str, Any]]:
    """Replay `policies` (and peers) over `data` under `config` (`budget_usd`, when given, replacing its
    budget target); write report.json per method, plots, and for several a table. Long work shows progress
    bars inside a `router.progress.showing()` block. `mode` `cascade` or `parallel` (with `k` calls, default
    the config's) replays an answer-aware mode instead (`router.replay.modes`): one report per policy for
    parallel, one for cascade."""
    config = replay_config(config, budget_usd)
    dataset = load_dataset(data, models)
    cache_dir = cache_dir or Path.home() / ".cache" / "llm-router" / "embeddings"
    vectors = embed_dataset(data, dataset, embedder, cache_dir)
    if mode != "route":
        return _run_mode(data, dataset, vectors, policies, seeds, config, train, embedder, mode, k, budgets, out,
                         cache_dir.parent / "scorers")
    evaluation = Evaluation(dataset, vectors, seeds, config, train, shadows, warm_start=warm_start and train is not None)
    two_models = len(dataset.models) == 2
    sweep_budgets = budgets or (evaluation.two_model_budgets() if two_models else None)
    methods = [(p, False) for p in policies]
    if peers:
        from router.replay.peers import PEERS

        methods += [(p, True) for p in PEERS]
    reports, runs = [], {}
    for method, peer in ticking(methods, "policies", unit="policy"):
        passes = evaluation.passes(method, peer)
        result = report(dataset, method, seeds, passes, config, None if peer else train, peer=peer,
                        shadows=shadow_names(config, method) if shadows and not peer else None, warm_start=evaluation.warm_start)
        if sweep_budgets:
            call_share = two_models and not budgets  # RouteLLM's sweep: the strong model's call share
            result["budget_sweep"] = evaluation.sweep(method, peer, sweep_budgets, call_share=call_share)
            if two_models:
                result.update(evaluation.routellm_metrics(result["budget_sweep"], call_share=call_share))
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
    from router.replay.plots import plot

    plot(reports, runs, out)
    return reports


def _run_mode(data: str | Path, dataset: Dataset, vectors: Any, policies: list[str], seeds: list[int], config: RouterConfig,
              train: TrainFraction | None, embedder: Any, mode: str, k: int | None, budgets: list[float] | None, out: Path,
              scorer_cache: Path) -> list[dict[str, Any]]:
    from router.replay.modes import ModeEvaluation, ModeSettings, mode_report, plot_mode

    settings = ModeSettings(mode, k or config.modes.parallel_k, config.modes.cascade_threshold, config.modes.cascade_max_calls)
    evaluation = ModeEvaluation(data, dataset, vectors, seeds, config, train, embedder, settings, scorer_cache)
    budget = config.budget.target_usd_per_query or None
    reports = []
    for policy in ticking(policies if mode == "parallel" else ["frontier"], mode, unit="policy"):
        reports.append(mode_report(evaluation, policy, budget, budgets))
    several = len(reports) > 1
    for r in reports:
        target = out / r["policy"] if several else out
        target.mkdir(parents=True, exist_ok=True)
        (target / "report.json").write_text(json.dumps(r, indent=2))
        plot_mode(r, target)
    if several:
        (out / "comparison.md").write_text(comparison_table(reports))
    return reports
