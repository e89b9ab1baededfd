"""The comparison table in one command: Basic, Fine-tune, MAML and MELO per backbone, plus the baselines
without a network, per query window and per user, with paired bootstrap intervals of MELO's differences.

    python compare.py --mode=ml-100k --data_path=./Data/ml-100k/u.data --models=bert4rec,sasrec,gru4rec,narm
    python compare.py --mode=ml-100k --num_train_iterations=200 --pretrain_epochs=10 --seeds=3 \\
        --num_test_data=100 --max_seq_len=20            # any other main.py flag is passed to every run

For each seed and backbone it runs, each in a fresh process (`python main.py ...`,
`python train_original.py ...`), with the same data flags and seed:

* Basic: `train_original.py` for `--pretrain_epochs` epochs, then `--checkpoint_step=<epochs> --test`;
* Fine-tune (unless `--finetune_steps_grid=`): the Basic checkpoint tested with SGD steps per test user,
  lr and steps chosen on the validation users from `--finetune_lr_grid` x `--finetune_steps_grid`;
* MAML (`--use_adaptive_loss=False`) and MELO: `main.py` for `--num_train_iterations` iterations, then
  `--checkpoint_step=<iterations> --test` (the last checkpoint, holding the best-by-validation weights),
  both started as `--start` says (START_FLAGS): by default from the fold-in (random weights with the bias
  head's f = 0 and the user's parameters at their fold-in start: the untrained meta-learner is the head's
  start, by default the fold-in blend of `--bias_start`); with `--start=basic` from the whole trained Basic
  model, which then exports its weights;
* once per seed, each baseline of baselines.py (`main.py --test_baseline --baseline=<name>`).

`--vary` says what a seed changes: `random_seed` (the user split, the tasks, the training order: run k
uses --random_seed + k), `model_init_seed` (only the initial weights: --model_init_seed + k) or `both`.
Every run of a seed lives in `<results_dir>/<mode>/seed<s>/` (`seed<s>_init<i>` when the initial weights
vary; checkpoints/, pretrained/, runs/, logs/), and every number comes from the JSON reports and the
per-target CSVs there: a run whose report exists is not repeated, a finished training run is only tested.
A report counts only when it records the data fingerprint of the ratings file as it is now (and, where
the CSV is read, that CSV's hash): one made from other data, before fingerprints, or truncated is made
again, with its training when the checkpoint was trained on other data too.
The settings shared by all runs are recorded in `<results_dir>/<mode>/settings.json`; results made with
other settings are refused rather than mixed in (use another `--results_dir`). The tables (RMSE and MAE
per backbone x method per query window and per user, MELO's error reduction over Basic and over MAML,
per-rating RMSE, and the paired bootstrap intervals over test users of MELO − MAML, MELO − Fine-tune and
MELO − Basic; what a network adds beyond the biases: each meta-learner − the best no-network baseline and
each method's blend with the fold-in, w chosen on the validation users; a † where a tuned choice stayed on
its grid's edge; mean +- standard deviation over seeds when `--seeds` > 1) are printed and saved as
`<results_dir>/<mode>/comparison.md` (and `comparison.json`; tables.py makes them), the per-rating figure as
`comparison.png`.
"""
from common import errors

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    errors.say_when_terminated()

import argparse
import json
import os
import sys
from dataclasses import dataclass, field

import pandas as pd

from common import flag_types, runtime
from common.errors import MeloError
from common.runtime import write_atomic
from evaluation import baselines, metrics
from models import BACKBONES, HEADS
import options
from ratings.preprocess import load_data
from ratings.tasks import MetaDataset
from studies import figures, study
from studies.study import (CONTROLLED, NOT_SETTINGS, START_FLAGS, data_fingerprint, given_flags, lock_results,
                           read_report, remake, report_problem, stopped_line, training_need)
from studies.tables import FOLD_IN_BLEND, METHOD_NAMES, NO_NETWORK, PAIRED, RECALIBRATED, build_tables, figure_reports
from training import runs


