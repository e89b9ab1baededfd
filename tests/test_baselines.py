"""baselines.py against hand computations: the pure functions on numbers worked out by hand, and each
baseline's test predictions (read back from its CSV) against plain-Python loops over a generated data set."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from evaluation import baselines, metrics
import main
import options
from ratings.preprocess import load_data
from ratings.tasks import MetaDataset

from ratings.synthetic import write_movielens


def test_pure_functions_equal_hand_computations():
    # one task: windows [0, 7, 3] and [7, 9] (item 7 twice, padding 0), a third window that is not real
    items = np.array([[[0, 7, 3], [0, 7, 9], [5, 5, 5]]])
    ratings = np.array([[[0, 4, 2], [0, 4, 5], [1, 1, 1]]], dtype=np.float32)
    mask = np.array([[True, True, False]])
    (distinct, values), = baselines.support_sets(items, ratings, mask)
    assert distinct.tolist() == [3, 7, 9] and values.tolist() == [2.0, 4.0, 5.0]
    sets = [(distinct, values), (np.array([], np.int64), np.array([]))]
    assert baselines.user_mean(sets, fallback=3.5).tolist() == pytest.approx([11 / 3, 3.5])
    # (n·ū + k·μ) / (n + k) with n = 3, ū = 11/3, μ = 3, k = 2: (11 + 6) / 5
    assert baselines.shrunk_user_mean(sets, 3.0, 2.0).tolist() == pytest.approx([17 / 5, 3.0])
    # item biases: item 3 rated 4 and 2 (mean 3), item 7 rated 5; μ = 3, reg 1: b3 = 0 / 3, b7 = 2 / 2
    biases = baselines.item_biases(np.array([3, 3, 7]), np.array([4.0, 2.0, 5.0]), 3.0, 1.0, num_items=9)
    assert biases.tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 0, 1.0, 0, 0])
    # b_u = ((2 − 3 − 0) + (4 − 3 − 1) + (5 − 3 − 0)) / (3 + 1) = 1 / 4; target 7: 3 + 0.25 + 1
    predicted = baselines.user_item_bias(sets[:1], np.array([[7, 3]]), 3.0, biases, 1.0, low=1.0, high=5.0)
    assert predicted.shape == (1, 2) and predicted[0].tolist() == pytest.approx([4.25, 3.25])
    # clipped to the training range: 3 + 0.25 + 1 = 4.25 > 4
    assert baselines.user_item_bias(sets[:1], np.array([[7]]), 3.0, biases, 1.0, 1.0, 4.0).tolist() == [[4.0]]


@pytest.fixture(scope="module")
def run_all(tmp_path_factory):
    """`main.py --test_baseline` (all baselines) on a small generated file; the data and split it used."""
    folder = tmp_path_factory.mktemp("baselines")
    path = folder / "u.data"
    write_movielens(str(path), fmt="ml-100k", num_users=90, num_items=60, seed=5)
    argv = ["--mode=ml-100k", f"--data_path={path}", f"--data_dir={folder}/Data", "--min_item=1",
            "--num_test_data=15", "--val_size=12", "--num_samples=4", "--num_query_set=3", "--max_seq_len=8",
            f"--checkpoint_dir={folder}/ckpt", "--test_baseline"]
    args = options.parse_args(argv)
    reports = main.main(args)
    data = load_data(args)
    return args, data, MetaDataset.from_args(data, args), reports


def by_hand(data, dataset, users, tasks):
    """Per task: the user's original id, {item: rating} of the distinct support items (from the user's own
    history, not the windows' ratings), and the target item."""
    return [row[:4] for row in by_hand_with_ages(data, users, tasks)]


def by_hand_with_ages(data, users, tasks):
    """by_hand's rows, each with {item: age} too: how many items back from the one before the target the
    user rated it (their position in the user's own history)."""
    rows = []
    for t, u in enumerate(users):
        items, ratings = data.sequence(u)
        rating_of = dict(zip(items.tolist(), ratings.tolist()))
        position = {item: p for p, item in enumerate(items.tolist())}
        support = {}
        for s in range(tasks.support_items.shape[1]):
            if tasks.support_mask[t, s]:
                for item in tasks.support_items[t, s].tolist():
                    if item:
                        support[item] = rating_of[item]
        target = int(tasks.query_items[t, 0, -1])
        ages = {item: position[target] - 1 - position[item] for item in support}
        rows.append((data.user_ids[u], support, target, float(tasks.query_ratings[t, 0, -1]), ages))
    return rows


