"""The ablation table in one command: variants of MELO and MAML++ on the same data, seeds and budget.

    python ablation.py --mode=ml-100k --data_path=u.data --model=gru4rec --seeds=3 --num_test_data=150 \\
        --variants=maml,melo,melo-bounded,melo-unbounded,melo-per-step
    python ablation.py ... --define "melo-lr0.01=--use_adaptive_loss=True --lstm_lr=0.01"  # your own variant
    python ablation.py ... --pairs=melo:maml             # also MELO − MAML++ pooled over the seeds, with intervals
    python ablation.py ... --variants=mf-fold-in,melo --pairs=melo:mf-fold-in   # against a baseline without a network
    python ablation.py ... --dry_run                     # print the commands, run nothing

Every variant is `main.py` with the shared flags plus its own, trained for `--num_train_iterations` and
tested at that last checkpoint with its best-by-validation weights, for each seed (`--random_seed`,
`--random_seed + 1`, ...; with `--vary_init=True` also `--model_init_seed`). A variant that loads
pretrained weights gets them from `train_original.py --save_pretrained=True` (`--pretrain_epochs`), run
once per seed. Runs live under `<results_dir>/<mode>/<model>/seed<s>/<variant>/`; a run whose report
exists and records the data fingerprint of the ratings file as it is now is reused, so an interrupted or
extended ablation redoes nothing; one made from other data (or before fingerprints, or truncated) is made
again, with its training when its checkpoint is stale too. The table (validation and test
RMSE, mean per-rating RMSE, the learned loss's mean weight per support rating; mean ± standard deviation
over seeds) is printed and written to `<results_dir>/<mode>/<model>/ablation.md`.

A baseline without a network (`BASELINE_VARIANTS`: mean-rating, user-mean, shrunk-user-mean, user-item-bias,
mf-fold-in, mf-fold-in-recalibrated; `main.py --test_baseline`) is a variant too, tested on the same users
without training (a minute or two on ML-1M for the MF fold-in's grid). Under compare.py's flags
(`--user_factors=32`, the fold-in start) the untrained meta-learner is the mf-fold-in row wherever validation
prefers the MF fold-in to the user + item bias fold-in and its rank is within --user_factors (every
seed on ML-1M), so `--pairs=VARIANT:mf-fold-in` says what training added to it; not under
`--train_windows=held-out`, whose start is fitted on fewer ratings.
Its validation RMSE is that of its chosen setting, read from its validation users' CSV.
"""
from common import errors

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    errors.say_when_terminated()

import argparse
import dataclasses
import json
import os
import shlex
import sys
from collections import namedtuple

import pandas as pd

from common import flag_types, runtime
from common.errors import MeloError
from common.runtime import write_atomic
from evaluation import baselines, metrics
from models import BACKBONES
import options
from ratings.tasks import TaskConfig
from studies import study, tables
from training import checkpointing, runs

PAIR_RESAMPLES, PAIR_BOOTSTRAP_SEED = 2000, 0  # --pairs' bootstrap: compare.py's default