def build_parser():
    parser = options.CommandLineParser(
        description="Run (or reuse) Basic, Fine-tune, MAML and MELO for each backbone plus the baselines "
                    "without a network, and print the comparison tables. Flags not listed here are main.py's "
                    "(see python main.py --help) and are passed to every run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--mode", default="ml-1m", choices=options.MODES, help="data set")
    add("--data_path", default=None, help="ratings file (default: the mode's default location)")
    add("--models", default=",".join(BACKBONES), help="comma-separated backbones")
    add("--seeds", type=flag_types.positive_int, default=1,
        help="number of seeds (see --vary); >1 reports mean +- std and in how many seeds MELO wins")
    add("--vary", default="random_seed", choices=("random_seed", "model_init_seed", "both"),
        help="what seed k changes: --random_seed + k (split, tasks, training order), --model_init_seed + k "
             "(initial weights only), or both")
    add("--random_seed", type=flag_types.seed, default=222, help="first (or only) --random_seed")
    add("--model_init_seed", type=flag_types.seed, default=0, help="first (or only) --model_init_seed")
    add("--num_train_iterations", type=flag_types.positive_int, default=2000, help="main.py outer iterations")
    add("--pretrain_epochs", type=flag_types.positive_int, default=100, help="train_original.py epochs")
    add("--finetune_steps_grid", type=flag_types.comma_list(flag_types.non_negative_int), default="1,2,5,10",
        help="Fine-tune row: SGD step counts chosen from on the validation users (empty = no Fine-tune row)")
    add("--finetune_steps", type=flag_types.non_negative_int, default=None,
        help="the older form of --finetune_steps_grid=K (K steps, lr still chosen on validation); "
             "0 = no Fine-tune row")
    add("--finetune_lr_grid", type=flag_types.comma_list(flag_types.learning_rate), default="0.01,0.03,0.1,0.3",
        help=f"Fine-tune row: SGD learning rates chosen from on the validation users (0 to {flag_types.LR_MAX:g})")
    add("--start", default="fold-in", choices=tuple(START_FLAGS),
        help="how MAML and MELO start: fold-in = from random weights with the bias head's f = 0 and the user's "
             "parameters at their fold-in start, so that the untrained meta-learner is the better classic fold-in "
             f"({' '.join(START_FLAGS['fold-in'])}); basic = from the whole Basic model "
             f"({' '.join(START_FLAGS['basic'])}); embedding = from Basic's item embedding (the original recipe); "
             "random = from random weights at main.py's defaults")
    add("--rating_head", default="bias", choices=tuple(HEADS),
        help="the rating head of every network (Basic, Fine-tune, MAML, MELO; main.py's --rating_head): bias "
             "= mu + b_user + b_item + the network's residual, the item biases starting at the fold-in's "
             "(the default of every script, chosen by the ablation in docs/comparison.md)")
    add("--user_factors", type=flag_types.non_negative_int, default=32,
        help="every network's bias head gets a p_user . q_item term of this many columns (main.py's "
             "--user_factors): with it the head starts as the fold-in blend of the user + item bias fold-in and "
             "the MF fold-in of rank <= K (--bias_start), so the networks start from the strongest classic "
             "baseline")
    add("--bias_start", default=None, choices=options.BIAS_STARTS,
        help="where every network's bias head starts (main.py's --bias_start); default: blend with the bias "
             "head and --user_factors (s * MF fold-in + (1 - s) * user + item bias fold-in, s chosen on the "
             "validation users: on real ML-1M it validates better than the better fold-in for every "
             "meta-learner and backbone), fold-in without (nothing to blend)")
    add("--bias_outer_lr", type=flag_types.learning_rate, default=0.0,
        help="Adam lr of the bias head's tables in every network's training (main.py's --bias_outer_lr): 0 "
             "keeps them at their fold-in start, which Adam's per-row steps would move by noise")
    add("--bootstrap", type=flag_types.positive_int, default=2000,
        help="resamples of the test users for the paired 95%% intervals")
    add("--bootstrap_seed", type=flag_types.seed, default=0, help="seed of the bootstrap resampling")
    add("--results_dir", default="./results", help="root of every run's files and of the table")
    add("--dry_run", action="store_true", help="print the commands that would run, run nothing")
    add("--verbose", action="store_true", help="show the runs' output instead of writing it to logs/")
    return parser