def decayed(ages, decay):
    """{item: γ^age, scaled to mean 1 over the user's items}."""
    weights = {item: decay ** age for item, age in ages.items()}
    mean = sum(weights.values()) / len(weights)
    return {item: w / mean for item, w in weights.items()}


def predictions(args, name):
    frame = pd.read_csv(metrics.predictions_path(baselines.report_path(args, name)))
    return frame.groupby("user")["prediction"].agg(["min", "max"])


def rmse(pairs):
    return math.sqrt(sum((p - r) ** 2 for p, r in pairs) / len(pairs))


def test_user_mean_and_global_mean_equal_hand_computations(run_all):
    args, data, dataset, reports = run_all
    train = [r for u in dataset.train_users for r in data.sequence(u)[1].tolist()]
    mu = sum(train) / len(train)
    assert reports["mean-rating"]["prediction"] == pytest.approx(mu)
    rows = by_hand(data, dataset, dataset.test_users, dataset.test_tasks())
    user_mean = predictions(args, "user-mean")
    for user, support, _, _ in rows:
        expected = sum(support.values()) / len(support)
        assert user_mean.loc[user, "min"] == pytest.approx(expected) == user_mean.loc[user, "max"]
    assert json.load(open(baselines.report_path(args, "user-mean")))["count"] == 15 * 3


def test_shrunk_user_mean_chooses_k_on_validation(run_all):
    args, data, dataset, reports = run_all
    train = [r for u in dataset.train_users for r in data.sequence(u)[1].tolist()]
    mu = sum(train) / len(train)

    def shrunk(support, k):
        return (sum(support.values()) + k * mu) / (len(support) + k)

    val = by_hand(data, dataset, dataset.val_users[:args.val_size], dataset.val_tasks())
    report = reports["shrunk-user-mean"]
    searched = report["selection"]["grid"]  # SHRINKAGE_GRID, then any extension past its edge
    assert searched[:len(baselines.SHRINKAGE_GRID)] == list(baselines.SHRINKAGE_GRID)
    scores = [rmse([(shrunk(s, k), r) for _, s, _, r in val]) for k in searched]
    k = searched[int(np.argmin(scores))]
    assert report["shrinkage"] == k and report["selection"]["validation_scores"] == pytest.approx(scores)
    table = predictions(args, "shrunk-user-mean")
    for user, support, _, _ in by_hand(data, dataset, dataset.test_users, dataset.test_tasks()):
        assert table.loc[user, "min"] == pytest.approx(shrunk(support, k))


def test_user_item_bias_fold_in_equals_hand_computation(run_all):
    args, data, dataset, reports = run_all
    train = [(i, r) for u in dataset.train_users for i, r in zip(*(a.tolist() for a in data.sequence(u)))]
    mu = sum(r for _, r in train) / len(train)
    low, high = min(r for _, r in train), max(r for _, r in train)

    def predict(support, target, ages, item_reg, user_reg, decay):
        bias = {}
        for item in set(support) | {target}:
            rated = [r - mu for i, r in train if i == item]
            bias[item] = sum(rated) / (len(rated) + item_reg) if len(rated) + item_reg else 0.0
        weight = decayed(ages, decay)  # recent ratings count more for γ < 1 (every weight 1 at γ = 1)
        user = (sum(weight[i] * (r - mu - bias[i]) for i, r in support.items())
                / (sum(weight.values()) + user_reg))
        return min(max(mu + user + bias[target], low), high)

    report = reports["user-item-bias"]
    item_reg, user_reg, decay = report["item_reg"], report["user_reg"], report["decay"]
    val = by_hand_with_ages(data, dataset.val_users[:args.val_size], dataset.val_tasks())
    chosen = rmse([(predict(s, t, ages, item_reg, user_reg, decay), r) for _, s, t, r, ages in val])
    assert chosen == pytest.approx(min(report["selection"]["validation_scores"]))
    for point in ((25.0, 10.0, 1.0), (25.0, 10.0, 0.8)):  # grid points: never better
        assert chosen <= rmse([(predict(s, t, ages, *point), r) for _, s, t, r, ages in val]) + 1e-12
    table = predictions(args, "user-item-bias")
    for user, support, target, _, ages in by_hand_with_ages(data, dataset.test_users, dataset.test_tasks()):
        assert table.loc[user, "min"] == pytest.approx(predict(support, target, ages, item_reg, user_reg, decay))