# the recipe the bias-head variants below were measured with: from Basic, b_user at its meta-learned value
LEARNED_USER_BASIC = ("--user_bias_start=learned", *study.START_FLAGS["basic"])
# name: (what it is, its flags). Every variant gets the shared flags first, so its own flags win.
VARIANTS = {
    "maml": ("MAML++ at the current defaults", ["--use_adaptive_loss=False"]),
    "maml-query-all": ("MAML++, outer loss over every query position",
                       ["--use_adaptive_loss=False", "--query_loss=all"]),
    "maml-query-target": ("MAML++, outer loss on the held-out target only",
                          ["--use_adaptive_loss=False", "--query_loss=target"]),
    "maml-pretrained": ("MAML++ from Basic's item embedding",
                        ["--use_adaptive_loss=False", "--load_pretrained_embedding=True"]),
    "melo": ("MELO at the current defaults", ["--use_adaptive_loss=True"]),
    "melo-normalised": ("weights 0.1 + 2σ(z), / task mean; query all",
                        ["--use_adaptive_loss=True", "--adaptive_weights=normalised", "--task_state=static",
                         "--query_loss=all"]),
    "melo-centred": ("weights 0.1 + 2σ(z − task mean), / task mean; query all",
                     ["--use_adaptive_loss=True", "--adaptive_weights=centred", "--task_state=static",
                      "--query_loss=all"]),
    "melo-ft-start-centred": ("MELO from the whole Basic model, centred weights",
                              ["--use_adaptive_loss=True", "--adaptive_weights=centred",
                               *study.START_FLAGS["basic"]]),
    "melo-bounded": ("weights 2σ(z), unnormalised; query all",
                     ["--use_adaptive_loss=True", "--adaptive_weights=bounded", "--task_state=static",
                      "--query_loss=all"]),
    "melo-unbounded": ("weights |1 + z| (the original); query all",
                       ["--use_adaptive_loss=True", "--adaptive_weights=unbounded", "--task_state=static",
                        "--query_loss=all"]),
    "melo-softmax": ("weights softmax(z) × count; query all",
                     ["--use_adaptive_loss=True", "--use_softmax=True", "--task_state=static", "--query_loss=all"]),
    "melo-query-target": ("normalised weights; query target only",
                          ["--use_adaptive_loss=True", "--adaptive_weights=normalised", "--task_state=static",
                           "--query_loss=target"]),
    "melo-per-step": ("normalised weights per inner step (METAL-style); query all",
                      ["--use_adaptive_loss=True", "--adaptive_weights=normalised", "--task_state=per_step",
                       "--query_loss=all"]),
    "melo-pretrained": ("MELO from Basic's item embedding",
                        ["--use_adaptive_loss=True", "--load_pretrained_embedding=True"]),
    # The recipe of the fine-tuning baseline, meta-learned (compare.py's --start=basic): start from
    # the whole trained Basic model, inner rates from Fine-tune's lr, and (since the backbone already fits
    # the support items) the outer loss on the held-out target only.
    "maml-ft-start": ("MAML++ from the whole Basic model, inner lr 0.1, query target",
                      ["--use_adaptive_loss=False", *study.START_FLAGS["basic"]]),
    "melo-ft-start": ("MELO from the whole Basic model, inner lr 0.1, query target",
                      ["--use_adaptive_loss=True", *study.START_FLAGS["basic"]]),
    # The bias rating head (μ + b_user + b_item + f), each from a Basic model trained with the same head,
    # on the recipe above, b_user starting at its meta-learned value (as they were measured): what the head
    # brings, and what of it the inner loop should adapt.
    "maml-bias": ("MAML++, bias head, from Basic (bias head)",
                  ["--use_adaptive_loss=False", "--rating_head=bias", *LEARNED_USER_BASIC]),
    "melo-bias": ("MELO, bias head, from Basic (bias head)",
                  ["--use_adaptive_loss=True", "--rating_head=bias", *LEARNED_USER_BASIC]),
    "maml-bias-user-frozen": ("MAML++, bias head, b_user not adapted",
                              ["--use_adaptive_loss=False", "--rating_head=bias", "--adapt_user_bias=False",
                               *LEARNED_USER_BASIC]),
    "maml-bias-item-outer": ("MAML++, bias head, b_item only in the outer loop",
                             ["--use_adaptive_loss=False", "--rating_head=bias", "--adapt_item_bias=False",
                              *LEARNED_USER_BASIC]),
    "maml-bias-head-only": ("MAML++, bias head, inner loop adapts head and biases only (ANIL)",
                            ["--use_adaptive_loss=False", "--rating_head=bias", "--inner_params=head",
                             *LEARNED_USER_BASIC]),
    "melo-bias-head-only": ("MELO, bias head, inner loop adapts head and biases only (ANIL)",
                            ["--use_adaptive_loss=True", "--rating_head=bias", "--inner_params=head",
                             *LEARNED_USER_BASIC]),
    "maml-bias-decay": ("MAML++, bias head, outer weight decay 1e-4",
                        ["--use_adaptive_loss=False", "--rating_head=bias", "--outer_weight_decay=1e-4",
                         *LEARNED_USER_BASIC]),
    "maml-bias-dropout": ("MAML++, bias head, transformer dropout 0.3",
                          ["--use_adaptive_loss=False", "--rating_head=bias", "--bert_dropout=0.3",
                           *LEARNED_USER_BASIC]),
    "maml-bias-user-rate": ("MAML++, bias head, b_user's inner rate starting at 0.5 (one step: the fold-in)",
                            ["--use_adaptive_loss=False", "--rating_head=bias", "--user_bias_lr=0.5",
                             *LEARNED_USER_BASIC]),
    "melo-bias-user-rate": ("MELO, bias head, b_user's inner rate starting at 0.5 (one step: the fold-in)",
                            ["--use_adaptive_loss=True", "--rating_head=bias", "--user_bias_lr=0.5",
                             *LEARNED_USER_BASIC]),
    # compare.py's default start: the untrained meta-learner is the fold-in (f ≡ 0, b_user at its fold-in
    # start); and the two halves of that recipe apart
    "maml-fold-in": ("MAML++ from the fold-in: random weights, f = 0, b_user at the fold-in",
                     ["--use_adaptive_loss=False", *study.START_FLAGS["fold-in"]]),
    "melo-fold-in": ("MELO from the fold-in: random weights, f = 0, b_user at the fold-in",
                     ["--use_adaptive_loss=True", *study.START_FLAGS["fold-in"]]),
    "melo-fold-in-per-step": ("MELO from the fold-in, weights read the current prediction and error per step",
                              ["--use_adaptive_loss=True", *study.START_FLAGS["fold-in"], "--task_state=per_step"]),
    # issue 21's ablation at that start, the same for both meta-learners: what the inner loop adapts, how
    # fast, and dropout against the transformers' overfitting (a transformer's flag: BERT4Rec and SASRec)
    **{f"{method}-fold-in-{variant}": (f"{label} from the fold-in, {what}",
                                       [f"--use_adaptive_loss={method == 'melo'}", *study.START_FLAGS["fold-in"],
                                        *flags])
       for method, label in (("maml", "MAML++"), ("melo", "MELO"))
       for variant, what, flags in (
           ("head-only", "inner loop adapts the output layer and the biases only (ANIL)", ["--inner_params=head"]),
           ("head-only-lr0.03", "ANIL, inner rates starting at 0.03", ["--inner_params=head", "--inner_lr=0.03"]),
           ("head-only-lr0.3", "ANIL, inner rates starting at 0.3", ["--inner_params=head", "--inner_lr=0.3"]),
           ("user-frozen", "b_user not adapted (it stays at its fold-in start)", ["--adapt_user_bias=False"]),
           ("dropout", "transformer dropout 0.3", ["--bert_dropout=0.3"]))},
    "maml-random-learned-user": ("MAML++ from random weights, f = 0, b_user at its meta-learned value",
                                 ["--use_adaptive_loss=False", *study.START_FLAGS["fold-in"],
                                  "--user_bias_start=learned"]),
    "maml-basic-fold-in-user": ("MAML++ from the whole Basic model, b_user at the fold-in",
                                ["--use_adaptive_loss=False", "--user_bias_start=fold-in",
                                 *study.START_FLAGS["basic"]]),
}
# The baselines without a network as variants: no flags of their own, one `main.py --test_baseline` each.
BASELINE_VARIANTS = {name: (f"no network: {baseline.label}"
                             + (" (its val RMSE is in-sample: a, b fitted there)" if baseline.recalibrated else "")
                             + (" (its val RMSE is in-sample: s chosen there)" if baseline.blended else ""), None)
                      for name, baseline in baselines.BASELINES.items()}
