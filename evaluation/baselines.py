"""Baselines without a neural network, scored on exactly the test targets main.py --test scores.

    python main.py --test_baseline                          # all of them (--baseline=all)
    python main.py --test_baseline --baseline=user-mean     # one of them

* mean-rating: the training users' global mean rating μ for every target.
* user-mean: the mean rating ū of the distinct items in the test user's support set (its support windows).
* shrunk-user-mean: (n·ū + k·μ) / (n + k), n the number of those items; k is chosen on the validation users
  from SHRINKAGE_GRID.
* user-item-bias: the classic cold-start fold-in. Item biases from the training users' ratings,
  b_i = Σ (r − μ) / (n_i + λ_item) (0 for items no training user rated); the user's bias from the support
  items, b_u = Σ (r − μ − b_i) / (n + λ_user); the prediction μ + b_u + b_target, clipped to the training
  ratings' range. (λ_item, λ_user) is chosen on the validation users from ITEM_REG_GRID x USER_REG_GRID.
* mf-fold-in: biased matrix factorisation, r ≈ μ + b_u + b_i + p_u·q_i. Item factors q_i and biases b_i
  from the training users by ALS (ALS_SWEEPS sweeps of ridge solves with penalty λ on each user's and
  item's factor and bias; initial factors from --random_seed). A new user's (p, b_u) minimise
  Σ (r − μ − b_i − b_u − p·q_i)² + λ_u |p|² + λ_b b_u² over the distinct support items, in closed form;
  the prediction μ + b_u + b_target + p·q_target, clipped like user-item-bias. (rank, λ, λ_u, λ_b) is chosen
  on the validation users from RANK_GRID x MF_REG_GRID x FOLD_IN_REG_GRID x FOLD_IN_BIAS_REG_GRID. λ_b has
  its own axis (λ_b = λ_u is in it): the user's bias needs far less shrinkage than its factor, as
  user-item-bias's choices show, and tying them made the fold-in lose to the biases alone.
* mf-fold-in-recalibrated: the MF fold-in as chosen above, its predictions p mapped to a + b·p (clipped
  like the others), with (a, b) fitted by least squares on the validation users' targets (each weighted
  by the inverse share of its rating under --select_by=mean_per_rating_rmse). Two numbers fitted on the
  users that choose every setting: what a gain over the MF fold-in is worth when a global shift and
  spread of its predictions has it too (on ML-1M the fold-in under-predicts a user's latest item).
* fold-in-blend: s · mf-fold-in + (1 − s) · user-item-bias, each at its own choice above, with s from
  BLEND_GRID (0, 0.05, ..., 1) chosen by --select_by on the validation users (an in-sample number, like the
  recalibration's). One number that hedges between the two fold-ins where validation cannot tell which is
  better; a network that adds to a fold-in start should beat it too.

A choice on the validation users minimises --select_by on main.py's fixed validation tasks (the first
--val_size validation users), or for the MF fold-ins may be the simplest setting within one standard
error of that minimum (--grid_choice, `choose`); a grid whose minimum sits on its edge is extended
(tuning.py). The report records the grid searched, every value's validation score, the choice and any axis
on whose edge it still sits (`at_edge`; for a one-standard-error choice, its simpler edge).
Each report is `<checkpoint_dir>/<name>_<mode>.test.json`, with the per-target CSV beside it (and the
validation users' per-target CSV, `.validation.csv`, for compare.py's blend).
"""
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

from common.runtime import write_atomic
from evaluation import metrics, tuning

SHRINKAGE_GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
ITEM_REG_GRID = (0.0, 5.0, 25.0, 100.0)
USER_REG_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
RANK_GRID = (2, 4, 8, 16, 32)
MF_REG_GRID = (1.0, 5.0, 25.0)              # λ of the ALS fit: > 0, so an item without ratings gets q = 0
FOLD_IN_REG_GRID = (1.0, 3.0, 10.0, 30.0)   # λ_u on a new user's factor: > 0, so rank > n stays solvable
FOLD_IN_BIAS_REG_GRID = (0.0, 1.0, 3.0, 10.0, 30.0)  # λ_b on a new user's bias
ALS_SWEEPS = 10
# γ of the fold-ins' recency weights γ^age (mean 1 per user): 1 weighs every support rating alike; never
# extended past 1 (older ratings weighing more)
DECAY_AXIS = tuning.Axis("decay", (1.0, 0.95, 0.9, 0.8), ceiling=1.0)


