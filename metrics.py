"""Rating-prediction reports in stars: RMSE, MAE, and the same per rating value.

Errors are first accumulated as sums per half-star bucket (count, squared error, absolute error,
prediction), so batches, and processes under torchrun, can be added up before the report is made.
The per-rating table is the point of MELO: a user's rare ratings are where plain MAML fails.
"""
import json
import math

import torch

from options import MeloError
from runtime import write_atomic

SUM_FIELDS = ("count", "squared_error", "absolute_error", "prediction")


def num_buckets(max_rating):
    return int(round(2 * max_rating)) + 1


def error_sums(predicted_stars, target_stars, mask, max_rating):
    """Sums per half-star target bucket: float64 tensor [buckets, 4] in SUM_FIELDS order."""
    predicted = predicted_stars[mask].double()
    target = target_stars[mask].double()
    buckets = torch.round(target * 2).long().clamp(0, num_buckets(max_rating) - 1)
    values = torch.stack([torch.ones_like(target), (predicted - target) ** 2,
                          (predicted - target).abs(), predicted], dim=1)
    sums = torch.zeros(num_buckets(max_rating), len(SUM_FIELDS), dtype=torch.float64, device=values.device)
    return sums.index_add_(0, buckets, values).cpu()


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
        per_rating[f"{bucket / 2:g}"] = {
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
    if "adaptive_weight_by_rating" in report:
        lines.append("  adaptive loss weight by support rating (mean over inner steps): " + ", ".join(
            f"{rating}: {weight:.3f}" for rating, weight in report["adaptive_weight_by_rating"].items()))
    return "\n".join(lines)


def publish(report, title, path):
    """Write the report as JSON to `path` and print it (rank 0's job). Written first: a closed output
    (`| head`) must not lose it; when it cannot be written, the numbers are printed before the error.
    Non-finite numbers (diverged weights) are written as null, and the run then fails."""
    try:
        write_json_atomic(report, path)
    except OSError as error:
        print(format_report(report, title))
        raise MeloError(f"the report could not be written to {path} ({error.strerror or error}): the numbers "
                        "above are all there is") from None
    print(format_report(report, title))
    print(f"report written to {path}")
    if finite_or_null(report) != report:  # a nan or inf became None
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


def write_json_atomic(data, path):
    """Write JSON all at once (`runtime.write_atomic`): never a half-written report, and never a NaN token
    (standard JSON has none)."""
    write_atomic(path, lambda out: json.dump(finite_or_null(data), out, indent=2, sort_keys=True, allow_nan=False),
                 binary=False)