# Set by this script for each run; not allowed among the shared flags.
CONTROLLED = ("mode", "data_path", "model", "random_seed", "checkpoint_dir", "log_dir",
              "pretrain_log_dir", "test", "test_best", "test_baseline", "baseline", "checkpoint_step",
              "num_train_iterations", "pretrain_epochs", "save_pretrained")
# One variant of one seed: its test report, the runs it still needs, its folder and resolved settings.
Run = namedtuple("Run", "seed name report steps folder settings argv")


def build_parser():
    parser = options.CommandLineParser(
        description="Train and test variants of MELO / MAML++ on the same data, seeds and budget, and print "
                    "the ablation table. Flags not listed here are main.py's and go to every run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--mode", default="ml-1m", choices=options.MODES, help="data set")
    add("--data_path", default=None, help="ratings file (default: the mode's default location)")
    add("--model", default="bert4rec", choices=tuple(BACKBONES), help="backbone of every variant")
    add("--variants", default="maml,melo-bounded,melo-unbounded,melo-normalised,melo-per-step",
        help="comma-separated variants, in table order; known: " + ", ".join(VARIANTS)
             + "; and the baselines without a network: " + ", ".join(BASELINE_VARIANTS))
    add("--define", action="append", default=[], metavar="NAME=FLAGS",
        help="a variant of your own, run when --variants names it: its name, '=', and its main.py flags in "
             "one quoted argument; repeatable")
    add("--seeds", type=flag_types.positive_int, default=1, help="number of seeds from --random_seed")
    add("--random_seed", type=flag_types.seed, default=222, help="first seed")
    add("--vary_init", type=flag_types.str2bool, default=False,
        help="seed s also sets --model_init_seed=s (else every seed starts from the same weights)")
    add("--num_train_iterations", type=flag_types.positive_int, default=300, help="main.py outer iterations")
    add("--pretrain_epochs", type=flag_types.positive_int, default=20,
        help="train_original.py epochs, for variants that load pretrained weights")
    add("--pairs", default="",
        help="comma-separated A:B pairs of variants: the table adds A − B's RMSE and mean per-rating RMSE over "
             "the seeds' test users pooled, each with its paired 95 %% bootstrap interval (users drawn within "
             "each seed), whose half width is the smallest difference it resolves")
    add("--results_dir", default="./results/ablation", help="root of every run's files and of the table")
    add("--dry_run", action="store_true", help="print the commands that would run, run nothing")
    add("--verbose", action="store_true", help="show the runs' output instead of writing it to logs")
    return parser


