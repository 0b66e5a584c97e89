"""Routing metrics from the literature, computed from replay results.

- AIQ (RouterBench): the area under a method's non-decreasing convex hull of (cost, quality) points from a
  budget sweep, taken as 0 below its cheapest point and extended flat to `max_cost`, divided by
  `max_cost` (use one `max_cost` for every method compared).
- PGR / APGR and CPT (RouteLLM), for a weak and a strong model: PGR = (q - q_weak) / (q_strong - q_weak);
  the sweep gives points (share of calls to the strong model, PGR), joined by straight lines from (0, 0)
  to (1, 1) (all weak, all strong); APGR is the area under that curve over shares [0, 1]; CPT(x) is the
  smallest share of strong calls at which the curve reaches PGR x.
- AUC: the area under the ROC curve of a score for a yes/no outcome (how well a cascade's first score
  tells when to stop).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def upper_hull(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-decreasing upper convex hull of (cost, quality) points, by increasing cost."""
    ordered = sorted(set(points), key=lambda p: (p[0], -p[1]))
    hull: list[tuple[float, float]] = []
    for point in ordered:
        if hull and point[1] <= hull[-1][1]:
            continue  # costs more, not better: never on a non-decreasing frontier
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            # drop the middle point when it lies on or below the chord from hull[-2] to `point`
            if (y2 - y1) * (point[0] - x1) <= (point[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(point)
    return hull


def aiq(points: Sequence[tuple[float, float]], max_cost: float) -> float:
    """Average quality over costs [0, max_cost] along the non-decreasing convex hull (RouterBench)."""
    if max_cost <= 0 or not points:
        raise ValueError("aiq needs points and a positive max_cost")
    hull = [p for p in upper_hull(points) if p[0] <= max_cost]
    if not hull:
        return 0.0
    xs = [x for x, _ in hull] + [max_cost]
    ys = [y for _, y in hull] + [hull[-1][1]]
    return float(np.trapezoid(ys, xs) / max_cost)


def pgr(quality: float, weak: float, strong: float) -> float:
    return (quality - weak) / (strong - weak)


def pgr_curve(shares: Sequence[float], qualities: Sequence[float], weak: float, strong: float) -> tuple[np.ndarray, np.ndarray]:
    """Points (strong-call share, PGR), sorted by share, with the all-weak and all-strong end points."""
    pairs = sorted(zip(shares, (pgr(q, weak, strong) for q in qualities)))
    xs = np.array([0.0] + [s for s, _ in pairs] + [1.0])
    ys = np.array([0.0] + [g for _, g in pairs] + [1.0])
    return xs, ys


def apgr(shares: Sequence[float], qualities: Sequence[float], weak: float, strong: float) -> float:
    xs, ys = pgr_curve(shares, qualities, weak, strong)
    return float(np.trapezoid(ys, xs))


def cpt(target_pgr: float, shares: Sequence[float], qualities: Sequence[float], weak: float, strong: float) -> float:
    """Smallest strong-call share at which the (linearly interpolated) PGR curve reaches `target_pgr`."""
    xs, ys = pgr_curve(shares, qualities, weak, strong)
    for i in range(1, len(xs)):
        if ys[i] >= target_pgr:
            if ys[i - 1] >= target_pgr or ys[i] == ys[i - 1]:
                return float(xs[i - 1] if ys[i - 1] >= target_pgr else xs[i])
            return float(xs[i - 1] + (target_pgr - ys[i - 1]) * (xs[i] - xs[i - 1]) / (ys[i] - ys[i - 1]))
    return 1.0


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve (the probability that a positive outscores a negative, ties half); None
    without both classes."""
    wins, negatives = scores[positive], scores[~positive]
    if not len(wins) or not len(negatives):
        return None
    above = (wins[:, None] > negatives[None, :]).sum() + 0.5 * (wins[:, None] == negatives[None, :]).sum()
    return float(above / (len(wins) * len(negatives)))
