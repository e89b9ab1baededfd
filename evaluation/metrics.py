"""Rating-prediction reports in stars: RMSE, MAE, and the same per rating value, per query window and
per user; the per-target predictions as CSV; the paired bootstrap that compares two methods.

Errors are first accumulated as sums per half-star bucket (count, squared error, absolute error,
prediction), so batches, and processes under torchrun, can be added up before the report is made.
The per-rating table is the point of MELO: a user's rare ratings are where plain MAML fails.

A report's top-level figures count every query window (a test user's --num_query_set windows all end on
the same target item, so each target counts that many times); `report["per_user"]` holds the same figures
with each user scored once: its windows' predictions are averaged into one prediction of its target.
(Averaging the squared errors instead would change nothing: every user has the same number of windows.)
"""
import hashlib
import json
import math
import os

import numpy as np
import pandas as pd
import torch

from common.errors import MeloError
from common.runtime import write_atomic

# Columns of the per-target CSV written beside every test report (see prediction_frame).
PREDICTION_COLUMNS = ("user", "window", "item", "rating", "window_length", "prediction")

SUM_FIELDS = ("count", "squared_error", "absolute_error", "prediction")


# Ratings are grouped by half star everywhere (reports, the learned loss's rating embedding, the analysis):
# bucket b holds the ratings that round to b / 2 stars (4 → 8, 3.5 → 7), named b / 2 ('4', '3.5').
def half_star_buckets(stars):
    """The half-star bucket of each rating in stars: a long tensor for a tensor, int64 for a numpy array."""
    doubled = (stars * 2).round()
    return doubled.long() if isinstance(doubled, torch.Tensor) else doubled.astype(np.int64)


def num_half_star_buckets(max_rating):
    return int(round(2 * max_rating)) + 1


def balanced_rating_weights(ratings, max_rating):
    """Each half-star rating's weight, the inverse of its share of `ratings` (stars) over the number of
    ratings present: float64 [buckets], 0 where a rating is absent. The weights average 1 over `ratings`,
    and a squared error weighted by them counts every rating present alike, as the mean per-rating RMSE
    does (--query_loss=balanced over the training users' ratings; the per-rating recalibration of the MF
    fold-in over its validation targets)."""
    counts = torch.bincount(half_star_buckets(torch.as_tensor(ratings, dtype=torch.float64)),
                            minlength=num_half_star_buckets(max_rating)).double()
    present = counts > 0
    weights = torch.zeros_like(counts)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights


def half_star_name(bucket):
    return f"{bucket / 2:g}"


def error_sums(predicted_stars, target_stars, mask, max_rating, groups=None, num_groups=None):
    """Sums per half-star target bucket: float64 tensor [buckets, 4] in SUM_FIELDS order; with `groups`
    (each target's group in 0..num_groups - 1, shaped like `mask`), per group: [num_groups, buckets, 4]."""
    predicted = predicted_stars[mask].double()
    target = target_stars[mask].double()
    values = torch.stack([torch.ones_like(target), (predicted - target) ** 2,
                          (predicted - target).abs(), predicted], dim=1)
    return bucket_sums(target, values, max_rating, None if groups is None else groups[mask], num_groups)


def bucket_sums(target, values, max_rating, groups=None, num_groups=None):
    """Rows of `values` [N, 4] added up by the half-star bucket of `target` [N]: [buckets, 4]; with `groups`
    [N] (each row's group in 0..num_groups - 1), by group and bucket: [num_groups, buckets, 4]."""
    count = num_half_star_buckets(max_rating)
    keys = half_star_buckets(target).clamp(0, count - 1)
    if groups is not None:
        keys = groups * count + keys
    sums = torch.zeros((num_groups or 1) * count, len(SUM_FIELDS), dtype=torch.float64, device=values.device)
    sums = sums.index_add_(0, keys, values).cpu()
    return sums if groups is None else sums.view(num_groups, count, len(SUM_FIELDS))