def parse(argv):
    known, extra = build_parser().parse_known_args(argv)
    controlled = sorted(set(study.given_flags(extra)) & set(CONTROLLED + (("model_init_seed",) if known.vary_init
                                                                             else ())))
    if controlled:
        raise MeloError(f"ablation.py sets {', '.join('--' + c for c in controlled)} for each run itself; "
                        "leave them out (its own flags: python ablation.py --help)")
    variants = {**VARIANTS, **BASELINE_VARIANTS}
    names = [v.strip() for v in known.variants.split(",") if v.strip()]
    for definition in known.define:
        name, _, flags = definition.partition("=")
        if not name.strip() or not flags.strip():
            raise MeloError(f"--define {definition!r}: expected NAME=FLAGS, e.g. --define 'melo-lr=--lstm_lr=0.01'")
        try:
            flags = shlex.split(flags)
        except ValueError as error:  # "No closing quotation", "No escaped character"
            raise MeloError(f"--define {definition!r}: its flags cannot be split as a shell would ({error}): "
                            "check the quotes") from None
        if name.strip() in BASELINE_VARIANTS:
            raise MeloError(f"--define {name.strip()}: that is the name of a baseline without a network; "
                            "give your variant another name")
        variants[name.strip()] = (f"defined: {shlex.join(flags)}", flags)
    unknown = [n for n in names if n not in variants]
    if unknown or not names:
        raise MeloError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(variants)} "
                        "(or --define NAME=FLAGS)")
    known.pairs = [tuple(n.strip() for n in pair.split(":")) for pair in known.pairs.split(",") if pair.strip()]
    for pair in known.pairs:
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(names):
            raise MeloError(f"--pairs: {':'.join(pair)!r} is not two different variants of --variants "
                            "joined by ':', e.g. --pairs=melo:maml")
    for name in names:  # every run's flags parse before anything starts
        options.parse_args([f"--mode={known.mode}", *extra, *(variants[name][1] or ())])
    return known, extra, [(name, *variants[name]) for name in dict.fromkeys(names)]


def seed_folder(known, seed):
    return os.path.join(known.results_dir, known.mode, known.model, f"seed{seed}")


def shared_flags(known, extra, seed):
    flags = [f"--mode={known.mode}", f"--model={known.model}", f"--random_seed={seed}"]
    if known.data_path is not None:
        flags.append(f"--data_path={known.data_path}")
    if known.vary_init:
        flags.append(f"--model_init_seed={seed}")
    return flags + [*extra]


