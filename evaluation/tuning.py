"""Grid search on the validation users that does not stop silently at a grid's edge.

A choice on the largest value of a grid axis (or on the smallest, unless that is the axis's natural bound,
such as 0 steps or a regularisation of 0) says that the best value may lie beyond the grid. So the axis is
extended in that direction (x2 up, /2 down) and the whole product re-scored, at most MAX_EXTENSIONS times
per axis. If the choice is still on that edge when the budget is spent, the selection records it under
`at_edge` ({axis: "largest" | "smallest"}), and compare.py marks the cell.

An axis counts as on its edge only when the edge value is strictly better than its inner neighbour (the
other axes at the chosen values): on a flat axis (every lr at 0 fine-tuning steps, say) more values
change nothing. An axis given with one value is a fixed setting, not a grid, and is never extended.

A grid of many points chosen on few validation users overfits them: its minimum is optimistic, and the
point it sits on generalises badly. Where the axes say which direction is the simpler model (`simpler`),
`simplest_within_one_se` takes the simplest point whose score is within one standard error of the
minimum's: a paired variant of the one-standard-error rule (Hastie, Tibshirani and Friedman, The Elements
of Statistical Learning, 7.10, whose threshold is the standard error of the minimum's own score), each
point's threshold the standard error of its per-fold differences to the minimum. Such a choice is not
extended: `choice_edges` records where it sits on its grid's simpler edge.
"""
import itertools
import math
from dataclasses import dataclass

import torch

MAX_EXTENSIONS = 3


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple           # as given: their order breaks ties between equal scores
    integer: bool = False
    floor: float = 0        # the natural bound below: never extended past it
    ceiling: float = math.inf  # the bound above: never extended past it
    simpler: str = ""       # "smaller" or "larger": the direction of the simpler model ("": neither)

    def up(self, value):
        """The next larger value, or None past the ceiling."""
        bigger = value * 2 if value > 0 else (1 if self.integer else None)
        return None if bigger is None or bigger > self.ceiling else bigger

    def down(self, value):
        """The next smaller value, or None at the natural bound."""
        if value <= self.floor:
            return None
        return max(value // 2, self.floor) if self.integer else value / 2


def search(axes, score, budget=MAX_EXTENSIONS):
    """Minimise `score` over the product of `axes`, extending an axis whose choice sits on its edge.
    `score(points)` gets a list of points (tuples of values, in `axes` order) and returns their scores
    (it may batch them). Returns (best point, record): the record holds every point scored, in order,
    with its score, the final values of each axis, the extensions made and what is still `at_edge`."""
    values = {axis.name: list(dict.fromkeys(axis.values)) for axis in axes}
    scored = {}  # point -> score, in the order scored: the first of equal scores wins
    extensions = {axis.name: 0 for axis in axes}
    while True:
        missing = [point for point in itertools.product(*values.values()) if point not in scored]
        if missing:
            # a diverged setting (nan, inf) is never the choice
            scored.update((point, value if math.isfinite(value) else math.inf)
                          for point, value in zip(missing, score(missing)))
        best = min(scored, key=scored.get)
        edges = on_edges(axes, values, scored, best)
        growing = {name: side for name, side in edges.items() if extensions[name] < budget}
        if not growing:
            break
        for axis in axes:
            if axis.name in growing:
                ordered = sorted(values[axis.name])
                new = axis.up(ordered[-1]) if growing[axis.name] == "largest" else axis.down(ordered[0])
                values[axis.name].append(new)
                extensions[axis.name] += 1
    return best, {"points": list(scored), "scores": list(scored.values()),
                  "axes": {name: sorted(found) for name, found in values.items()},
                  "extensions": extensions, "at_edge": edges}


def on_edges(axes, values, scored, best):
    """{axis name: "largest" | "smallest"} of the axes whose chosen value is an edge that beats its inner
    neighbour strictly (the smallest only above the natural bound)."""
    edges = {}
    for position, axis in enumerate(axes):
        ordered = sorted(values[axis.name])
        if len(ordered) < 2:
            continue
        chosen = best[position]
        for side, edge, inner in (("largest", ordered[-1], ordered[-2]), ("smallest", ordered[0], ordered[1])):
            if chosen != edge or (side == "smallest" and axis.down(edge) is None) or \
                    (side == "largest" and axis.up(edge) is None):
                continue
            neighbour = best[:position] + (inner,) + best[position + 1:]
            if scored[best] < scored[neighbour]:
                edges[axis.name] = side
    return edges


def choice_edges(axes, record, chosen):
    """`at_edge` of a choice other than the grid's minimum (`record`: tuning.search's): an axis with
    `simpler` where the choice is its grid's extreme in the simpler direction, with room to go further;
    another axis as `on_edges` has it at the chosen point."""
    edges = on_edges(axes, record["axes"], dict(zip(record["points"], record["scores"])), chosen)
    for position, axis in enumerate(axes):
        if not axis.simpler:
            continue
        edges.pop(axis.name, None)
        ordered, value = sorted(record["axes"][axis.name]), chosen[position]
        if len(ordered) < 2:
            continue
        if axis.simpler == "larger" and value == ordered[-1] and axis.up(value) is not None:
            edges[axis.name] = "largest"
        elif axis.simpler == "smaller" and value == ordered[0] and axis.down(value) is not None:
            edges[axis.name] = "smallest"
    return edges


def simplest_within_one_se(axes, points, fold_scores, scores):
    """Index of the simplest of `points` whose score is within one standard error of the minimum's: the
    standard error of the per-fold differences to the minimum point (`fold_scores` [points, folds], each
    fold's score of each point; `scores` [points], the pooled score). Simplest: by the axes that declare
    `simpler`, in axis order (the first decides, later ones break its ties), then the lower score, then the
    earlier point. A diverged point (nan, inf) is never chosen; with one fold, the minimum."""
    scores = torch.where(scores.isfinite(), scores, math.inf)
    best = int(torch.argmin(scores))  # the first of equal minima
    folds = fold_scores.shape[1]
    if folds < 2 or not math.isfinite(scores[best]):
        return best
    differences = fold_scores - fold_scores[best]
    standard_error = differences.std(dim=1) / math.sqrt(folds)
    within = (scores - scores[best] <= standard_error) & scores.isfinite()
    within[best] = True

    def simplicity(point):
        return tuple(value if axis.simpler == "larger" else -value
                     for axis, value in zip(axes, point) if axis.simpler)

    return max((index for index in range(len(points)) if within[index]),
               key=lambda index: (simplicity(points[index]), -float(scores[index]), -index))