# ============================================================================ pure functions
class SupportSets(list):
    """Per task, (distinct item ids, their ratings); `ages[t]`: the recency of each of task t's items, how
    many items back from the user's latest support item it was rated (TaskBatch.support_age)."""

    def __init__(self, sets, ages):
        super().__init__(sets)
        self.ages = ages

    def decay_weights(self, decay):
        """Per task, decay ** age of each item, scaled to mean 1 over the task's items (so a fold-in's
        shrinkage λ keeps its meaning: the decay only moves weight from old ratings to recent ones);
        None for decay 1 (every item alike)."""
        if decay == 1:
            return None
        weights = [decay ** ages.astype(np.float64) for ages in self.ages]
        return [w / w.mean() if len(w) else w for w in weights]


def support_sets(support_items, support_ratings, support_mask, support_age=None):
    """Per task, (distinct item ids, their ratings) in its real support windows (numpy [T, S, L] / [T, S]),
    and each item's recency from `support_age` [T, S, L] (0 without it). An item that occurs with several
    ratings (a repeated rating) gets their mean, and its latest recency."""
    sets, ages = [], []
    if support_age is None:
        support_age = np.zeros(np.shape(support_items), np.int64)
    for items, ratings, real, age in zip(support_items, support_ratings, support_mask, support_age):
        keep = real[:, None] & (items != 0)
        distinct, inverse = np.unique(items[keep], return_inverse=True)
        counts = np.bincount(inverse, minlength=len(distinct))
        sets.append((distinct, np.bincount(inverse, ratings[keep].astype(np.float64), len(distinct)) / counts))
        latest = np.full(len(distinct), np.iinfo(np.int64).max)
        np.minimum.at(latest, inverse, age[keep].astype(np.int64))
        ages.append(latest)
    return SupportSets(sets, ages)


def user_mean(sets, fallback):
    """ū per task ([T]); `fallback` for a task without support items."""
    return np.array([ratings.mean() if len(ratings) else fallback for _, ratings in sets])


def shrunk_user_mean(sets, mean, k):
    """(n·ū + k·μ) / (n + k) per task; μ where n + k = 0."""
    return np.array([(ratings.sum() + k * mean) / (len(ratings) + k) if len(ratings) + k > 0 else mean
                     for _, ratings in sets])


def item_biases(items, ratings, mean, reg, num_items):
    """b_i = Σ (r − μ) / (n_i + reg) over the given ratings, as an array indexed by item id 0..num_items
    (0 for an item without ratings)."""
    total = np.bincount(items, np.asarray(ratings, np.float64) - mean, minlength=num_items + 1)
    count = np.bincount(items, minlength=num_items + 1) + reg
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)


def user_item_bias(sets, target_items, mean, biases, reg, low, high, weights=None):
    """μ + b_u + b_target per target ([T, Q] for target_items [T, Q]), clipped to [low, high];
    b_u = Σ (r − μ − b_i) / (n + reg) over the task's support items (0 when n + reg = 0); with `weights`
    (per task, one per item, mean 1: SupportSets.decay_weights), b_u = Σ w (r − μ − b_i) / (Σ w + reg)."""
    if weights is None:
        user = np.array([(ratings - mean - biases[items]).sum() / (len(items) + reg) if len(items) + reg > 0
                         else 0.0 for items, ratings in sets])
    else:
        user = np.array([(w * (ratings - mean - biases[items])).sum() / (w.sum() + reg) if w.sum() + reg > 0
                         else 0.0 for (items, ratings), w in zip(sets, weights)])
    return np.clip(mean + user[:, None] + biases[target_items], low, high)


def normal_equations(index, x, y, count):
    """Per id 0..count-1 of `index` (ascending): Σ x xᵀ [count, k, k] and Σ x·y [count, k] over the rows
    x [N, k], y [N] with that id. One matrix product per id: far faster than summing N outer products."""
    gram, rhs = np.zeros((count, x.shape[1], x.shape[1])), np.zeros((count, x.shape[1]))
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]]) if len(index) else np.zeros(0, np.int64)
    for id_, rows, targets in zip(index[starts], np.split(x, starts[1:]), np.split(y, starts[1:])):
        gram[id_], rhs[id_] = rows.T @ rows, rows.T @ targets
    return gram, rhs


def ridge(gram, rhs, reg):
    """argmin_w |Xw − y|² + Σ_j reg_j w_j² per row, from its normal equations (batched solve); `reg` a
    number or one per coordinate."""
    penalty = np.diag(np.broadcast_to(np.asarray(reg, np.float64), gram.shape[-1:]))
    return np.linalg.solve(gram + penalty, rhs[..., None])[..., 0]


def with_bias(factors):
    return np.hstack([factors, np.ones((len(factors), 1))])