def plan(known, extra, variants, fingerprints=None):
    """A Run per seed and variant, with the (label, script, argv) steps it still needs: none when its
    report is fresh (study.report_problem: made from the data as it is now); a stale one is tested
    again, and trained again (with its pretrained export) when its checkpoint is stale too.
    `fingerprints` memoises study.data_fingerprint (a variant may change the data flags)."""
    fingerprints = {} if fingerprints is None else fingerprints
    planned = []
    for seed in [known.random_seed + k for k in range(known.seeds)]:
        shared = shared_flags(known, extra, seed)
        pretrained = set()  # the rating heads whose Basic export this seed already makes or has
        for name, _, own in variants:
            folder = os.path.join(seed_folder(known, seed), name)
            if own is None:
                planned.append(baseline_run(known, shared, seed, name, folder, fingerprints))
                continue
            head = options.parse_args([f"--mode={known.mode}", *shared, *own]).rating_head
            # Basic is trained with the head of the variants that load it: one export per head and seed
            pretrain_dir = pretrained_folder(known, seed, head)
            flags = shared + [f"--pretrain_log_dir={pretrain_dir}",
                              f"--checkpoint_dir={os.path.join(folder, 'checkpoints')}",
                              f"--log_dir={os.path.join(folder, 'runs')}", *own,
                              f"--num_train_iterations={known.num_train_iterations}"]
            args = options.parse_args(flags)
            settings = resolved_settings(args, known.pretrain_epochs)
            check_settings(folder, name, settings)
            prefix = runs.meta_prefix(args)
            report = runs.meta_report_path(args, prefix, known.num_train_iterations)
            fingerprint = lambda args=args: study.data_fingerprint(args, fingerprints)  # read when needed
            steps = []
            problem = study.report_problem(report, fingerprint, with_predictions=reads_predictions(known, name))
            if problem:
                study.remake(f"seed {seed} {name}", report, problem)
                train = study.training_need("main.py", flags, args.checkpoint_dir, prefix,
                                              known.num_train_iterations, fingerprint)
                if train:
                    if (args.load_pretrained or args.load_pretrained_embedding) and head not in pretrained:
                        steps += pretraining_steps(known, shared + [f"--rating_head={head}"], pretrain_dir,
                                                   fingerprints)
                        pretrained.add(head)  # once per seed and head
                    steps.append(train)
                steps.append(("test", "main.py", flags + [f"--checkpoint_step={known.num_train_iterations}",
                                                         "--test"]))
            planned.append(Run(seed, name, report, steps, folder, settings, flags))
    return planned


def reads_predictions(known, name):
    """Are variant `name`'s per-target CSVs read (a --pairs partner's, a baseline's validation RMSE)? Then
    a report is fresh only with its own CSVs beside it (study.report_problem)."""
    return name in BASELINE_VARIANTS or any(name in pair for pair in known.pairs)


def baseline_run(known, shared, seed, name, folder, fingerprints):
    """The Run of baseline `name` for `seed`: main.py --test_baseline, unless its report is fresh."""
    flags = shared + [f"--checkpoint_dir={os.path.join(folder, 'checkpoints')}",
                      f"--log_dir={os.path.join(folder, 'runs')}"]
    args = options.parse_args(flags)
    settings = baseline_settings(args)
    check_settings(folder, name, settings)
    report = baselines.report_path(args, name)
    steps = []
    problem = study.report_problem(report, lambda: study.data_fingerprint(args, fingerprints),
                                   with_predictions=reads_predictions(known, name))
    if problem:
        study.remake(f"seed {seed} {name}", report, problem)
        steps = [("test", "main.py", flags + ["--test_baseline", f"--baseline={name}"])]
    return Run(seed, name, report, steps, folder, settings, flags)


def baseline_settings(args):
    """The options a baseline's numbers depend on: the data, the split and tasks, --select_by and
    --grid_choice (not the training flags, so an ablation of other variants or lengths reuses it)."""
    names = (*study.DATA_OPTIONS, *(field.name for field in dataclasses.fields(TaskConfig)), "select_by",
             "grid_choice")
    return {name: getattr(args, name) for name in sorted(set(names)) if name not in study.NOT_SETTINGS}


def validation_rmse(run, report):
    """A run's validation RMSE at its chosen step (None for a report that records none), or for a baseline
    at its chosen setting: the RMSE of its validation users' CSV, which report_problem checked is the
    report's own (for mf-fold-in-recalibrated and fold-in-blend an in-sample score: their (a, b) and s are fitted on those
    users)."""
    if run.name not in BASELINE_VARIANTS:
        return report.get("validation", {}).get("rmse")
    frame = pd.read_csv(metrics.validation_predictions_path(run.report))
    return float(((frame["prediction"] - frame["rating"]) ** 2).mean() ** 0.5)


def resolved_settings(args, pretrain_epochs):
    """Every option of a run that can change its numbers (main.py's defaults filled in): its length, and
    the Basic training it starts from (`pretrain_epochs`) when it loads one."""
    settings = {k: v for k, v in vars(args).items() if k not in study.NOT_SETTINGS + ("test", "test_best")}
    settings["num_train_iterations"] = args.num_train_iterations
    if args.load_pretrained or args.load_pretrained_embedding:
        settings["pretrain_epochs"] = pretrain_epochs
    return dict(sorted(settings.items()))