def test_error_sums_per_group_and_the_scores_from_sums_equal_the_reports():
    generator = torch.Generator().manual_seed(0)
    target = torch.randint(1, 5, (7, 3), generator=generator).double()  # ratings 1-4: bucket 5★ stays empty
    predicted = target + torch.randn(7, 3, generator=generator, dtype=torch.float64)
    mask = torch.rand(7, 3, generator=generator) < 0.8
    groups = (torch.arange(7) % 3)[:, None].expand(7, 3)
    grouped = metrics.error_sums(predicted, target, mask, 5.0, groups, 3)
    for group in range(3):
        assert torch.allclose(grouped[group], metrics.error_sums(predicted, target, mask & (groups == group), 5.0))
    for select_by in ("rmse", "mean_per_rating_rmse"):
        found = metrics.scores_from_sums(grouped, select_by)
        assert found.tolist() == pytest.approx([metrics.report_from_sums(sums)[select_by] for sums in grouped])
    with pytest.raises(ValueError, match="mae"):
        metrics.scores_from_sums(grouped, "mae")


def one_se_by_hand(points, squared, counts, users, fold_of_user):
    """The one-standard-error rule in plain Python over `users` (a boolean mask) in their folds
    (`fold_of_user`): the pooled RMSE's minimum, the standard error of each point's per-fold RMSE
    differences to it, and among the points within one of it the simplest (lowest rank, then largest ALS λ,
    then largest λ_u), then the lower score, then the earlier point. `squared` [points, users]: summed
    squared errors."""
    members = np.flatnonzero(users)
    folds = [members[fold_of_user[members] == fold] for fold in sorted(set(fold_of_user[members].tolist()))]
    pooled = [math.sqrt(squared[p, members].sum() / counts[members].sum()) for p in range(len(points))]
    per_fold = [[math.sqrt(squared[p, fold].sum() / counts[fold].sum()) for fold in folds]
                for p in range(len(points))]
    best = min(range(len(points)), key=lambda p: pooled[p])

    def standard_error(p):
        differences = [a - b for a, b in zip(per_fold[p], per_fold[best])]
        mean = sum(differences) / len(differences)
        return math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1) / len(differences))

    within = [p for p in range(len(points)) if pooled[p] - pooled[best] <= standard_error(p)]
    return max(within, key=lambda p: (-points[p][0], points[p][1], points[p][2], -pooled[p], -p))