def als(users, items, ratings, mean, num_users, num_items, rank, reg, sweeps, seed):
    """Biased MF by alternating ridge solves on (user id 0..num_users-1, item id 0..num_items) ratings:
    (item biases [num_items + 1], item factors [num_items + 1, rank]); an item without ratings gets 0."""
    factors = np.random.default_rng(seed).normal(0.0, 0.1, (num_items + 1, rank))
    biases = np.zeros(num_items + 1)
    # the ratings sorted by user and by item once, so each sweep gathers only rows of the small tables
    by_user, by_item = np.argsort(users, kind="stable"), np.argsort(items, kind="stable")
    user_rows = users[by_user], items[by_user], ratings[by_user] - mean
    item_rows = items[by_item], users[by_item], ratings[by_item] - mean
    for _ in range(sweeps):
        user, item, residual = user_rows
        user_side = ridge(*normal_equations(user, with_bias(factors)[item], residual - biases[item], num_users), reg)
        item, user, residual = item_rows
        x = with_bias(user_side[:, :rank])[user]
        item_side = ridge(*normal_equations(item, x, residual - user_side[user, rank], num_items + 1), reg)
        factors, biases = item_side[:, :rank], item_side[:, rank]
    return biases, factors


def mf_fold_in(sets, target_items, mean, biases, factors, reg, low, high, bias_reg=None, weights=None):
    """μ + b_u + b_target + p·q_target per target ([T, Q]), clipped to [low, high]; (p, b_u) per task from
    its support items by ridge regression with penalty `reg` on p and `bias_reg` (default `reg`) on b_u
    (0 for a task without support items); with `weights` (per task, one per item), weighted least squares."""
    task = np.concatenate([np.full(len(items), t) for t, (items, _) in enumerate(sets)]).astype(np.int64)
    items = np.concatenate([items for items, _ in sets]).astype(np.int64)
    ratings = np.concatenate([ratings for _, ratings in sets]).astype(np.float64)
    rank = factors.shape[1]
    penalty = [reg] * rank + [reg if bias_reg is None else bias_reg]
    x, y = with_bias(factors)[items], ratings - mean - biases[items]
    if weights is not None:  # rows scaled by √w: Σ w x xᵀ and Σ w x y
        root = np.sqrt(np.concatenate(weights))
        x, y = x * root[:, None], y * root
    user = ridge(*normal_equations(task, x, y, len(sets)), penalty)
    predicted = (mean + user[:, None, rank] + biases[target_items]
                 + np.einsum("tk,tqk->tq", user[:, :rank], factors[target_items]))
    return np.clip(predicted, low, high)


# ============================================================================ fitting and scoring
class Fitted:
    """What the baselines learn from the training users: their ratings, mean and range; with `hold_out` = m,
    all but each training user's latest m ratings (the targets of --train_windows=held-out)."""

    def __init__(self, data, train_users, seed=0, hold_out=0):
        sequences = [data.sequence(u) for u in train_users]
        kept = [(items[:max(0, len(items) - hold_out)], ratings[:max(0, len(items) - hold_out)])
                for items, ratings in sequences]
        self.users = np.concatenate([np.full(len(items), n) for n, (items, _) in enumerate(kept)])
        self.items = np.concatenate([items for items, _ in kept]).astype(np.int64)
        self.ratings = np.concatenate([ratings for _, ratings in kept]).astype(np.float64)
        self.mean = float(self.ratings.mean())
        self.low, self.high = float(self.ratings.min()), float(self.ratings.max())
        self.num_items = int(data.num_items)
        self.num_users, self.seed = len(train_users), seed
        self.factorisations = {}

    def factorisation(self, rank, reg):
        """(item biases, item factors) of ALS at (rank, reg), fitted once (the fold-in's λ_u reuses it)."""
        if (rank, reg) not in self.factorisations:
            self.factorisations[rank, reg] = als(self.users, self.items, self.ratings, self.mean, self.num_users,
                                                 self.num_items, rank, reg, ALS_SWEEPS, self.seed)
        return self.factorisations[rank, reg]


# ------------------------------------------------------------------ the registry
# Each predicts stars [T, Q] for `tasks`' query targets from (tasks, their support sets, the fit on the
# training users, the grid value chosen on the validation users).
def per_user(tasks, values):
    return torch.from_numpy(values)[:, None].expand(tasks.query_mask.shape).clone()


def predict_mean_rating(tasks, sets, fitted, value):
    return per_user(tasks, np.full(tasks.query_mask.shape[0], fitted.mean))


def predict_user_mean(tasks, sets, fitted, value):
    return per_user(tasks, user_mean(sets, fitted.mean))


def predict_shrunk_user_mean(tasks, sets, fitted, value):
    return per_user(tasks, shrunk_user_mean(sets, fitted.mean, value))