# ============================================================================ configuration
@dataclass(frozen=True)
class Seed:
    """What one seed of the comparison sets: the --random_seed and --model_init_seed of its runs."""
    random_seed: int
    model_init_seed: int
    init_varies: bool       # name its folder and its pieces by the init seed too

    @property
    def folder(self):
        return f"seed{self.random_seed}" + (f"_init{self.model_init_seed}" if self.init_varies else "")

    @property
    def label(self):
        return f"{self.random_seed}" + (f" init {self.model_init_seed}" if self.init_varies else "")

    def __str__(self):
        return f"seed {self.label}"


@dataclass
class Config:
    mode: str
    data_path: str
    models: list
    seeds: list             # Seed per seed, in order
    iterations: int
    epochs: int
    finetune_steps_grid: list
    finetune_lr_grid: list
    root: str               # <results_dir>/<mode>
    extra: list             # passed-through main.py flags
    start: str = "fold-in"  # a key of START_FLAGS
    vary: str = "random_seed"
    bootstrap: int = 2000
    bootstrap_seed: int = 0
    dry_run: bool = False
    verbose: bool = False
    learned_loss_baseline: bool = False
    argv: list = field(default_factory=list)


def parse(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    known, extra = build_parser().parse_known_args(argv)
    controlled = sorted(set(given_flags(extra)) & set(CONTROLLED))
    if controlled:
        raise MeloError(f"compare.py sets {', '.join('--' + c for c in controlled)} for each run itself; "
                        "leave them out (its own flags: python compare.py --help)")
    models = [m.strip() for m in known.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in BACKBONES]
    if unknown or not models:
        raise MeloError(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(BACKBONES)}")
    # every run's, before the passed-through flags
    bias_start = known.bias_start or ("blend" if options.can_blend(known) else "fold-in")
    extra = [f"--rating_head={known.rating_head}", f"--user_factors={known.user_factors}",
             f"--bias_start={bias_start}", f"--bias_outer_lr={known.bias_outer_lr:g}", *extra]
    defaults = options.parse_args([f"--mode={known.mode}", *extra])
    data_path = known.data_path if known.data_path is not None else defaults.data_path
    split_varies, init_varies = known.vary in ("random_seed", "both"), known.vary in ("model_init_seed", "both")
    if known.finetune_steps is not None:  # commands written before the grids keep working
        known.finetune_steps_grid = [known.finetune_steps] if known.finetune_steps else []
    seeds = [Seed(known.random_seed + (k if split_varies else 0), known.model_init_seed + (k if init_varies else 0),
                  init_varies) for k in range(known.seeds)]
    return Config(mode=known.mode, data_path=data_path, models=list(dict.fromkeys(models)), seeds=seeds,
                  iterations=known.num_train_iterations, epochs=known.pretrain_epochs,
                  finetune_steps_grid=known.finetune_steps_grid, finetune_lr_grid=known.finetune_lr_grid,
                  root=os.path.join(known.results_dir, known.mode), extra=extra, start=known.start,
                  vary=known.vary, bootstrap=known.bootstrap, bootstrap_seed=known.bootstrap_seed,
                  dry_run=known.dry_run, verbose=known.verbose, argv=argv,
                  learned_loss_baseline=defaults.use_learned_loss_baseline)


def seed_dir(config, seed):
    return os.path.join(config.root, seed.folder)


def run_flags(config, seed, own=()):
    """The flags every run of `seed` shares (data, seeds, folders, passed-through flags), with a run's
    `own` flags before the passed-through ones, so that those win."""
    folder = seed_dir(config, seed)
    return [f"--mode={config.mode}", f"--data_path={config.data_path}", f"--random_seed={seed.random_seed}",
            f"--model_init_seed={seed.model_init_seed}", f"--checkpoint_dir={os.path.join(folder, 'checkpoints')}",
            f"--pretrain_log_dir={os.path.join(folder, 'pretrained')}",
            f"--log_dir={os.path.join(folder, 'runs')}", *own, *config.extra]


def settings_of(config):
    # as the meta-learners resolve them (Basic and the baselines read none of the START_FLAGS)
    args = options.parse_args(run_flags(config, config.seeds[0], START_FLAGS[config.start]))
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}
    settings["data_path"] = os.path.abspath(config.data_path)
    settings["mode"] = config.mode
    # compare.py's own choices that change results (an old settings.json without them is not compared)
    settings.update(finetune_steps_grid=config.finetune_steps_grid, finetune_lr_grid=config.finetune_lr_grid,
                    start=config.start, vary=config.vary,
                    model_init_seed=config.seeds[0].model_init_seed,
                    # the reports are named by them, but not the Basic export the meta-learners may start
                    # from, and a checkpoint of a longer run has the same name as a shorter run's last
                    num_train_iterations=config.iterations, pretrain_epochs=config.epochs)
    return settings