def test_the_cross_fitted_score_predicts_each_fold_at_the_grid_point_chosen_on_the_other_folds(run_all):
    # the user + item bias fold-in chooses the grid's minimum; the MF fold-in (--grid_choice=auto, the
    # default) the minimum or the one-standard-error choice, whichever cross-fits better: both by hand
    args, data, dataset, reports = run_all
    fitted = baselines.Fitted(data, dataset.train_users, args.random_seed)
    val = dataset.val_tasks()
    target, mask = val.query_ratings[:, :, -1].double().numpy(), val.query_mask.numpy()
    folds = np.arange(len(val)) % 10
    assert len(val) == 10  # (one validation user a fold: the fixture's --val_size=12 finds 10)
    for name, rules in (("user-item-bias", ("minimum",)), ("mf-fold-in", ("minimum", "one-se"))):
        selection = reports[name]["selection"]
        points = [tuple(point) for point in selection["grid"]]
        predicted = [baselines.predict(name, val, baselines.sets_of(val), fitted, point).double().numpy()
                     for point in points]
        squared = np.stack([(((p - target) ** 2) * mask).sum(1) for p in predicted])  # [points, users]
        counts = mask.sum(1)

        def choice(rule, users):
            if rule == "minimum":
                return int(np.argmin(squared[:, users].sum(1)))
            return one_se_by_hand(points, squared, counts, users, folds)

        by_hand = {}
        for rule in rules:
            assembled = np.zeros_like(target)
            for fold in range(10):
                assembled[folds == fold] = predicted[choice(rule, folds != fold)][folds == fold]
            by_hand[rule] = metrics.task_report(torch.from_numpy(assembled), val, data.max_rating)["rmse"]
        assert selection["cross_fitted_scores"] == pytest.approx(by_hand, abs=1e-12)
        rule = min(rules, key=by_hand.get)
        assert selection["grid_choice"] == rule and selection["cross_fitted_score"] == by_hand[rule]
        chosen = points[choice(rule, np.ones(len(val), bool))]
        assert [reports[name][axis.name] for axis in baselines.axes(name)] == pytest.approx(list(chosen))
        assert tuple(np.atleast_1d(selection["grid_minimum"])) == points[int(np.argmin(squared.sum(1)))]
    # on this draw the two MF rules choose apart (else the test could not tell them); each on its own
    mf = reports["mf-fold-in"]["selection"]
    assert len(set(mf["cross_fitted_scores"].values())) == 2
    for rule in ("minimum", "one-se"):
        value, selection = baselines.choose("mf-fold-in", val, fitted, data.max_rating, "rmse", rule)
        assert selection["grid_choice"] == rule and selection["cross_fitted_score"] == mf["cross_fitted_scores"][rule]
        assert set(selection["cross_fitted_scores"]) == ({"minimum"} if rule == "minimum" else {"minimum", "one-se"})
        assert (list(value) == list(mf["grid_minimum"])) == (rule == "minimum")


@pytest.mark.parametrize("select_by", ["rmse", "mean_per_rating_rmse"])
def test_the_cross_fitted_score_on_planted_predictions_equals_a_plain_loop(select_by):
    # 23 users, one target each, in 10 folds by position (3, 3, 3, 2, ..., 2); five grid points: the first
    # diverged (nan), the last a copy of the third (an equal score: the earlier point wins)
    assert baselines.cross_fit_folds(23).tolist() == [i % 10 for i in range(23)]
    assert baselines.cross_fit_folds(3).tolist() == [0, 1, 2]
    rng = np.random.default_rng(10)  # (a draw on which the folds choose three different points)
    target = torch.from_numpy(rng.integers(1, 6, 23).astype(np.float64))
    grid = [torch.full((23,), math.nan)] + [target + torch.from_numpy(rng.normal(0, s, 23)) for s in (0.6, 0.6, 0.6)]
    grid.append(grid[2].clone())
    tasks = SimpleNamespace(query_ratings=target[:, None, None], query_mask=torch.ones(23, 1, dtype=torch.bool))
    fold_of_user = baselines.cross_fit_folds(23)
    fold_sums = {point: metrics.error_sums(grid[point][:, None], target[:, None], tasks.query_mask, 5.0,
                                           fold_of_user[:, None], 10) for point in range(5)}
    asked = []

    def predict_at(point):
        asked.append(point)
        return grid[point][:, None]

    def score(predicted, users):  # the metric in plain numpy
        error, rating = (predicted - target).numpy()[users], target.numpy()[users]
        if select_by == "rmse":
            return math.sqrt(np.mean(error ** 2))
        return np.mean([math.sqrt(np.mean(error[rating == r] ** 2)) for r in np.unique(rating)])

    folds = np.arange(23) % 10
    assembled = torch.zeros(23, dtype=torch.float64)
    for fold in range(10):
        scores = [score(grid[point], folds != fold) for point in range(5)]
        best = min(range(5), key=lambda point: scores[point] if math.isfinite(scores[point]) else math.inf)
        assembled[folds == fold] = grid[best][folds == fold]
    found = baselines.cross_fitted_score(list(fold_sums), torch.stack(list(fold_sums.values())), fold_of_user,
                                         predict_at, tasks, 5.0, select_by)
    assert found == pytest.approx(score(assembled, np.ones(23, bool)), abs=1e-12)
    assert 2 in asked and 0 not in asked and 4 not in asked and len(set(asked)) >= 2  # folds chose apart