def scores_from_sums(sums, select_by):
    """The figure `select_by` ("rmse" or "mean_per_rating_rmse") of error sums [..., buckets, 4], for every
    leading index at once: report_from_sums's figure without the report (a grid's thousands of scores)."""
    count, squared = sums[..., 0], sums[..., 1]
    if select_by == "rmse":
        return (squared.sum(-1) / count.sum(-1)).sqrt()
    if select_by == "mean_per_rating_rmse":
        present = count > 0
        per_rating = torch.where(present, squared / count.clamp(min=1), torch.zeros_like(squared)).sqrt()
        return per_rating.sum(-1) / present.sum(-1)
    raise ValueError(f"no score {select_by!r} from error sums")


def per_user_sums(predicted_stars, target_stars, mask, max_rating):
    """Like error_sums, but each task (user) of [T, Q] counts once, with the mean of its real windows'
    predictions as its one prediction (all of a user's windows share one target)."""
    real = mask.double()
    windows = real.sum(1)
    scored = windows > 0
    prediction = (predicted_stars.double() * real).sum(1)[scored] / windows[scored]
    target = target_stars.double()[scored].gather(1, mask[scored].long().argmax(1, keepdim=True)).squeeze(1)
    values = torch.stack([torch.ones_like(target), (prediction - target) ** 2, (prediction - target).abs(),
                          prediction], dim=1)
    return bucket_sums(target, values, max_rating)


def task_report(predicted_stars, tasks, max_rating):
    """The report of predictions [T, Q] (stars) of the last position of `tasks`' query windows: per
    window at the top level, per user under "per_user"."""
    target, mask = tasks.query_ratings[:, :, -1], tasks.query_mask
    report = report_from_sums(error_sums(predicted_stars, target, mask, max_rating))
    report["per_user"] = report_from_sums(per_user_sums(predicted_stars, target, mask, max_rating))
    return report


def report_from_sums(sums):
    """RMSE/MAE overall and per rating value, and the mean of the per-rating RMSEs."""
    total = sums.sum(0)
    count = total[0].item()
    if count == 0:
        raise ValueError("no predictions to report")
    per_rating = {}
    for bucket, row in enumerate(sums):
        n = row[0].item()
        if n == 0:
            continue
        per_rating[half_star_name(bucket)] = {
            "count": int(n),
            "rmse": math.sqrt(row[1].item() / n),
            "mae": row[2].item() / n,
            "mean_prediction": row[3].item() / n,
        }
    return {
        "count": int(count),
        "rmse": math.sqrt(total[1].item() / count),
        "mae": total[2].item() / count,
        "mean_per_rating_rmse": sum(r["rmse"] for r in per_rating.values()) / len(per_rating),
        "per_rating": per_rating,
    }


def format_report(report, title):
    lines = [f"{title}: RMSE {report['rmse']:.4f}  MAE {report['mae']:.4f}  "
             f"mean per-rating RMSE {report['mean_per_rating_rmse']:.4f}  ({report['count']} targets)",
             f"  {'rating':>6} {'count':>7} {'RMSE':>7} {'MAE':>7} {'mean pred':>9}"]
    for rating, row in report["per_rating"].items():
        lines.append(f"  {rating:>6} {row['count']:>7d} {row['rmse']:>7.4f} {row['mae']:>7.4f} "
                     f"{row['mean_prediction']:>9.4f}")
    if "per_user" in report:
        user = report["per_user"]
        lines[0] = lines[0].replace("targets)", "query windows; per window)")
        lines.append(f"  per user (its windows' mean prediction, scored once): RMSE {user['rmse']:.4f}  "
                     f"MAE {user['mae']:.4f}  mean per-rating RMSE {user['mean_per_rating_rmse']:.4f}  "
                     f"({user['count']} users)")
    if "adaptive_weight_by_rating" in report:
        lines.append("  adaptive loss weight by support rating (mean over inner steps): " + ", ".join(
            f"{rating}: {weight:.3f}" for rating, weight in report["adaptive_weight_by_rating"].items()))
    for key, what in (("query_gradient_by_rating", "a support rating"),
                      ("query_gradient_by_share", "a rating by its share of the user's support set")):
        if key in report:
            lines.append(f"  query-loss gradient of more weight on {what}, t over users (share of users it "
                         "helps): " + ", ".join(
                             f"{name}: {'–' if row['t'] is None else format(row['t'], '+.1f')} ({row['helped']:.0%})"
                             for name, row in report[key].items()))
    return "\n".join(lines)


