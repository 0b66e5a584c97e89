"""Figures of a replay (matplotlib, imported only here and only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from router.evaluation import upper_hull
from router.replay.passes import PassResult


def plot(reports: list[dict[str, Any]], runs: dict[str, list[PassResult]], out: Path) -> None:
    """`running_quality.png` (running mean quality along the measured stream, with the references over
    the same prompts) and, after a budget sweep, `cost_quality.png` (each method's sweep points and hull)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The curves' last points and the sweep points are means over every measured prompt: `references_all`.
    refs = reports[0]["references_all"]
    figure, axis = plt.subplots(figsize=(9, 5.5))
    for r in reports:
        curves = [np.cumsum(p.qualities) / np.arange(1, len(p.qualities) + 1) for p in runs[r["policy"]]]
        axis.plot(np.mean(curves, axis=0), label=r["policy"] + (" (peer)" if r.get("peer") else ""),
                  linestyle="--" if r.get("peer") else "-", linewidth=1.2)
    for name, ref in refs.items():
        axis.axhline(ref["quality"], color="grey", linestyle=":", linewidth=0.8)
        axis.annotate(name, (0, ref["quality"]), fontsize=7, color="grey", va="bottom")
    axis.set(xlabel="prompts measured", ylabel="running mean quality", title=f"{reports[0]['dataset']}: online replay, mean over seeds")
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
    for name, ref in refs.items():
        axis.scatter([ref["cost_usd"]], [ref["quality"]], marker="x", color="black")
        axis.annotate(name, (ref["cost_usd"], ref["quality"]), fontsize=7)
    axis.set(xlabel="mean cost per query (USD)", ylabel="mean quality", title=f"{reports[0]['dataset']}: budget sweep")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out / "cost_quality.png", dpi=120)
    plt.close(figure)