def test_mf_fold_in_equals_a_rank_one_case_on_paper():
    # μ = 3; support items 1 and 2 with b = (0.5, −0.5), q = (1, −1); the user's true b_u = 0.5, p = 1, so
    # the residuals r − μ − b_i are (b_u + p, b_u − p) = (1.5, −0.5). Features [q, 1]: XᵀX = 2 I and
    # Xᵀy = (2p, 2 b_u), so with λ_u = 1: p̂ = 2/3, b̂_u = 1/3. Target item 3 (q = 2, b = 0.2):
    # 3 + 1/3 + 0.2 + 2 · 2/3 = 4.8667.
    biases, factors = np.array([0.0, 0.5, -0.5, 0.2]), np.array([[0.0], [1.0], [-1.0], [2.0]])
    sets = [(np.array([1, 2]), np.array([3.0 + 0.5 + 0.5 + 1.0, 3.0 - 0.5 + 0.5 - 1.0])),
            (np.array([], np.int64), np.array([]))]  # no support items: μ + b_target
    predicted = baselines.mf_fold_in(sets, np.array([[3, 1], [3, 3]]), 3.0, biases, factors, 1.0, 1.0, 5.0)
    assert predicted == pytest.approx(np.array([[3 + 1 / 3 + 0.2 + 4 / 3, 3 + 1 / 3 + 0.5 + 2 / 3], [3.2, 3.2]]))
    # λ_u → 0 recovers the user exactly: μ + b_u + b_3 + p q_3 = 3 + 0.5 + 0.2 + 2 = 5.7, clipped to 5
    exact = baselines.mf_fold_in(sets[:1], np.array([[3, 1]]), 3.0, biases, factors, 1e-9, 1.0, 9.0)
    assert exact == pytest.approx(np.array([[5.7, 3 + 0.5 + 0.5 + 1]]))
    assert baselines.mf_fold_in(sets[:1], np.array([[3]]), 3.0, biases, factors, 1e-9, 1.0, 5.0).tolist() == [[5.0]]
    # λ_u = 1 on p, λ_b = 0 on b_u: p̂ = 2/3 as before, b̂_u = 2 · 0.5 / 2 = 0.5: 3 + 0.5 + 0.2 + 4/3
    apart = baselines.mf_fold_in(sets[:1], np.array([[3]]), 3.0, biases, factors, 1.0, 1.0, 9.0, bias_reg=0.0)
    assert apart == pytest.approx(np.array([[3 + 0.5 + 0.2 + 4 / 3]]))


def test_ridge_solves_its_normal_equations_and_als_fits_a_rank_one_matrix():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=7)
    index = np.array([0, 0, 0, 2, 2, 2, 2])  # id 1 has no rows: its solution is 0
    gram, rhs = baselines.normal_equations(index, x, y, 3)
    w = baselines.ridge(gram, rhs, 0.5)
    for id_, rows in ((0, slice(0, 3)), (2, slice(3, 7))):  # the gradient XᵀXw − Xᵀy + λw vanishes
        assert x[rows].T @ (x[rows] @ w[id_] - y[rows]) + 0.5 * w[id_] == pytest.approx(np.zeros(3), abs=1e-12)
    assert w[1].tolist() == [0.0, 0.0, 0.0]
    # every rating of a 6 x 5 rank-1 matrix μ + b_u + b_i + p_u q_i: ALS with a tiny λ reproduces it
    p, b_user = rng.normal(size=6), rng.normal(0, 0.3, 6)
    q, b_item = rng.normal(size=6), rng.normal(0, 0.3, 6)
    users, items = np.repeat(np.arange(6), 5), np.tile(np.arange(1, 6), 6)
    ratings = 3.0 + b_user[users] + b_item[items] + p[users] * q[items]
    biases, factors = baselines.als(users, items, ratings, ratings.mean(), 6, 5, 1, 1e-6, 200, seed=0)
    assert biases[0] == 0 and factors[0].tolist() == [0.0]  # item 0 (padding): no ratings
    for user in range(6):  # a training user folded in again: its own ratings predicted
        sets = [(np.arange(1, 6), ratings[users == user])]
        predicted = baselines.mf_fold_in(sets, np.arange(1, 6)[None], ratings.mean(), biases, factors, 1e-9, -99, 99)
        assert predicted[0] == pytest.approx(ratings[users == user], abs=1e-3)