def predict_user_item_bias(tasks, sets, fitted, value):
    item_reg, user_reg, decay = value
    biases = item_biases(fitted.items, fitted.ratings, fitted.mean, item_reg, fitted.num_items)
    targets = tasks.query_items[:, :, -1].numpy()
    return torch.from_numpy(user_item_bias(sets, targets, fitted.mean, biases, user_reg, fitted.low, fitted.high,
                                           sets.decay_weights(decay)))


def predict_mf_fold_in(tasks, sets, fitted, value):
    rank, reg, user_reg, user_bias_reg, decay = value
    targets = tasks.query_items[:, :, -1].numpy()
    return torch.from_numpy(mf_fold_in(sets, targets, fitted.mean, *fitted.factorisation(rank, reg), user_reg,
                                       fitted.low, fitted.high, user_bias_reg, sets.decay_weights(decay)))


@dataclass(frozen=True)
class Baseline:
    """One baseline without a network: its row in compare.py's tables, how it predicts, and the grid axes
    it chooses from on the validation users (none: nothing to choose)."""
    label: str
    predict: object
    axes: tuple = ()
    recalibrated: bool = False  # a + b·p, (a, b) fitted on the validation users (`recalibration`)
    blended: bool = False  # s · mf-fold-in + (1 − s) · user-item-bias, s chosen on the validation users (`blend`)


# --baseline's choices and compare.py's rows, in this order
BASELINES = {
    "mean-rating": Baseline("Mean rating", predict_mean_rating),
    "user-mean": Baseline("User mean", predict_user_mean),
    "shrunk-user-mean": Baseline("Shrunk user mean", predict_shrunk_user_mean,
                                 (tuning.Axis("shrinkage", SHRINKAGE_GRID),)),
    "user-item-bias": Baseline("User + item bias", predict_user_item_bias,
                               (tuning.Axis("item_reg", ITEM_REG_GRID), tuning.Axis("user_reg", USER_REG_GRID),
                                DECAY_AXIS)),
    "mf-fold-in": Baseline("MF fold-in", predict_mf_fold_in,
                           # simpler: a lower rank, a stronger ALS λ, a stronger λ_u (nearer the bias fold-in)
                           (tuning.Axis("rank", RANK_GRID, integer=True, floor=1, simpler="smaller"),
                            tuning.Axis("reg", MF_REG_GRID, simpler="larger"),
                            tuning.Axis("user_reg", FOLD_IN_REG_GRID, simpler="larger"),
                            tuning.Axis("user_bias_reg", FOLD_IN_BIAS_REG_GRID), DECAY_AXIS)),
}
BASELINES["mf-fold-in-recalibrated"] = dataclasses.replace(BASELINES["mf-fold-in"], label="MF fold-in, recalibrated",
                                                           recalibrated=True)
# its own axes are its parts' (`BLEND_PARTS`), searched by each part's own `choose`
BASELINES["fold-in-blend"] = Baseline("Fold-in blend (MF, user + item bias)", None, blended=True)
BLEND_PARTS = ("user-item-bias", "mf-fold-in")  # (1 − s), s
BLEND_GRID = tuple(round(0.05 * k, 2) for k in range(21))


def axes(name):
    """The grid axes baseline `name` chooses from on the validation users (none: nothing to choose)."""
    return list(BASELINES[name].axes)


def predict(name, tasks, sets, fitted, value):
    """Predicted stars [T, Q] of baseline `name` (with grid value `value`) for `tasks`' query targets."""
    return BASELINES[name].predict(tasks, sets, fitted, value)


def sets_of(tasks):
    return support_sets(tasks.support_items.numpy(), tasks.support_ratings.numpy(), tasks.support_mask.numpy(),
                        tasks.support_age.numpy())


