"""tuning.search: a choice on a grid's edge extends the grid in that direction, within a budget, and what
stays on an edge is recorded."""
import math

import torch

from evaluation import tuning


def test_an_edge_choice_extends_the_grid_until_it_is_inside():
    # the score is best at lr 1.0 and steps 40: beyond the largest lr (0.3) and steps (10) of the grid
    def score(points):
        calls.append(list(points))
        return [(math.log2(lr) - 0.0) ** 2 + (math.log2(steps) - math.log2(40)) ** 2 for lr, steps in points]

    calls = []
    best, record = tuning.search([tuning.Axis("lr", (0.01, 0.03, 0.1, 0.3)),
                                  tuning.Axis("steps", (1, 2, 5, 10), integer=True)], score)
    # lr: 0.3 -> 0.6 -> 1.2 (1.2 beats 0.6 inside, then 1.2 is the edge again: 2.4, worse, ends it)
    assert best == (1.2, 40)
    assert record["axes"] == {"lr": [0.01, 0.03, 0.1, 0.3, 0.6, 1.2, 2.4], "steps": [1, 2, 5, 10, 20, 40, 80]}
    assert record["extensions"] == {"lr": 3, "steps": 3} and record["at_edge"] == {}
    assert sorted(record["points"]) == sorted({p for batch in calls for p in batch})  # each point scored once
    assert len(record["points"]) == 7 * 7 and record["scores"][record["points"].index(best)] == min(record["scores"])


def test_a_choice_still_on_the_edge_after_the_budget_is_flagged():
    # keeps improving as the regularisation grows and as the rank shrinks toward its natural bound 1
    def score(points):
        return [1 / (1 + reg) + rank for rank, reg in points]

    best, record = tuning.search([tuning.Axis("rank", (4, 8), integer=True, floor=1),
                                  tuning.Axis("reg", (0.0, 1.0, 10.0))], score, budget=2)
    assert record["axes"] == {"rank": [1, 2, 4, 8], "reg": [0.0, 1.0, 10.0, 20.0, 40.0]}
    assert best == (1, 40.0)
    # rank reached its natural bound (not an edge); reg ran out of budget while still improving
    assert record["at_edge"] == {"reg": "largest"} and record["extensions"] == {"rank": 2, "reg": 2}


def test_flat_axes_single_values_and_natural_bounds_are_not_extended():
    # lr does not matter at 0 steps (every lr scores the same there), and 0 is steps' natural bound
    best, record = tuning.search([tuning.Axis("lr", (0.1, 0.5)), tuning.Axis("steps", (0, 2), integer=True)],
                                 lambda points: [1.0 if steps == 0 else 2.0 for _, steps in points])
    assert best == (0.1, 0) and record["extensions"] == {"lr": 0, "steps": 0} and record["at_edge"] == {}
    # one value given: a fixed setting, not a grid; a diverged (nan) score is never the choice
    best, record = tuning.search([tuning.Axis("lr", (0.1,)), tuning.Axis("k", (1.0, 2.0, 4.0))],
                                 lambda points: [math.nan if k == 1.0 else k for _, k in points])
    assert best == (0.1, 2.0) and record["axes"]["lr"] == [0.1] and record["at_edge"] == {}
    assert record["scores"][0] == math.inf


def test_a_diverged_setting_is_never_chosen_and_its_record_does_not_fail_the_report(tmp_path):
    import json

    import pytest

    from evaluation import metrics
    from options import MeloError

    lr = tuning.Axis("lr", (0.01, 0.1, 0.3))
    best, searched = tuning.search([lr], lambda points: [{0.01: 1.2, 0.1: math.nan, 0.3: math.inf}.get(p[0], 1.3)
                                                        for p in points])
    assert best == (0.01,) and searched["scores"][1:3] == [math.inf, math.inf]
    plain = {"rmse": 1.0, "mae": 0.8, "mean_per_rating_rmse": 1.1, "count": 2, "per_rating": {}}
    report = {**plain, "finetune_selection": {"validation_scores": searched["scores"]}}
    metrics.publish(report, "t", str(tmp_path / "r.json"))  # no error: the test's numbers are finite
    assert json.loads((tmp_path / "r.json").read_text())["finetune_selection"]["validation_scores"][1] is None
    with pytest.raises(MeloError, match="non-finite"):
        metrics.publish({**plain, "rmse": math.nan}, "t", str(tmp_path / "s.json"))