def check_settings(config):
    """Refuse a results folder made with other shared settings; return the current ones."""
    current = settings_of(config)
    path = os.path.join(config.root, "settings.json")
    if os.path.exists(path):
        with open(path) as handle:
            saved = json.load(handle)
        if "start" not in saved and "pretrained" in saved:  # a folder from before --start
            saved["start"] = "embedding" if saved.pop("pretrained") else "random"
        # Flags only one side knows (the code gained or lost one since) are not compared, but for
        # user_bias_start, whose value before the flag is known.
        differing = runs.settings_differences(saved, current)
        if differing:
            raise MeloError(f"the results in {config.root} were made with other settings: "
                            f"{', '.join(differing)}; use the same flags, another --results_dir, "
                            f"or remove {config.root}")
    return current


def record_settings(config, settings):
    path = os.path.join(config.root, "settings.json")
    if not os.path.exists(path):
        metrics.write_json_atomic(settings, path)


def check_data(config):
    """Read the data and make every seed's split here, so a file or split problem is one early error
    instead of a failed first run (this also fills the data cache the runs then read)."""
    for seed in config.seeds:
        args = options.parse_args(run_flags(config, seed))
        data = load_data(args)
        dataset = MetaDataset.from_args(data, args)
    print(f"data {config.mode} ({config.data_path}): {data.num_users()} users, {data.num_items} items; "
          f"train / validation / test users {len(dataset.train_users)} / {len(dataset.val_users)} / "
          f"{len(dataset.test_users)}", flush=True)


# ============================================================================ the runs
@dataclass
class Piece:
    """One cell source: a method of a backbone (or the mean rating) for one seed, and how to make it."""
    seed: Seed
    model: str              # None for a baseline without a network
    method: str             # a key of METHOD_NAMES
    report: str             # the JSON report it reads (the per-target CSV lies beside it)
    steps: list             # (label, script, argv) still to run, in order

    @property
    def name(self):
        what = f"{self.model} {METHOD_NAMES[self.method]}" if self.model else METHOD_NAMES[self.method].lower()
        return f"{self.seed} {what}"