def check_settings(folder, name, current):
    """A variant's folder is reused only for the settings it was made with, `current` now (a default that
    changed since would silently relabel its results): the first plan records them, later plans study."""
    path = os.path.join(folder, "settings.json")
    if os.path.exists(path):
        with open(path) as handle:
            saved = json.load(handle)
        differing = runs.settings_differences(saved, current)
        if differing:
            raise MeloError(f"variant {name} in {folder} was run with other settings: {', '.join(differing)}; "
                            f"use another --results_dir or remove {folder}")


def record_settings(run):
    path = os.path.join(run.folder, "settings.json")
    if not os.path.exists(path):
        metrics.write_json_atomic(run.settings, path)


def pretrained_folder(known, seed, head):
    """Where a seed's Basic export for the rating head `head` lives (`pretrained/` for the plain head)."""
    return os.path.join(seed_folder(known, seed), "pretrained" + ("" if head == "plain" else f"-{head}"))


def pretraining_steps(known, flags, folder, fingerprints):
    """train_original.py --save_pretrained=True for this seed into `folder`, unless its export exists and
    was made from the data as it is now (a stale one is made again over the old run); one made under other
    settings (its shape, training options or epochs) is refused, never loaded as if it were this one."""
    flags = flags + [f"--pretrain_log_dir={folder}", f"--pretrain_epochs={known.pretrain_epochs}",
                     "--save_pretrained=True", f"--log_dir={os.path.join(folder, 'runs')}"]
    args = options.parse_args(flags)
    export = runs.pretrained_path(args)
    if not os.path.exists(export):
        return [("pretrain", "train_original.py", flags)]
    saved = checkpointing.read_saved_dict(export, "pretrained export")
    if study.checkpoint_is_stale(saved, lambda: study.data_fingerprint(args, fingerprints)):
        return [("pretrain", "train_original.py", flags + ["--overwrite=True"])]
    # Every option Basic's weights depend on, its head's start included (exports from before they recorded
    # their training options are checked for --pretrain_epochs alone)
    own = ("pretrain_epochs", "model_init_seed")  # recorded beside the training options
    recorded = {**saved.get("training_options", {}), **{key: saved[key] for key in own if key in saved}}
    current = runs.comparable(vars(args))
    shape = runs.comparable(saved.get("shape_options", {}))
    differing = (checkpointing.option_differences(recorded, current, (*own, *runs.basic_training_option_names()))
                 + checkpointing.option_differences(shape, current, sorted(set(shape) & set(current))))
    if differing:
        raise MeloError(f"the Basic export {export}, which this ablation's variants would load, was made with other "
                        f"settings: {', '.join(differing)}; use another --results_dir, or remove {export} to "
                        f"train it again")
    return []


def execute(known, runs):
    # each run's settings are recorded before its first step: from then on its folder holds results of them
    study.run_steps([study.Step(f"seed {run.seed} {run.name}: {label}", label,
                                os.path.join(seed_folder(known, run.seed), "logs", f"{run.name}_{label}.log"),
                                script, argv, f"seed {run.seed} {run.name}", lambda run=run: record_settings(run))
                     for run in runs for label, script, argv in run.steps], known.dry_run, known.verbose)