def test_the_one_standard_error_rule_takes_the_simplest_point_within_one_standard_error():
    axes = [tuning.Axis("rank", (1, 2, 8), integer=True, simpler="smaller"),
            tuning.Axis("reg", (0.5, 1.0, 5.0), simpler="larger"), tuning.Axis("decay", (0.9, 1.0))]
    points = [(8, 1.0, 1.0), (2, 1.0, 1.0), (1, 1.0, 1.0), (1, 5.0, 1.0), (2, 1.0, 0.9), (2, 0.5, 1.0), (2, 1.0, 0.9)]
    fold_scores = torch.tensor([
        [1.00, 1.00, 1.00, 1.00],  # the minimum (pooled 1.0)
        [1.10, 0.90, 1.10, 0.90],  # +0.05; differences ±0.1: standard error sqrt(0.04 / 3) / 2 = 0.058, within
        [1.20, 1.20, 1.20, 1.20],  # the simplest, but +0.2 with a standard error of 0: outside
        [math.nan] * 4,            # diverged: never chosen
        [1.04, 0.96, 1.04, 0.96],  # as simple as the second (decay declares nothing), +0.02 <= 0.023: wins
        [1.00, 1.00, 1.00, 1.00],  # ties the minimum, but a weaker reg at the same rank: less simple
        [1.04, 0.96, 1.04, 0.96],  # a copy of the winner, later: the earlier wins
    ], dtype=torch.float64)
    pooled = torch.tensor([1.0, 1.05, 1.2, math.nan, 1.02, 1.0, 1.02], dtype=torch.float64)
    assert tuning.simplest_within_one_se(axes, points, fold_scores, pooled) == 4
    # the second at +0.06, just beyond its standard error of 0.058: out, the minimum stays
    assert tuning.simplest_within_one_se(axes, points[:3], fold_scores[:3], torch.tensor([1.0, 1.06, 1.2])) == 0
    # one fold: no standard error, the minimum (the first of equal minima)
    assert tuning.simplest_within_one_se(axes, points, fold_scores[:, :1], pooled) == 0
    # no axis says what is simpler: the lower score, then the earlier point (the minimum)
    plain = [tuning.Axis(axis.name, axis.values) for axis in axes]
    assert tuning.simplest_within_one_se(plain, points, fold_scores, pooled) == 0


def test_a_one_standard_error_choice_records_its_simpler_edges():
    axes = [tuning.Axis("rank", (1, 2, 4), integer=True, floor=1, simpler="smaller"),
            tuning.Axis("reg", (1.0, 5.0), simpler="larger"), tuning.Axis("decay", (0.8, 0.9, 1.0), ceiling=1.0)]

    def score(points):
        return [(math.log2(rank) - 1) ** 2 + 0.01 * (reg - 1) ** 2 + (decay - 0.9) ** 2 for rank, reg, decay in points]

    minimum, record = tuning.search(axes, score)
    assert minimum == (2, 1.0, 0.9) and record["at_edge"] == {}  # reg 1.0 was an edge: 0.5 … 0.125 were worse
    # the largest reg could go further; rank 1 is its natural bound; decay 0.9 is inside
    assert tuning.choice_edges(axes, record, (1, 5.0, 0.9)) == {"reg": "largest"}
    # the largest rank is not a simpler edge; decay 1.0 is its ceiling
    assert tuning.choice_edges(axes, record, (4, 1.0, 1.0)) == {}
    assert tuning.choice_edges(axes, record, (2, 0.125, 0.9)) == {}  # the smallest reg: the harder side
