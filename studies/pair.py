"""A − B over the test users of several seeds pooled, from the per-target prediction CSVs of runs that live
in different results folders (ablation.py's --pairs pairs variants of one folder):

    python -m studies.pair "results/x/ml-1m/gru4rec/seed*/melo/checkpoints/*.test_best.csv" \\
                           "results/y/ml-1m/gru4rec/seed*/fold-in-blend/checkpoints/*.test.csv"

Each argument is a glob (quote it; its files sorted) or a comma-separated list of CSVs (in its order); the
two are paired in order, one file per seed, and a pair is refused unless both hold the same test targets
(the same users, windows, items and ratings: the same seed's split). The statistics are compare.py's and ablation.py's
(tables.pooled_difference: a paired bootstrap drawing users within each seed)."""
import argparse
import glob

import pandas as pd

from common import flag_types
from common.errors import MeloError
import options
from studies import tables

METRICS = (("rmse", "RMSE"), ("mean_per_rating_rmse", "mean per-rating RMSE"))


def prediction_files(spec):
    """The CSVs a glob (sorted) or a comma-separated list (in its order) names; refused if a part names
    none, or names a validation CSV (a test run's `.validation.csv` holds the validation users)."""
    names = []
    for part in filter(None, spec.split(",")):
        found = sorted(glob.glob(part))
        if not found:
            raise MeloError(f"no prediction CSV matches {part!r}: give a glob or a comma-separated list of the "
                            f"test CSVs that --test runs wrote")
        names += [name for name in found if name not in names]
    validation = [name for name in names if name.endswith(".validation.csv")]
    if validation:
        raise MeloError(f"{validation[0]} is a validation CSV: give the test CSVs (e.g. end the glob in "
                        f"'.test_best.csv' or '.test.csv')")
    return names


def read_predictions(path):
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise MeloError(f"cannot read predictions {path}: {error}; give the test CSV a --test run wrote") from None
    missing = {"user", "window", "item", "rating", "prediction"} - set(frame.columns)
    if missing:
        raise MeloError(f"{path} is not a prediction CSV (no column {', '.join(sorted(missing))}); give the test "
                        f"CSV a --test run wrote")
    return frame


def pair(first, second, resamples=2000, seed=0):
    """{metric: pooled_difference result} of A − B for the file lists `first` and `second` (one file per
    seed each, in the same order), with `lower`: in how many seeds A's metric is the lower."""
    if len(first) != len(second):
        raise MeloError(f"{len(first)} CSVs against {len(second)}: give one test CSV per seed on each side")
    frames = [(read_predictions(a), read_predictions(b)) for a, b in zip(first, second)]
    found = tables.pooled_difference(frames, resamples, seed)
    per_seed = [tables.paired_difference(a, b, 1, seed) for a, b in frames]  # their points only
    for key, _ in METRICS:
        found[key]["lower"] = sum(one[key]["difference"] < 0 for one in per_seed)
    return found


def lines(found, seeds):
    return [f"A − B, {label}: {found[key]['difference']:+.4f} [{found[key]['low']:+.4f}, {found[key]['high']:+.4f}]"
            f" over {found[key]['users']} users of {seeds} seed{'s' if seeds > 1 else ''} (resolves "
            f"±{found[key]['half_width']:.4f}); A lower in {found[key]['lower']}/{seeds}" for key, label in METRICS]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("first", help="A's test prediction CSVs: a glob (quoted) or a comma-separated list")
    parser.add_argument("second", help="B's, the same seeds in the same sorted order")
    parser.add_argument("--bootstrap", type=flag_types.positive_int, default=2000, help="bootstrap resamples")
    parser.add_argument("--bootstrap_seed", type=flag_types.seed, default=0, help="seed of the resampling")
    known = parser.parse_args(argv)
    first, second = prediction_files(known.first), prediction_files(known.second)
    found = pair(first, second, known.bootstrap, known.bootstrap_seed)
    for a, b in zip(first, second):
        print(f"A {a}\nB {b}")
    print("\n".join(lines(found, len(first))))
    return found


if __name__ == "__main__":
    options.run_cli(main, parse=lambda argv: argv)