def choose(name, val_tasks, fitted, max_rating, select_by, grid_choice, searched_axes=None):
    """The grid value of `name` chosen on the validation users by `select_by`, and the record of the
    search, with its `cross_fitted_score`. The grid is extended where its minimum sits on its edge
    (tuning.search). Where the axes say what is simpler (the MF fold-in), a second rule competes with the
    minimum: the simplest point within one standard error of it (tuning.simplest_within_one_se, over the
    cross-fitting folds). `grid_choice` "auto" takes the rule with the lower cross-fitted score (each rule
    applied within the folds), "one-se" or "minimum" that rule; other baselines take the minimum.
    `searched_axes`: other axes than the baseline's own."""
    found = axes(name) if searched_axes is None else searched_axes
    if not found:
        return None, None
    sets = sets_of(val_tasks)
    fold_of_user = cross_fit_folds(len(val_tasks))
    num_folds = int(fold_of_user.max()) + 1 if len(fold_of_user) else 1
    fold_sums = {}  # point -> error sums of each fold's users [folds, buckets, fields], in the order scored

    def value_of(point):
        return point[0] if len(point) == 1 else point

    def predict_at(point):
        return predict(name, val_tasks, sets, fitted, value_of(point))

    def score(points):
        scores = []
        for point in points:
            predicted = predict_at(point)
            fold_sums[point] = metrics.error_sums(predicted, val_tasks.query_ratings[:, :, -1], val_tasks.query_mask,
                                                  max_rating, fold_of_user[:, None].expand_as(predicted), num_folds)
            scores.append(metrics.task_report(predicted, val_tasks, max_rating)[select_by])
        return scores

    minimum, searched = tuning.search(found, score)
    points = list(fold_sums)
    sums = torch.stack([fold_sums[point] for point in points])  # [points, folds, buckets, fields]
    # each rule: (its choice, its one_se_axes); "one-se" only where the axes say what is simpler
    rules = {"minimum": (minimum, None)}
    if grid_choice != "minimum" and any(axis.simpler for axis in found):
        rules["one-se"] = (points[chosen_index(points, sums, select_by, found)], found)
    scored = {rule: (best, cross_fitted_score(points, sums, fold_of_user, predict_at, val_tasks, max_rating,
                                              select_by, one_se_axes))
              for rule, (best, one_se_axes) in rules.items()}
    if grid_choice == "auto":  # the rule whose cross-fitted score is the lower (the minimum on a tie)
        rule = min(scored, key=lambda candidate: scored[candidate][1])
    else:  # "one-se" where it applies, else the minimum
        rule = grid_choice if grid_choice in scored else "minimum"
    grid = [point[0] if len(point) == 1 else list(point) for point in searched["points"]]
    best = scored[rule][0]
    at_edge = searched["at_edge"] if best == minimum else tuning.choice_edges(found, searched, best)
    return value_of(best), {
        "select_by": select_by, "grid_choice": rule, "grid_minimum": value_of(minimum), "grid": grid,
        "validation_scores": searched["scores"], "axes": searched["axes"], "extensions": searched["extensions"],
        "at_edge": at_edge, "cross_fitted_score": scored[rule][1],
        "cross_fitted_scores": {candidate: score for candidate, (_, score) in scored.items()}}


def chosen_index(points, sums, select_by, one_se_axes=None):
    """Index of the grid point chosen from its error sums per fold [points, folds, buckets, fields]: the
    minimum of the pooled `select_by` (the first of equal minima; a diverged point, nan or inf, never), or
    with `one_se_axes` (the searched axes) the simplest within one standard error of it."""
    scores = metrics.scores_from_sums(sums.sum(1), select_by)
    if one_se_axes is None:
        return int(torch.argmin(torch.where(scores.isfinite(), scores, math.inf)))
    return tuning.simplest_within_one_se(one_se_axes, points, metrics.scores_from_sums(sums, select_by), scores)


CROSS_FIT_FOLDS = 10


def cross_fit_folds(num_users, folds=CROSS_FIT_FOLDS):
    """Each validation user's fold [users], of min(folds, users) folds, by position (user i in fold
    i mod folds; fewer than 10 users: one fold each): the same folds for every baseline and grid."""
    return torch.arange(num_users) % min(folds, num_users)


def cross_fitted_score(points, sums, fold_of_user, predict_at, val_tasks, max_rating, select_by, one_se_axes=None):
    """The validation `select_by` of a grid search with each fold's users predicted at the grid point that
    the search's rule (`chosen_index`: the minimum, or with `one_se_axes` the one-standard-error rule)
    chooses on the other folds' users (K-fold cross-fitting; one fold: the choice on it). A grid's minimum
    is optimistic by how many points it holds and how few users choose among them: on ~100 validation users
    the MF fold-in's ~2,000 points beat the user + item bias fold-in's ~150 by 0.02-0.03 there and lost to
    it on the test users. So baselines with grids of different sizes are compared by this score
    (`bias_start`, compare.py's best no-network baseline), never by their minima.
    `points`: the grid points in the order scored (the first of equal scores wins, as in tuning.search, and
    where none is finite the first point); `sums`: their error sums per fold [points, folds, buckets,
    fields]; `predict_at(point)`: the validation predictions there."""
    folds = sums.shape[1]
    chosen = []
    for fold in range(folds):
        others = [other for other in range(folds) if other != fold] or [fold]
        chosen.append(points[chosen_index(points, sums[:, others], select_by, one_se_axes)])
    predictions = {point: predict_at(point) for point in dict.fromkeys(chosen)}  # each chosen point once
    assembled = predictions[chosen[0]].clone()
    for fold, point in enumerate(chosen):
        users = fold_of_user == fold
        assembled[users] = predictions[point][users]
    return metrics.task_report(assembled, val_tasks, max_rating)[select_by]