def test_mf_fold_in_report_equals_its_functions(run_all):
    args, data, dataset, reports = run_all
    report = reports["mf-fold-in"]
    assert report["method"] == "mf_fold_in" and {"rank", "reg", "user_reg", "user_bias_reg", "decay"} <= set(report)
    assert report["count"] == 15 * 3
    fitted = baselines.Fitted(data, dataset.train_users, args.random_seed)
    tasks = dataset.test_tasks()
    biases, factors = baselines.als(fitted.users, fitted.items, fitted.ratings, fitted.mean, fitted.num_users,
                                    fitted.num_items, report["rank"], report["reg"], baselines.ALS_SWEEPS,
                                    args.random_seed)
    sets = baselines.sets_of(tasks)
    expected = baselines.mf_fold_in(sets, tasks.query_items[:, :, -1].numpy(), fitted.mean,
                                    biases, factors, report["user_reg"], fitted.low, fitted.high,
                                    report["user_bias_reg"], sets.decay_weights(report["decay"]))
    frame = pd.read_csv(metrics.predictions_path(baselines.report_path(args, "mf-fold-in")))
    assert np.sort(frame["prediction"].to_numpy()) == pytest.approx(np.sort(expected[tasks.query_mask.numpy()]))
    chosen = [report["rank"], report["reg"], report["user_reg"], report["user_bias_reg"], report["decay"]]
    selection = report["selection"]  # the one-standard-error choice: its own validation score, not the minimum
    assert selection["validation_scores"][selection["grid"].index(chosen)] == pytest.approx(metrics.task_report(
        baselines.predict("mf-fold-in", dataset.val_tasks(), baselines.sets_of(dataset.val_tasks()), fitted, chosen),
        dataset.val_tasks(), data.max_rating)["rmse"])


def test_the_recalibrated_mf_fold_in_is_its_least_squares_line_on_the_validation_users(run_all):
    args, data, dataset, reports = run_all
    plain, report = reports["mf-fold-in"], reports["mf-fold-in-recalibrated"]
    axes = ("rank", "reg", "user_reg", "user_bias_reg", "decay")
    assert report["method"] == "mf_fold_in_recalibrated" and all(report[k] == plain[k] for k in axes)
    # (a, b): the least-squares line through the MF fold-in's own validation predictions
    path = baselines.report_path(args, "mf-fold-in")
    validation = pd.read_csv(metrics.validation_predictions_path(path))
    b, a = np.polyfit(validation["prediction"], validation["rating"], 1)
    assert (report["recalibration_a"], report["recalibration_b"]) == pytest.approx((a, b))
    # its test predictions are the fold-in's mapped by it, clipped to the training ratings' range
    keys = ["user", "window"]
    mine = pd.read_csv(metrics.predictions_path(baselines.report_path(args, "mf-fold-in-recalibrated")))
    theirs = pd.read_csv(metrics.predictions_path(path))
    both = mine.merge(theirs, on=keys, suffixes=("", "_plain"))
    assert len(both) == len(mine) == len(theirs)
    fitted = baselines.Fitted(data, dataset.train_users, args.random_seed)
    expected = np.clip(a + b * both["prediction_plain"], fitted.low, fitted.high)
    assert both["prediction"].to_numpy() == pytest.approx(expected.to_numpy())
    # on the validation users it cannot be worse than the fold-in it recalibrates
    again = pd.read_csv(metrics.validation_predictions_path(baselines.report_path(args, "mf-fold-in-recalibrated")))
    assert rmse(list(zip(again["prediction"], again["rating"]))) <= rmse(list(zip(validation["prediction"],
                                                                            validation["rating"])))