def plan(config, fingerprint=None):
    """Every piece, with the runs each still needs: none when its report is fresh (made from this data,
    report_problem); a stale one is tested again, and trained again when its checkpoint is stale too."""
    if fingerprint is None:  # read the data only when a report or checkpoint exists to be checked
        known = {}
        fingerprint = lambda: data_fingerprint(options.parse_args(run_flags(config, config.seeds[0])), known)
    pieces = []
    for seed in config.seeds:
        shared = run_flags(config, seed)
        args = options.parse_args(shared)
        for name in baselines.BASELINES:
            piece = Piece(seed, None, name, baselines.report_path(args, name), [])
            problem = report_problem(piece.report, fingerprint, with_predictions=True)
            if problem:  # tested again, as the networks' reports are
                remake(piece.name, piece.report, problem)
                piece.steps = [("test", "main.py", shared + ["--test_baseline", f"--baseline={name}"])]
            pieces.append(piece)
        for model in config.models:
            pieces += [basic_piece(config, seed, shared, model, False, fingerprint)]
            if config.finetune_steps_grid:
                pieces.append(basic_piece(config, seed, shared, model, True, fingerprint))
            for method, adaptive in (("maml", "False"), ("melo", "True")):
                pieces.append(meta_piece(config, seed, model, method, adaptive, fingerprint))
    return pieces


def with_predictions(method):
    """Is the per-target CSV of this method read for the paired intervals? (Every report's CSVs must be the
    ones written with it, read or not: report_problem checks them all.)"""
    return method in ("melo",) + PAIRED + NO_NETWORK + (RECALIBRATED, FOLD_IN_BLEND)


def basic_piece(config, seed, shared, model, finetune, fingerprint):
    """Basic (trains if its last checkpoint is missing, exporting its weights when the start loads them, then
    tests) or Fine-tune (tests the Basic checkpoint, which the Basic piece before it trains, with lr and
    steps chosen on validation)."""
    flags = shared + [f"--model={model}", f"--pretrain_epochs={config.epochs}"]
    tuning = [f"--finetune_steps_grid={','.join(map(str, config.finetune_steps_grid))}",
              f"--finetune_lr_grid={','.join(f'{lr:g}' for lr in config.finetune_lr_grid)}"] if finetune else []
    args = options.parse_args(flags + tuning)
    method = "finetune" if finetune else "basic"
    piece = Piece(seed, model, method, runs.basic_report_path(args, config.epochs), [])
    problem = report_problem(piece.report, fingerprint, with_predictions=True)
    if problem is None:
        return piece
    remake(piece.name, piece.report, problem)
    piece.steps = [("test", "train_original.py", flags + [f"--checkpoint_step={config.epochs}", "--test"] + tuning)]
    if not finetune:  # Fine-tune tests the checkpoint that the Basic piece before it (re)makes
        export = ["--save_pretrained=True"] if any(flag.startswith("--load_pretrained")
                                                   for flag in START_FLAGS[config.start]) else []
        train = training_need("train_original.py", flags + export, args.pretrain_log_dir,
                              runs.basic_prefix(args), config.epochs, fingerprint)
        piece.steps[:0] = [train] if train else []
    return piece


def meta_piece(config, seed, model, method, adaptive, fingerprint):
    """MAML or MELO, started as --start says (the test gets the same flags, which it does not read, so
    that each test command is its training command plus --checkpoint_step and --test)."""
    flags = run_flags(config, seed, START_FLAGS[config.start]) + [
        f"--model={model}", f"--use_adaptive_loss={adaptive}", f"--num_train_iterations={config.iterations}"]
    args = options.parse_args(flags)
    prefix = runs.meta_prefix(args)
    piece = Piece(seed, model, method, runs.meta_report_path(args, prefix, config.iterations), [])
    problem = report_problem(piece.report, fingerprint, with_predictions=True)
    if problem is None:
        return piece
    remake(piece.name, piece.report, problem)
    train = training_need("main.py", flags, args.checkpoint_dir, prefix, config.iterations, fingerprint)
    piece.steps = ([train] if train else []) + [
        ("test", "main.py", flags + [f"--checkpoint_step={config.iterations}", "--test"])]
    return piece


