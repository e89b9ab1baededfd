"""The data layer's face and command: ``python dataloader.py --mode=M [--data_path=P] [data flags]`` prints
the data summary of a ratings file and its cold-start split (:func:`ratings.tasks.data_summary`; the
balance score is defined there).

The data layer lives in ``ratings/``: ``readers.py`` (one reader per file format), ``preprocess.py``
(downloading, filtering, re-indexing and the cache: ``load_data``), ``tasks.py`` (the user split and every
task: ``MetaDataset``, ``TaskBatch``) and ``synthetic.py`` (the generator of test and demo files).
"""
from common.errors import MeloError
from options import run_cli
from ratings.preprocess import duplicates_note, effective_min_sequence, load_data
from ratings.tasks import MetaDataset, data_summary


# ============================================================================ command line
def format_summary(summary, args):
    lines = [
        f"data            {args.mode}: {args.data_path}",
        f"filters         min_item={args.min_item}, min_sequence={effective_min_sequence(args)}",
        f"users           {summary['users']}",
        f"items           {summary['items']}",
        f"ratings         {summary['ratings']}",
        f"duplicates      {duplicates_note(summary['duplicates_dropped'], args)}",
        f"avg seq length  {summary['avg_seq_len']:.1f} (truncated to max_seq_len={summary['max_seq_len']}: "
        f"{summary['avg_seq_len_truncated']:.1f})",
        "rating distribution (value, count, share):",
    ]
    for value, count in summary["rating_counts"].items():
        lines.append(f"  {value:>4g}  {count:>10}  {100 * summary['rating_shares'][value]:5.1f}%")
    lines += [
        f"balance score   {summary['balance']:.3f} (mean normalised entropy of each user's rating values: "
        "1 = even, 0 = always one value)",
    ]
    if "test_users" in summary:
        lines.append(f"split (seed {args.random_seed})  train {summary['train_users']}, validation "
                     f"{summary['val_users']}, test {summary['test_users']} users")
    return "\n".join(lines)


def main(args):
    data = load_data(args)
    try:
        dataset = MetaDataset.from_args(data, args)
    except MeloError:  # no split with these flags: every figure of the data itself, then the reason
        print(format_summary(data_summary(data, args.max_seq_len), args), flush=True)
        raise
    print(format_summary(dataset.summary(), args))


if __name__ == "__main__":
    run_cli(main)