def test_the_fold_in_blend_mixes_the_two_fold_ins_by_the_weight_validation_chose(run_all):
    args, data, dataset, reports = run_all
    report, keys = reports["fold-in-blend"], ["user", "window"]
    # each part at its own report's choice
    for part, axes in (("user-item-bias", ("item_reg", "user_reg", "decay")),
                       ("mf-fold-in", ("rank", "reg", "user_reg", "user_bias_reg", "decay"))):
        assert all(report[f"{part.replace('-', '_')}_{axis}"] == reports[part][axis] for axis in axes)
    frames = {}
    for name in ("fold-in-blend", "user-item-bias", "mf-fold-in"):
        path = baselines.report_path(args, name)
        frames[name] = [pd.read_csv(metrics.predictions_path(path)), pd.read_csv(metrics.validation_predictions_path(path))]

    def mixed(s, which):  # s · MF + (1 − s) · bias fold-in, joined by user and window
        mf, bias = frames["mf-fold-in"][which], frames["user-item-bias"][which]
        both = mf.merge(bias, on=keys, suffixes=("", "_bias"), validate="one_to_one")
        return both.assign(prediction=s * both["prediction"] + (1 - s) * both["prediction_bias"])[keys + ["rating", "prediction"]]

    # s is the grid's first minimum of the validation RMSE, and the test predictions are the mix at s
    scores = [rmse(list(zip(frame["prediction"], frame["rating"]))) for frame in (mixed(s, 1) for s in baselines.BLEND_GRID)]
    s = report["mf_weight"]
    assert s == baselines.BLEND_GRID[int(np.argmin(scores))]
    assert report["selection"]["validation_scores"] == pytest.approx(scores)
    mine = frames["fold-in-blend"][0].merge(mixed(s, 0), on=keys, suffixes=("", "_expected"), validate="one_to_one")
    assert len(mine) == len(frames["fold-in-blend"][0]) == report["count"]
    assert mine["prediction"].to_numpy() == pytest.approx(mine["prediction_expected"].to_numpy())
    # its validation predictions are the mix at s too: there it is as good as the better fold-in or better
    validation = frames["fold-in-blend"][1]
    assert rmse(list(zip(validation["prediction"], validation["rating"]))) == pytest.approx(min(scores))


def test_the_per_rating_recalibration_weighs_each_rating_by_its_inverse_share():
    # three 4-star targets and one 1-star: weights 4 / (2 * 3) each and 4 / (2 * 1)
    tasks = SimpleNamespace(query_mask=torch.ones(4, 1, dtype=torch.bool),
                            query_ratings=torch.tensor([4.0, 4.0, 4.0, 1.0]).view(4, 1, 1))
    predicted = torch.tensor([3.0, 3.5, 4.0, 3.0]).view(4, 1)
    w = np.array([2 / 3, 2 / 3, 2 / 3, 2.0])
    p, r = predicted.view(-1).numpy(), np.array([4.0, 4.0, 4.0, 1.0])
    X = np.stack([np.ones(4), p], 1)
    expected = np.linalg.solve(X.T @ (X * w[:, None]), X.T @ (w * r))
    assert baselines.recalibration(predicted, tasks, "mean_per_rating_rmse", 5.0) == pytest.approx(tuple(expected))
    assert baselines.recalibration(predicted, tasks, "rmse", 5.0) == pytest.approx(tuple(np.polyfit(p, r, 1)[::-1]))
    assert baselines.recalibration(predicted, tasks, "rmse", 5.0) != pytest.approx(tuple(expected))


def test_fitted_holds_out_each_users_latest_ratings_and_all_of_a_short_one():
    sequences = {0: (np.array([1, 2, 3, 4]), np.array([5.0, 4.0, 3.0, 2.0])), 1: (np.array([2, 3]), np.array([1.0, 2.0]))}
    data = SimpleNamespace(sequence=lambda u: sequences[u], num_items=4)
    fitted = baselines.Fitted(data, [0, 1], hold_out=3)
    assert fitted.items.tolist() == [1] and fitted.ratings.tolist() == [5.0] and fitted.users.tolist() == [0]
    every = baselines.Fitted(data, [0, 1])
    assert every.items.tolist() == [1, 2, 3, 4, 2, 3] and every.users.tolist() == [0, 0, 0, 0, 1, 1]