def build_table(known, variants, runs, argv, fingerprints=None):
    """Markdown text, a JSON-ready summary per variant and the --pairs' results from the runs' test reports
    (each checked fresh)."""
    fingerprints = {} if fingerprints is None else fingerprints
    reports, val_rmse = {}, {}
    for run in runs:
        fingerprint = study.data_fingerprint(options.parse_args(run.argv), fingerprints)
        report = study.read_report(run.report, fingerprint, reads_predictions(known, run.name))
        reports.setdefault(run.name, []).append(report)
        val_rmse.setdefault(run.name, []).append(validation_rmse(run, report))
    ratings = sorted({r for rs in reports.values() for report in rs
                      for r in report.get("adaptive_weight_by_rating", {})}, key=float)
    columns = (["variant", "what", "val RMSE", "test RMSE", "test MAE", "test mean per-rating RMSE"]
               + [f"weight {r}★" for r in ratings])
    lines = ["| " + " | ".join(columns) + " |", "|---|---|" + "---:|" * (len(columns) - 2)]
    summary = {}
    for name, description, _ in variants:
        found = reports[name]
        values = {"val_rmse": val_rmse[name],
                  "rmse": [r["rmse"] for r in found], "mae": [r["mae"] for r in found],
                  "mean_per_rating_rmse": [r["mean_per_rating_rmse"] for r in found]}
        for rating in ratings:
            values[f"weight_{rating}"] = [r.get("adaptive_weight_by_rating", {}).get(rating) for r in found]
        summary[name] = {key: {"per_seed": vals, "mean": study.mean_std(vals)[0], "std": study.mean_std(vals)[1]}
                         for key, vals in values.items()}
        # a | inside a cell (the unbounded form's |1 + z|, a --define's flags) would end it
        cells = [name.replace("|", "\\|"), description.replace("|", "\\|")] + [study.cell(v) for v in values.values()]
        lines.append("| " + " | ".join(cells) + " |")
    pair_table, pairs = pair_lines(known.pairs, runs)
    seeds = ", ".join(str(known.random_seed + k) for k in range(known.seeds))
    counts = sorted({r["count"] for rs in reports.values() for r in rs})
    intro = [f"# Ablation: {known.model} on {known.mode}", "",
             f"Seeds {seeds}{' (mean ± standard deviation over seeds)' if known.seeds > 1 else ''}"
             f"{', initial weights seeded per seed' if known.vary_init else ''}; {known.num_train_iterations} "
             f"iterations, tested at the last checkpoint with the best-by-validation weights; "
             f"{'/'.join(map(str, counts))} test targets (query windows) per seed, in stars. Weight r★: the "
             "learned loss's mean weight on the test users' support positions rated r (over the inner steps; "
             "– for MAML++).", "", f"Command: `python ablation.py {shlex.join(argv)}`", ""]
    return "\n".join(intro + lines + pair_table) + "\n", summary, pairs


def pair_lines(pairs, runs):
    """The --pairs table's lines, and {"A - B": result}: A − B pooled over the seeds' test users
    (tables.pooled_difference on the runs' per-target predictions, matched by user and window; build_table
    checked that each CSV is its report's own)."""
    if not pairs:
        return [], {}
    predictions = {(run.name, run.seed): pd.read_csv(metrics.predictions_path(run.report)) for run in runs
                   if any(run.name in pair for pair in pairs)}
    seeds = sorted({run.seed for run in runs})
    results = {}
    lines = ["", f"| pooled paired difference, {len(seeds)} seed{'s' if len(seeds) > 1 else ''} | RMSE | "
                 "mean per-rating RMSE | resolves ± (RMSE) |", "|---|---:|---:|---:|"]
    for a, b in pairs:
        found = tables.pooled_difference([(predictions[a, seed], predictions[b, seed]) for seed in seeds],
                                         PAIR_RESAMPLES, PAIR_BOOTSTRAP_SEED)
        results[f"{a} - {b}"] = found
        cells = [f"{r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
                 for r in (found["rmse"], found["mean_per_rating_rmse"])]
        lines.append(f"| {a} − {b} ({found['rmse']['users']} users) | {' | '.join(cells)} | "
                     f"{found['rmse']['half_width']:.4f} |")
    return lines, results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    known, extra, variants = parse(argv)
    fingerprints = {}
    if known.dry_run:  # reads only
        execute(known, plan(known, extra, variants, fingerprints))
        return None
    with study.lock_results(os.path.join(known.results_dir, known.mode, known.model), "ablation"):
        planned = plan(known, extra, variants, fingerprints)
        try:
            with runtime.sigterm_as_interrupt():  # between runs; during one, study.run_script forwards it
                execute(known, planned)
        except KeyboardInterrupt as error:
            line, status = study.stopped_line(error, "ablation.py", argv)
            print(line, file=sys.stderr)
            raise SystemExit(status)
        text, summary, pairs = build_table(known, variants, planned, argv, fingerprints)
        print()
        print(text)
        folder = os.path.join(known.results_dir, known.mode, known.model)
        path = os.path.join(folder, "ablation.md")
        os.makedirs(folder, exist_ok=True)
        write_atomic(path, lambda out: out.write(text), binary=False)
        metrics.write_json_atomic({"argv": argv, "variants": summary, "pairs": pairs},
                                  os.path.join(folder, "ablation.json"))
        print(f"table written to {path}")
        return text, summary


if __name__ == "__main__":
    options.run_cli(main, parse=lambda argv: argv)