def prediction_frame(tasks, predicted_stars, data):
    """One row per real query window of `tasks`: original user id, window index, original target item id,
    true rating, window length (real positions) and prediction, all in stars."""
    mask = tasks.query_mask.numpy()
    task, window = np.nonzero(mask)
    items = tasks.query_items.numpy()
    return pd.DataFrame({
        "user": data.user_ids[tasks.users.numpy()[task]],
        "window": window,
        "item": data.item_ids[items[task, window, -1] - 1],
        "rating": tasks.query_ratings[:, :, -1].numpy()[task, window].astype(np.float64),
        "window_length": (items[task, window] != 0).sum(-1),
        "prediction": predicted_stars.detach().cpu().double().numpy()[task, window],
    }, columns=list(PREDICTION_COLUMNS))


def predictions_path(report_path):
    """The per-target CSV beside a JSON report: `<name>.json` -> `<name>.csv`."""
    return os.path.splitext(report_path)[0] + ".csv"


def file_sha256(path):
    """sha256 of a file's bytes (the per-target CSV a report records)."""
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def validation_predictions_path(report_path):
    """The validation users' per-target CSV beside a test report: `<name>.json` -> `<name>.validation.csv`
    (the same method's predictions of main.py's fixed validation tasks, for choices made on them)."""
    return os.path.splitext(report_path)[0] + ".validation.csv"


# Report fields that hold a grid search's record (every setting's validation score), not the test's numbers.
SEARCH_RECORDS = ("selection", "finetune_selection")


def publish(report, title, path, predictions=None, validation=None, fingerprint=None):
    """Write the report as JSON to `path`, and the per-target `predictions` frame (prediction_frame) as
    CSV beside it (and the `validation` users' frame, validation_predictions_path), and print it (rank
    0's job). Written first: a closed output (`| head`) must not lose them; when they cannot be written,
    the numbers are printed before the error. Non-finite numbers (diverged weights) are written as null,
    and the run then fails.

    The report records the `fingerprint` of the data it was made from and the CSVs' sha256, and is written
    after them: a report whose data or CSVs changed since (compare.py, ablation.py) is never reused."""
    if fingerprint is not None:
        report["data_fingerprint"] = fingerprint
    try:
        if predictions is not None:
            text = predictions.to_csv(index=False)
            report["predictions_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            write_atomic(predictions_path(path), lambda out: out.write(text), binary=False)
        if validation is not None:
            validation_text = validation.to_csv(index=False)
            report["validation_predictions_sha256"] = hashlib.sha256(validation_text.encode()).hexdigest()
            write_atomic(validation_predictions_path(path), lambda out: out.write(validation_text), binary=False)
        write_json_atomic(report, path)
    except OSError as error:
        print(format_report(report, title))
        raise MeloError(f"the report could not be written to {path} ({error.strerror or error}): the numbers "
                        "above are all there is") from None
    print(format_report(report, title))
    print(f"report written to {path}" + (f", predictions to {predictions_path(path)}"
                                         if predictions is not None else ""))
    # a nan or inf among the scores became None; a grid search's diverged settings (scored inf, never
    # chosen: tuning.search) are part of its record, not a fault of the tested weights
    scores = {k: v for k, v in report.items() if k not in SEARCH_RECORDS}
    if finite_or_null(scores) != scores:
        raise MeloError(f"the report holds non-finite numbers (written as null to {path}): these weights "
                        "predict nan or inf; test another step")


def finite_or_null(value):
    """`value` with every non-finite float replaced by None, so that the JSON holds null (not NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


# ============================================================================ paired comparison
def per_user_errors(frame):
    """Per user of a prediction CSV (indexed by user): the sum of its windows' squared errors, their
    number, and its target rating."""
    errors = frame.assign(squared_error=(frame["prediction"] - frame["rating"]) ** 2)
    return errors.groupby("user", sort=True).agg(squared_error=("squared_error", "sum"),
                                                 windows=("squared_error", "size"), rating=("rating", "first"))


def _scores(weights, squared_error, windows, onehot):
    """Per-window RMSE and mean per-rating RMSE [B] of the users weighted by `weights` [B, U] (how often
    each user was drawn; all of its windows come with it)."""
    rmse = np.sqrt(weights @ squared_error / (weights @ windows))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_rating = np.sqrt((weights @ (onehot * squared_error[:, None])) / (weights @ (onehot * windows[:, None])))
    return rmse, np.nanmean(per_rating, axis=1)  # a rating no drawn user has is left out


def paired_bootstrap(squared_a, squared_b, windows, ratings, resamples=1000, seed=0, level=0.95, strata=None):
    """The difference A - B of the per-window RMSE and mean per-rating RMSE, with a percentile bootstrap
    interval over users: whole users (all of their windows, which are not independent of each other) are
    drawn with replacement, `resamples` times, from numpy's generator of `seed`, and the same draw scores
    both methods, so the interval is paired. Per user, on the same users: `squared_a`, `squared_b` the sums
    of its windows' squared errors, `windows` their number, `ratings` its target rating. `strata` (one id
    per user, e.g. its seed): users are drawn within each stratum, as many as it has, and the metrics are
    those of all strata's windows pooled."""
    squared_a, squared_b = np.asarray(squared_a, np.float64), np.asarray(squared_b, np.float64)
    windows = np.asarray(windows, np.float64)
    buckets = half_star_buckets(np.asarray(ratings, np.float64))
    onehot = (buckets[:, None] == np.unique(buckets)[None, :]).astype(np.float64)
    users = len(squared_a)
    rng = np.random.default_rng(seed)
    if strata is None:
        weights = np.stack([np.bincount(rng.integers(0, users, users), minlength=users) for _ in range(resamples)])
    else:
        groups = [np.flatnonzero(np.asarray(strata) == stratum) for stratum in np.unique(strata)]
        weights = np.stack([sum(np.bincount(members[rng.integers(0, len(members), len(members))], minlength=users)
                                for members in groups) for _ in range(resamples)])
    weights = weights.astype(np.float64)
    everyone = np.ones((1, users))

    def difference(draws):
        return [a - b for a, b in zip(_scores(draws, squared_a, windows, onehot),
                                      _scores(draws, squared_b, windows, onehot))]

    tail = 100 * (1 - level) / 2
    return {key: {"difference": float(point[0]), "low": float(np.percentile(spread, tail)),
                  "high": float(np.percentile(spread, 100 - tail))}
            for key, point, spread in zip(("rmse", "mean_per_rating_rmse"), difference(everyone), difference(weights))}