def factor_axes(max_rank):
    """The MF fold-in's grid with its ranks capped at `max_rank` (the head's --user_factors)."""
    rank, *others = axes("mf-fold-in")
    ranks = tuple(r for r in rank.values if r <= max_rank) or (max_rank,)
    return [dataclasses.replace(rank, values=ranks, ceiling=max_rank), *others]


START_CACHE_VERSION = 4  # 3: the two fold-ins compared by cross-fitted scores; 4: --grid_choice


@dataclass(frozen=True)
class HeadStart:
    """Where the bias rating head starts (`models.heads.BiasHead.set_start`'s keyword arguments), in normalised
    ratings: μ, the item biases and factors (None: unchanged), and the fold-in's λs and recency decay for
    each task's start of (b_user, p_user) (None: no per-task start, or no factor solve). Under
    --bias_start=blend also s (`blend_weight`), the MF fold-in's item biases minus the user + item bias
    fold-in's (`blend_item_offset`) and the latter's λ_user and γ (`blend_bias_reg`, `blend_bias_decay`):
    the item biases are then the blend's, (1 − s) · bias fold-in's + s · MF's, and the user's part of each
    fold-in is solved per task and mixed the same way."""
    mean: float
    item_biases: np.ndarray = None
    user_bias_reg: float = None
    item_factors: np.ndarray = None
    user_factor_reg: float = None
    user_decay: float = None
    blend_weight: float = None
    blend_item_offset: np.ndarray = None
    blend_bias_reg: float = None
    blend_bias_decay: float = None


def bias_start_cache_path(data, dataset, args):
    """Where `bias_start`'s result is kept between the runs of a study: keyed on the data's content, the
    task configuration (the split, the validation tasks, and --train_windows / --train_query_targets, which
    say what `held_out_ratings` leaves out), every flag it reads, the grids and the ALS settings, so a
    change of any of them computes it anew."""
    key = json.dumps({"fingerprint": data.fingerprint(), "tasks": dataclasses.asdict(dataset.config),
                      "flags": {name: getattr(args, name) for name in ("rating_head", "user_factors", "bias_start",
                                                                       "user_bias_start", "select_by",
                                                                       "grid_choice")},
                      "grids": [axes("user-item-bias"), axes("mf-fold-in"), ALS_SWEEPS, tuning.MAX_EXTENSIONS,
                                BLEND_GRID],
                      "version": START_CACHE_VERSION}, sort_keys=True, default=str)
    return os.path.join(args.data_dir, "cache", f"bias-start-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npz")


def cached_bias_start(data, dataset, args):
    """`bias_start`, read from its cache file when one was written for the same data, tasks and flags (a
    study's runs share it; the MF search refits ALS for every rank and λ, minutes on ML-1M), else computed
    and written. An unreadable cache file is computed anew, never trusted."""
    path = bias_start_cache_path(data, dataset, args)
    names = [field.name for field in dataclasses.fields(HeadStart)]
    try:
        with np.load(path, allow_pickle=False) as stored:
            found = {name: stored[name] for name in stored.files}
        return HeadStart(**{name: (found[name] if found[name].ndim else float(found[name]))
                            for name in names if name in found})
    except FileNotFoundError:
        pass
    except Exception as error:  # noqa: BLE001 (a corrupt or foreign file: recomputed)
        print(f"warning: ignoring the unreadable start cache {path} ({error})", file=sys.stderr)
    start = bias_start(data, dataset, args)
    arrays = {name: np.asarray(getattr(start, name), np.float64) for name in names
              if getattr(start, name) is not None}
    try:
        write_atomic(path, lambda out: np.savez(out, **arrays))
    except OSError as error:  # a read-only data folder only costs the next run its time
        print(f"warning: could not write the start cache {path}: {error}", file=sys.stderr)
    return start


def held_out_ratings(args):
    """How many of each training user's latest ratings the fitted start leaves out: the targets of the
    training tasks under --train_windows=held-out, so that the tables have not seen them (a new user's
    target is unseen too), else none."""
    return args.train_query_targets if args.train_windows == "held-out" else 0