def execute(config, pieces):
    def log_path(piece, label):
        name = f"{piece.model}_{piece.method}_{label}.log" if piece.model else f"{piece.method}.log"
        return os.path.join(seed_dir(config, piece.seed), "logs", name)

    study.run_steps([study.Step(f"{piece.name}: {label}", label, log_path(piece, label), script, argv, piece.name,
                                None) for piece in pieces for label, script, argv in piece.steps],
                    config.dry_run, config.verbose)
    if config.dry_run:
        return
    missing = [piece.report for piece in pieces if not os.path.exists(piece.report)]
    if missing:
        raise MeloError(f"expected reports are missing after the runs: {', '.join(missing)}")


# ============================================================================ the tables
def read_reports(pieces, fingerprint):
    """{(model or None, method): [report per seed in seed order]}, each checked fresh (read_report)."""
    found = {}
    for piece in pieces:
        found.setdefault((piece.model, piece.method), []).append(
            read_report(piece.report, fingerprint, with_predictions=True))
    return found


def read_predictions(pieces):
    """{(model, method): [per-target DataFrame per seed]} of the methods MELO is paired with and of the
    no-network baselines the meta-learners are paired with."""
    found = {}
    for piece in pieces:
        if with_predictions(piece.method):  # read_reports checked that it is the report's own CSV
            path = metrics.predictions_path(piece.report)
            found.setdefault((piece.model, piece.method), []).append(pd.read_csv(path))
    return found


def read_validation(pieces):
    """{(model, method): [validation per-target DataFrame, or None for a report from before them, per seed]}."""
    found = {}
    for piece in pieces:
        path = metrics.validation_predictions_path(piece.report)
        found.setdefault((piece.model, piece.method), []).append(pd.read_csv(path) if os.path.exists(path) else None)
    return found


def main(argv=None):
    config = parse(argv)
    if config.dry_run:  # reads only
        return run_study(config)
    with lock_results(config.root, "compare"):
        return run_study(config)


def run_study(config):
    # A dry run without the ratings file (e.g. before its download) plans every report as to be made.
    fingerprint = (None if config.dry_run and not os.path.isfile(config.data_path) else
                   data_fingerprint(options.parse_args(run_flags(config, config.seeds[0]))))
    pieces = plan(config, fingerprint)
    # Every run's full flag set is checked before anything starts (argparse's cross-flag checks).
    for piece in pieces:
        for _, _, run_argv in piece.steps:
            options.parse_args(run_argv)
    settings = check_settings(config)
    if any(piece.steps for piece in pieces):
        check_data(config)
    if not config.dry_run:
        record_settings(config, settings)
    try:
        with runtime.sigterm_as_interrupt():  # between runs; during one, study.run_script forwards it
            execute(config, pieces)
    except KeyboardInterrupt as error:
        line, status = stopped_line(error, "compare.py", config.argv)
        print(line, file=sys.stderr)
        raise SystemExit(status)
    if config.dry_run:
        return None
    reports = read_reports(pieces, fingerprint)
    meta_args = options.parse_args(run_flags(config, config.seeds[0], START_FLAGS[config.start]))
    text, summary = build_tables(config, reports, meta_args, read_predictions(pieces), read_validation(pieces))
    print()
    print(text)
    os.makedirs(config.root, exist_ok=True)
    path = os.path.join(config.root, "comparison.md")
    write_atomic(path, lambda out: out.write(text), binary=False)
    figure = figures.comparison_figure(figure_reports(config, reports), os.path.join(config.root, "comparison.png"),
                                       dashed=[METHOD_NAMES[name] for name in baselines.BASELINES])
    metrics.write_json_atomic({"settings": settings, "seeds": [vars(seed) for seed in config.seeds],
                               "models": config.models, "iterations": config.iterations, "epochs": config.epochs,
                               "finetune_steps_grid": config.finetune_steps_grid,
                               "finetune_lr_grid": config.finetune_lr_grid, "start": config.start,
                               "reports": {p.name: p.report for p in pieces}, "cells": summary},
                              os.path.join(config.root, "comparison.json"))
    print(f"table written to {path}, figure to {figure}")
    return text, summary


def cli(argv=None):
    try:
        main(argv)
    except MeloError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
