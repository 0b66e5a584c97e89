"""Figures of a replay (matplotlib, imported only here and only when plotting)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from router.evaluation import upper_hull
from router.replay.passes import PassResult


def plot(reports: list[dict[str, Any]], runs: dict[str, list[PassResult]], out: Path) -> list[Path]:
    """`running_quality.png` (running mean quality along the measured stream, with the references over the
    same prompts) and `cost_quality.png` (each method's mean cost and quality, its budget sweep and hull
    when there is one, and the references), for one method or several. Returns the files written; none
    without matplotlib (the `eval` extra)."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The curves' last points and the sweep points are means over every measured prompt: `references_all`.
    refs = reports[0]["references_all"]
    title = reports[0]["dataset"] + (f", {reports[0]['policy']}" if len(reports) == 1 else "")
    figure, axis = plt.subplots(figsize=(9, 5.5))
    for r in reports:
        curves = [np.cumsum(p.qualities) / np.arange(1, len(p.qualities) + 1) for p in runs[r["policy"]]]
        axis.plot(np.mean(curves, axis=0), label=r["policy"] + (" (peer)" if r.get("peer") else ""),
                  linestyle="--" if r.get("peer") else "-", linewidth=1.2)
    for name, ref in refs.items():
        axis.axhline(ref["quality"], color="grey", linestyle=":", linewidth=0.8)
        axis.annotate(name, (0, ref["quality"]), fontsize=7, color="grey", va="bottom")
    axis.set(xlabel="prompts measured", ylabel="running mean quality", title=f"{title}: online replay, mean over seeds")
    axis.legend(fontsize=7, ncol=2)
    written = [_save(figure, out / "running_quality.png")]
    figure, axis = plt.subplots(figsize=(9, 5.5))
    costs = [ref["cost_usd"] for ref in refs.values()]
    for r in reports:
        style = "--" if r.get("peer") else "-"
        main = axis.scatter([r["mean_cost_usd"]], [r["mean_quality"]], marker="o", s=40, zorder=3,
                            label=r["policy"] + (f" (AIQ {r['aiq']:.3f})" if "aiq" in r else ""))
        costs.append(r["mean_cost_usd"])
        if "budget_sweep" in r:
            points = [(p["mean_cost_usd"], p["mean_quality"]) for p in r["budget_sweep"]]
            hull = upper_hull(points)
            color = main.get_facecolor()[0]
            axis.plot([x for x, _ in hull], [y for _, y in hull], linestyle=style, color=color)
            axis.scatter([x for x, _ in points], [y for _, y in points], s=12, color=color)
            costs += [x for x, _ in points]
    for name, ref in refs.items():
        axis.scatter([ref["cost_usd"]], [ref["quality"]], marker="x", color="black")
        axis.annotate(name, (ref["cost_usd"], ref["quality"]), fontsize=7)
    log_cost_axis(axis, costs)
    axis.set(xlabel="mean cost per query (USD, log scale)", ylabel="mean quality",
             title=f"{title}: quality for the money" + (", budget sweep" if "budget_sweep" in reports[0] else ""))
    axis.legend(fontsize=7, ncol=2)
    written.append(_save(figure, out / "cost_quality.png"))
    return written


def log_cost_axis(axis: Any, costs: list[float]) -> None:
    """A log-scaled cost axis: costs span orders of magnitude (random and the dearest model against the
    cheap ones), which a linear axis squashes into one corner. Free points (cost 0) keep a linear stretch
    below the cheapest paid cost (symlog) instead of vanishing."""
    paid = [c for c in costs if c > 0]
    if paid and len(paid) == len(costs):
        axis.set_xscale("log")
    else:
        axis.set_xscale("symlog", linthresh=min(paid) if paid else 1e-6)


def _save(figure: Any, target: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