def bias_start(data, dataset, args):
    """Where the bias rating head starts (a HeadStart): the training users' mean μ; with
    --bias_start=fold-in, the user + item bias fold-in's item biases (zero biases with --bias_start=zero);
    with --user_bias_start=fold-in, its user-bias shrinkage λ_user and recency decay γ (else None). Each
    fold-in's regularisation and decay are chosen on the validation users as for its own report.

    With --user_factors=K and --bias_start=fold-in, the MF fold-in of rank <= K competes on the validation
    users: where its `cross_fitted_score` is the lower, the item biases and factors are its ALS fit's and
    (with --user_bias_start=fold-in) λ_b, λ_u and γ its choices, so the head starts as the MF fold-in; else
    the factors stay 0 and it starts as the user + item bias fold-in. With --train_windows=held-out the fits leave
    out each training user's latest --train_query_targets ratings (`held_out_ratings`).

    With --bias_start=blend (and --user_factors) the head starts as the fold-in blend instead, s chosen on the
    validation users as for its report (`blend_choice`): s = 1 is the MF fold-in's start, s = 0 the user +
    item bias fold-in's (with a zero factor term)."""
    fitted = Fitted(data, dataset.train_users, args.random_seed, held_out_ratings(args))
    start = {"mean": fitted.mean / data.max_rating}
    if args.bias_start == "blend":
        return HeadStart(**start, **blend_start(fitted, dataset.val_tasks(), data.max_rating, args))
    if args.bias_start == "fold-in" or args.user_bias_start == "fold-in":
        val_tasks = dataset.val_tasks()
        (item_reg, user_reg, decay), searched = choose("user-item-bias", val_tasks, fitted, data.max_rating,
                                                       args.select_by, args.grid_choice)
        if args.bias_start == "fold-in":
            start["item_biases"] = item_biases(fitted.items, fitted.ratings, fitted.mean, item_reg,
                                               fitted.num_items) / data.max_rating
        if args.user_bias_start == "fold-in":
            start.update(user_bias_reg=user_reg, user_decay=decay)
        if args.user_factors and args.bias_start == "fold-in":
            (rank, reg, factor_reg, bias_reg, decay), mf_searched = choose(
                "mf-fold-in", val_tasks, fitted, data.max_rating, args.select_by, args.grid_choice,
                factor_axes(args.user_factors))
            # by cross-fitted scores: the minimum of the far larger MF grid is the more optimistic
            if mf_searched["cross_fitted_score"] < searched["cross_fitted_score"]:
                biases, factors = fitted.factorisation(rank, reg)
                start.update(item_biases=biases / data.max_rating, item_factors=factors)
                if args.user_bias_start == "fold-in":
                    start.update(user_bias_reg=bias_reg, user_factor_reg=factor_reg, user_decay=decay)
    return HeadStart(**start)


def blend_start(fitted, val_tasks, max_rating, args):
    """`bias_start`'s fields under --bias_start=blend (normalised ratings)."""
    values, s, _, _ = blend_choice(val_tasks, fitted, max_rating, args.select_by, args.grid_choice,
                                   factor_axes(args.user_factors))
    (item_reg, bias_user_reg, bias_decay), (rank, reg, factor_reg, mf_user_reg, mf_decay) = (
        values[part] for part in BLEND_PARTS)
    bias_items = item_biases(fitted.items, fitted.ratings, fitted.mean, item_reg, fitted.num_items)
    mf_items, factors = fitted.factorisation(rank, reg)
    start = {"item_biases": ((1 - s) * bias_items + s * mf_items) / max_rating, "item_factors": factors,
             "blend_weight": s, "blend_item_offset": (mf_items - bias_items) / max_rating}
    if args.user_bias_start == "fold-in":
        start.update(user_bias_reg=mf_user_reg, user_factor_reg=factor_reg, user_decay=mf_decay,
                     blend_bias_reg=bias_user_reg, blend_bias_decay=bias_decay)
    return start


def start_bias_head(backbone, data, dataset, args):
    """Set the rating head's start fitted on the training data (`bias_start`) on `backbone`, as every
    trainer does; nothing for a head that fits none (the plain head)."""
    head = backbone.rating_head
    if head.fits_start:
        head.set_start(backbone, **dataclasses.asdict(cached_bias_start(data, dataset, args)))


def chosen_fields(name, value):
    """{axis name: chosen value} of baseline `name` (a one-axis baseline's value is the value itself)."""
    names = [axis.name for axis in axes(name)]
    return dict(zip(names, value if len(names) > 1 else (value,))) if names else {}


def recalibration(predicted, tasks, select_by, max_rating):
    """(a, b) minimising Σ w (r − a − b·p)² over `tasks`' targets r and predictions p [T, Q]: w = 1 for
    --select_by=rmse; under mean_per_rating_rmse each target's metrics.balanced_rating_weights among the
    targets (the mean over ratings of each rating's mean squared error: that metric's squares)."""
    mask = tasks.query_mask
    p = predicted[mask].double().numpy()
    r = tasks.query_ratings[..., -1][mask].double().numpy()
    weights = np.ones_like(r)
    if select_by == "mean_per_rating_rmse":
        weights = metrics.balanced_rating_weights(r, max_rating).numpy()[metrics.half_star_buckets(r)]
    design = np.stack([np.ones_like(p), p], axis=1)
    a, b = np.linalg.solve(design.T @ (design * weights[:, None]), design.T @ (weights * r))
    return float(a), float(b)