def paired_gain(frame, start_frame, select_by, resamples=2000, seed=0):
    """`frame` − `start_frame` in `select_by` ("rmse" or "mean_per_rating_rmse") on the same targets
    (prediction frames of one task set), with one standard error of it: half the width of the paired
    bootstrap's central 68.27 % interval over users; `resolved` when that interval lies below 0, i.e. the
    gain exceeds one standard error."""
    a, b = per_user_errors(frame), per_user_errors(start_frame)
    if not a.index.equals(b.index) or not (a["windows"] == b["windows"]).all():
        raise ValueError("paired_gain needs two frames of the same targets")
    found = paired_bootstrap(a["squared_error"], b["squared_error"], a["windows"], a["rating"], resamples, seed,
                             level=0.6827)[select_by]
    return {"difference": found["difference"], "standard_error": (found["high"] - found["low"]) / 2,
            "resolved": found["high"] < 0}


# Student's t 97.5% quantiles for 1..30 degrees of freedom (numpy has no t distribution, and scipy is not
# a dependency); beyond 30 the Cornish-Fisher expansion z + (z^3 + z) / (4 df) is within 0.004 of them.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(degrees_of_freedom):
    if degrees_of_freedom <= len(T_975):
        return T_975[degrees_of_freedom - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * degrees_of_freedom)


def seed_interval(values):
    """The mean of per-seed values (differences of two methods, say) with its 95% t interval, which
    treats the seeds as independent draws: (mean, low, high); None for fewer than two values."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return None
    mean = float(values.mean())
    half = t_quantile_975(len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def write_json_atomic(data, path):
    """Write JSON all at once (`runtime.write_atomic`): never a half-written report, and never a NaN token
    (standard JSON has none)."""
    write_atomic(path, lambda out: json.dump(finite_or_null(data), out, indent=2, sort_keys=True, allow_nan=False),
                 binary=False)
