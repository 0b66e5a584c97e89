"""AIQ, APGR and CPT on small cases checked by hand."""

import numpy as np
import pytest

from router.evaluation import aiq, apgr, auc, cpt, upper_hull


def test_hull_drops_dominated_and_concave_points():
    points = [(1, 0.5), (2, 0.55), (3, 0.9), (4, 0.8), (2.5, 0.5)]
    # (2, 0.55) lies below the chord from (1, 0.5) to (3, 0.9); (4, 0.8) and (2.5, 0.5) are dominated
    assert upper_hull(points) == [(1, 0.5), (3, 0.9)]


def test_aiq_hand_checked():
    # hull (1, 0.5) -> (3, 0.9), flat to 4; zero below cost 1:
    # area = 0 + (0.5 + 0.9) / 2 * 2 + 0.9 * 1 = 2.3 ; / 4 = 0.575
    assert aiq([(1, 0.5), (3, 0.9), (2, 0.55)], max_cost=4) == pytest.approx(0.575)
    # a single point at cost 0 extends flat: its quality
    assert aiq([(0, 0.7)], max_cost=2) == pytest.approx(0.7)
    with pytest.raises(ValueError):
        aiq([], max_cost=1)


def test_apgr_and_cpt_hand_checked():
    weak, strong = 0.4, 0.8
    # at 50% strong calls the router reaches quality 0.7: PGR 0.75
    shares, qualities = [0.5], [0.7]
    # curve (0,0) -> (0.5, 0.75) -> (1, 1): area = 0.5*0.75/2 + 0.5*(0.75+1)/2 = 0.1875 + 0.4375
    assert apgr(shares, qualities, weak, strong) == pytest.approx(0.625)
    # PGR 50% is reached at 0.5 * 0.5 / 0.75 = 1/3 of calls; 80% at 0.5 + 0.5 * 0.05 / 0.25 = 0.6
    assert cpt(0.5, shares, qualities, weak, strong) == pytest.approx(1 / 3)
    assert cpt(0.8, shares, qualities, weak, strong) == pytest.approx(0.6)
    # a random router (PGR equal to the share) has APGR 0.5
    assert apgr([0.25, 0.5, 0.75], [0.5, 0.6, 0.7], weak, strong) == pytest.approx(0.5)


def test_auc_is_the_chance_a_positive_outscores_a_negative():
    assert auc(np.array([0.9, 0.1, 0.5, 0.5]), np.array([True, False, True, False])) == 0.875  # 3 wins and a tie of 4 pairs
    assert auc(np.array([0.3, 0.2]), np.array([True, True])) is None