def blend_choice(val_tasks, fitted, max_rating, select_by, grid_choice, mf_axes=None):
    """fold-in-blend's choices on the validation users: each of BLEND_PARTS chosen as for its own report (the
    MF fold-in on `mf_axes`, default its own), then s from BLEND_GRID minimising `select_by` on the mix of
    their validation predictions (the first of equal scores: the lower s). Returns {part: its chosen value},
    s, the selection record (every s's score, each part's search) and the mix's validation predictions."""
    values, parts, predicted = {}, {}, {}
    sets = sets_of(val_tasks)
    for part in BLEND_PARTS:
        values[part], selection = choose(part, val_tasks, fitted, max_rating, select_by, grid_choice,
                                         mf_axes if part == "mf-fold-in" else None)
        parts[part] = without_cross_fit(selection)
        predicted[part] = predict(part, val_tasks, sets, fitted, values[part])
    bias, mf = (predicted[part] for part in BLEND_PARTS)
    scores = [metrics.task_report(s * mf + (1 - s) * bias, val_tasks, max_rating)[select_by] for s in BLEND_GRID]
    s = BLEND_GRID[int(np.argmin(scores))]
    return values, s, {"select_by": select_by, "grid": list(BLEND_GRID), "validation_scores": scores,
                       "axes": ["mf_weight"], "at_edge": {}, "parts": parts}, s * mf + (1 - s) * bias


def without_cross_fit(selection):
    """A search record without its cross-fitted scores: for a baseline whose score is not its search's own
    (the recalibrated MF fold-in's, the blend's parts)."""
    return {field: entry for field, entry in selection.items()
            if field not in ("cross_fitted_score", "cross_fitted_scores")}


def blend(val_tasks, tasks, fitted, max_rating, select_by, grid_choice):
    """fold-in-blend's predictions of the test and validation tasks' targets (stars [T, Q] each), its
    report fields (each part's chosen values under its name, and s) and its selection record
    (`blend_choice`). A convex mix of clipped predictions needs no clip of its own."""
    values, s, selection, val_predicted = blend_choice(val_tasks, fitted, max_rating, select_by, grid_choice)
    fields = {f"{part.replace('-', '_')}_{axis}": chosen
              for part in BLEND_PARTS for axis, chosen in chosen_fields(part, values[part]).items()}
    fields["mf_weight"] = s
    sets = sets_of(tasks)
    bias, mf = (predict(part, tasks, sets, fitted, values[part]) for part in BLEND_PARTS)
    return s * mf + (1 - s) * bias, val_predicted, fields, selection


def report_path(args, name):
    return os.path.join(args.checkpoint_dir, f"{name}_{args.mode}.test.json")


def test(args, data, dataset, name, publish=True):
    """Choose (on the validation users), predict and score baseline `name` on the test users; publish
    the report and the per-target CSV (rank 0's job: publish=False elsewhere). Returns the report."""
    fitted = Fitted(data, dataset.train_users, args.random_seed)
    val_tasks, tasks = dataset.val_tasks(), dataset.test_tasks()
    if BASELINES[name].blended:
        predicted, val_predicted, fields, selection = blend(val_tasks, tasks, fitted, data.max_rating, args.select_by,
                                                            args.grid_choice)
    else:
        value, selection = choose(name, val_tasks, fitted, data.max_rating, args.select_by, args.grid_choice)
        predicted = predict(name, tasks, sets_of(tasks), fitted, value)
        val_predicted = predict(name, val_tasks, sets_of(val_tasks), fitted, value)
        fields = chosen_fields(name, value)
    if BASELINES[name].recalibrated:
        a, b = recalibration(val_predicted, val_tasks, args.select_by, data.max_rating)
        predicted, val_predicted = ((a + b * p).clamp(fitted.low, fitted.high) for p in (predicted, val_predicted))
        fields.update(recalibration_a=a, recalibration_b=b)
    report = metrics.task_report(predicted, tasks, data.max_rating)
    report.update(method=name.replace("-", "_"), mode=args.mode, random_seed=args.random_seed,
                  training_mean=fitted.mean, **fields)
    if name == "mean-rating":
        report["prediction"] = fitted.mean
    if selection is not None:
        if BASELINES[name].recalibrated:  # its search's cross-fitted score is the MF fold-in's, not its own
            selection = without_cross_fit(selection)
        report["selection"] = selection
    if publish:
        chosen = ", ".join(f"{k} {v:g}" for k, v in fields.items())
        metrics.publish(report, f"test {name} baseline{f' ({chosen}, chosen on validation)' if chosen else ''} "
                                f"on {args.mode}", report_path(args, name),
                        metrics.prediction_frame(tasks, predicted, data),
                        metrics.prediction_frame(val_tasks, val_predicted, data), data.fingerprint())
    return report
