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

A choice on the validation users minimises --select_by on main.py's fixed validation tasks (the first
--val_size validation users); the report records the grid, every value's validation score and the choice.
Each report is `<checkpoint_dir>/<name>_<mode>.test.json`, with the per-target CSV beside it.
"""
import itertools
import os

import numpy as np
import torch

import metrics

BASELINES = ("mean-rating", "user-mean", "shrunk-user-mean", "user-item-bias")
SHRINKAGE_GRID = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0)
ITEM_REG_GRID = (0.0, 5.0, 25.0, 100.0)
USER_REG_GRID = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)


# ============================================================================ pure functions
def support_sets(support_items, support_ratings, support_mask):
    """Per task, (distinct item ids, their ratings) in its real support windows (numpy [T, S, L] / [T, S]).
    An item that occurs with several ratings (a repeated rating) gets their mean."""
    sets = []
    for items, ratings, real in zip(support_items, support_ratings, support_mask):
        keep = real[:, None] & (items != 0)
        distinct, inverse = np.unique(items[keep], return_inverse=True)
        counts = np.bincount(inverse, minlength=len(distinct))
        sets.append((distinct, np.bincount(inverse, ratings[keep].astype(np.float64), len(distinct)) / counts))
    return sets


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


def user_item_bias(sets, target_items, mean, biases, reg, low, high):
    """μ + b_u + b_target per target ([T, Q] for target_items [T, Q]), clipped to [low, high];
    b_u = Σ (r − μ − b_i) / (n + reg) over the task's support items (0 when n + reg = 0)."""
    user = np.array([(ratings - mean - biases[items]).sum() / (len(items) + reg) if len(items) + reg > 0 else 0.0
                     for items, ratings in sets])
    return np.clip(mean + user[:, None] + biases[target_items], low, high)


# ============================================================================ fitting and scoring
class Fitted:
    """What the baselines learn from the training users: their ratings, mean and range."""

    def __init__(self, data, train_users):
        self.items = np.concatenate([data.sequence(u)[0] for u in train_users]).astype(np.int64)
        self.ratings = np.concatenate([data.sequence(u)[1] for u in train_users]).astype(np.float64)
        self.mean = float(self.ratings.mean())
        self.low, self.high = float(self.ratings.min()), float(self.ratings.max())
        self.num_items = int(data.num_items)


def grid(name):
    """The values a baseline chooses from on the validation users ([None]: nothing to choose)."""
    if name == "shrunk-user-mean":
        return list(SHRINKAGE_GRID)
    if name == "user-item-bias":
        return list(itertools.product(ITEM_REG_GRID, USER_REG_GRID))
    return [None]


def predict(name, tasks, sets, fitted, value):
    """Predicted stars [T, Q] of baseline `name` (with grid value `value`) for `tasks`' query targets."""
    shape = tasks.query_mask.shape
    if name == "mean-rating":
        per_user = np.full(shape[0], fitted.mean)
    elif name == "user-mean":
        per_user = user_mean(sets, fitted.mean)
    elif name == "shrunk-user-mean":
        per_user = shrunk_user_mean(sets, fitted.mean, value)
    else:
        item_reg, user_reg = value
        biases = item_biases(fitted.items, fitted.ratings, fitted.mean, item_reg, fitted.num_items)
        targets = tasks.query_items[:, :, -1].numpy()
        return torch.from_numpy(user_item_bias(sets, targets, fitted.mean, biases, user_reg, fitted.low, fitted.high))
    return torch.from_numpy(per_user)[:, None].expand(shape).clone()


def sets_of(tasks):
    return support_sets(tasks.support_items.numpy(), tasks.support_ratings.numpy(), tasks.support_mask.numpy())


def choose(name, val_tasks, fitted, max_rating, select_by):
    """The grid value of `name` with the lowest validation `select_by`, and every value's score."""
    values = grid(name)
    if len(values) == 1:
        return values[0], None
    sets = sets_of(val_tasks)
    scores = [metrics.task_report(predict(name, val_tasks, sets, fitted, value), val_tasks, max_rating)[select_by]
              for value in values]
    best = int(np.argmin(scores))
    return values[best], {"select_by": select_by, "grid": [list(v) if isinstance(v, tuple) else v for v in values],
                          "validation_scores": scores}


def chosen_fields(name, value):
    if name == "shrunk-user-mean":
        return {"shrinkage": value}
    if name == "user-item-bias":
        return {"item_reg": value[0], "user_reg": value[1]}
    return {}


def report_path(args, name):
    return os.path.join(args.checkpoint_dir, f"{name}_{args.mode}.test.json")


def test(args, data, dataset, name, publish=True):
    """Choose (on the validation users), predict and score baseline `name` on the test users; publish
    the report and the per-target CSV (rank 0's job: publish=False elsewhere). Returns the report."""
    fitted = Fitted(data, dataset.train_users)
    value, selection = choose(name, dataset.val_tasks(), fitted, data.max_rating, args.select_by)
    tasks = dataset.test_tasks()
    predicted = predict(name, tasks, sets_of(tasks), fitted, value)
    report = metrics.task_report(predicted, tasks, data.max_rating)
    report.update(method=name.replace("-", "_"), mode=args.mode, random_seed=args.random_seed,
                  training_mean=fitted.mean, **chosen_fields(name, value))
    if name == "mean-rating":
        report["prediction"] = fitted.mean
    if selection is not None:
        report["selection"] = selection
    if publish:
        chosen = ", ".join(f"{k} {v:g}" for k, v in chosen_fields(name, value).items())
        metrics.publish(report, f"test {name} baseline{f' ({chosen}, chosen on validation)' if chosen else ''} "
                                f"on {args.mode}", report_path(args, name),
                        metrics.prediction_frame(tasks, predicted, data), data.fingerprint())
    return report
