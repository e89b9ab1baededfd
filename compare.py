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
  both started as `--start` says (START_FLAGS): by default from the whole trained Basic model, which then
  exports its weights;
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
`<results_dir>/<mode>/comparison.md` (and `comparison.json`), the per-rating figure as `comparison.png`.
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

import baselines
import checkpointing
import figures
import metrics
import options
import runs
import runtime
import study
import tuning
from analysis import SHARE_NAMES
from dataloader import MetaDataset, load_data
from models import BACKBONES
from options import MeloError
from runtime import write_atomic
from study import (CONTROLLED, DATA_OPTIONS, NOT_SETTINGS, START_DESCRIPTIONS, START_FLAGS, cell,  # noqa: F401
                   checkpoint_is_stale, data_fingerprint, failure_line, given_flags, lock_results, mean_std,
                   read_report, remake, report_problem, run_script, stopped_line, training_need, training_step)


def display(model):
    """A backbone's name in tables and figures (its registry entry's display_name)."""
    return BACKBONES[model].display_name


METHOD_NAMES = {**{name: baseline.label for name, baseline in baselines.BASELINES.items()},
                "basic": "Basic", "finetune": "Fine-tune", "maml": "MAML", "melo": "MELO"}
PAIRED = ("maml", "finetune", "basic")  # MELO − each of them, paired on the same test users
# What a network adds beyond the biases: each meta-learner − the better of these on validation (paired), and
# each neural method blended with the user + item bias fold-in, w chosen on the validation users.
NO_NETWORK = ("user-item-bias", "mf-fold-in")
FOLD_IN = "user-item-bias"
BLEND_WEIGHTS = tuple(round(0.05 * k, 2) for k in range(21))


def build_parser():
    parser = options.CommandLineParser(
        description="Run (or reuse) Basic, MAML and MELO for each backbone plus the mean-rating baseline, "
                    "and print the comparison table. Flags not listed here are main.py's (see python "
                    "main.py --help) and are passed to every run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--mode", default="ml-1m", choices=options.MODES, help="data set")
    add("--data_path", default=None, help="ratings file (default: the mode's default location)")
    add("--models", default=",".join(BACKBONES), help="comma-separated backbones")
    add("--seeds", type=options.positive_int, default=1,
        help="number of seeds (see --vary); >1 reports mean +- std and in how many seeds MELO wins")
    add("--vary", default="random_seed", choices=("random_seed", "model_init_seed", "both"),
        help="what seed k changes: --random_seed + k (split, tasks, training order), --model_init_seed + k "
             "(initial weights only), or both")
    add("--random_seed", type=int, default=222, help="first (or only) --random_seed")
    add("--model_init_seed", type=int, default=0, help="first (or only) --model_init_seed")
    add("--num_train_iterations", type=options.positive_int, default=2000, help="main.py outer iterations")
    add("--pretrain_epochs", type=options.positive_int, default=100, help="train_original.py epochs")
    add("--finetune_steps_grid", type=options.comma_list(options.non_negative_int), default="1,2,5,10",
        help="Fine-tune row: SGD step counts chosen from on the validation users (empty = no Fine-tune row)")
    add("--finetune_steps", type=options.non_negative_int, default=None,
        help="the older form of --finetune_steps_grid=K (K steps, lr still chosen on validation); "
             "0 = no Fine-tune row")
    add("--finetune_lr_grid", type=options.comma_list(options.learning_rate), default="0.01,0.03,0.1,0.3",
        help=f"Fine-tune row: SGD learning rates chosen from on the validation users (0 to {options.LR_MAX:g})")
    add("--start", default="basic", choices=tuple(START_FLAGS),
        help="how MAML and MELO start: basic = from the whole Basic model, inner lr 0.1, outer loss on the "
             "query target (--load_pretrained=True --inner_lr=0.1 --query_loss=target); embedding = from "
             "Basic's item embedding (the original recipe); random = from random weights at main.py's defaults")
    add("--rating_head", default="bias", choices=("plain", "bias"),
        help="the rating head of every network (Basic, Fine-tune, MAML, MELO; main.py's --rating_head): bias "
             "= mu + b_user + b_item + the network's residual, the item biases starting at the fold-in's "
             "(the ablation's choice; main.py alone defaults to plain)")
    add("--bootstrap", type=options.positive_int, default=2000,
        help="resamples of the test users for the paired 95%% intervals")
    add("--bootstrap_seed", type=int, default=0, help="seed of the bootstrap resampling")
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
    start: str = "basic"    # a key of START_FLAGS
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
    extra = [f"--rating_head={known.rating_head}", *extra]  # every run's, before the passed-through flags
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
                    model_init_seed=config.seeds[0].model_init_seed)
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
        # Flags only one side knows (the code gained or lost one since) are not compared.
        differing = checkpointing.option_differences(saved, current, sorted(set(saved) & set(current)))
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
        dataset = MetaDataset(data, args)
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
            report = baselines.report_path(args, name)
            steps = [("test", "main.py", shared + ["--test_baseline", f"--baseline={name}"])]
            pieces.append(Piece(seed, None, name, report, steps if report_problem(report, fingerprint, False)
                                else []))
        for model in config.models:
            pieces += [basic_piece(config, seed, shared, model, False, fingerprint)]
            if config.finetune_steps_grid:
                pieces.append(basic_piece(config, seed, shared, model, True, fingerprint))
            for method, adaptive in (("maml", "False"), ("melo", "True")):
                pieces.append(meta_piece(config, seed, model, method, adaptive, fingerprint))
    return pieces


def with_predictions(method):
    """Is the per-target CSV of this method read (for the paired intervals)?"""
    return method in ("melo",) + PAIRED + NO_NETWORK


def basic_piece(config, seed, shared, model, finetune, fingerprint):
    """Basic (trains if its last checkpoint is missing, exporting its weights unless --start=random, then
    tests) or Fine-tune (tests the Basic checkpoint, which the Basic piece before it trains, with lr and
    steps chosen on validation)."""
    flags = shared + [f"--model={model}", f"--pretrain_epochs={config.epochs}"]
    tuning = [f"--finetune_steps_grid={','.join(map(str, config.finetune_steps_grid))}",
              f"--finetune_lr_grid={','.join(f'{lr:g}' for lr in config.finetune_lr_grid)}"] if finetune else []
    args = options.parse_args(flags + tuning)
    method = "finetune" if finetune else "basic"
    piece = Piece(seed, model, method, runs.basic_report_path(args, config.epochs), [])
    problem = report_problem(piece.report, fingerprint, with_predictions(method))
    if problem is None:
        return piece
    remake(piece.name, problem)
    piece.steps = [("test", "train_original.py", flags + [f"--checkpoint_step={config.epochs}", "--test"] + tuning)]
    if not finetune:  # Fine-tune tests the checkpoint that the Basic piece before it (re)makes
        export = ["--save_pretrained=True"] if START_FLAGS[config.start] else []
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
    problem = report_problem(piece.report, fingerprint, with_predictions(method))
    if problem is None:
        return piece
    remake(piece.name, problem)
    train = training_need("main.py", flags, args.checkpoint_dir, prefix, config.iterations, fingerprint)
    piece.steps = ([train] if train else []) + [
        ("test", "main.py", flags + [f"--checkpoint_step={config.iterations}", "--test"])]
    return piece


def execute(config, pieces):
    todo = [(piece, step) for piece in pieces for step in piece.steps]
    for number, (piece, (label, script, argv)) in enumerate(todo, 1):
        what = f"[{number}/{len(todo)}] {piece.name}: {label}"
        log_path = os.path.join(seed_dir(config, piece.seed), "logs",
                                f"{piece.model}_{piece.method}_{label}.log" if piece.model else f"{piece.method}.log")
        if config.dry_run:
            print(f"{what}\n    python {script} {' '.join(argv)}")
            continue
        print(f"{what} ..." + ("" if config.verbose else f" (log: {log_path})"), flush=True)
        start = time.time()
        status = study.run_script(script, argv, log_path, config.verbose)
        if status != 0:
            detail = "" if config.verbose else f": {failure_line(log_path)} (full log: {log_path})"
            raise MeloError(f"{piece.name} ({label}: python {script}) failed with exit status {status}{detail}")
        print(f"    done in {time.time() - start:.0f} s", flush=True)
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
            read_report(piece.report, fingerprint, with_predictions(piece.method)))
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


def same_targets(melo, other):
    """Two per-target frames joined by user and window (`prediction_other` the second's), refused unless
    they hold the same targets."""
    joined = melo.merge(other, on=["user", "window"], suffixes=("", "_other"), validate="one_to_one")
    if len(joined) != len(melo) or len(joined) != len(other) or not (
            (joined["item"] == joined["item_other"]).all() and (joined["rating"] == joined["rating_other"]).all()):
        raise MeloError("two methods' predictions are not on the same test targets: were they run with other "
                        "data flags? Use another --results_dir")
    return joined


def paired_difference(melo, other, resamples, seed):
    """metrics.paired_bootstrap of MELO − other on the same test targets (matched by user and window)."""
    keys = ["user", "window"]
    joined = same_targets(melo, other)
    a = metrics.per_user_errors(joined[keys + ["rating", "prediction"]])
    b = metrics.per_user_errors(joined[keys + ["rating"]].assign(prediction=joined["prediction_other"]))
    return metrics.paired_bootstrap(a["squared_error"], b["squared_error"], a["windows"], a["rating"], resamples, seed)


def blend(method_val, fold_in_val, method_test, fold_in_test):
    """w · fold-in + (1 − w) · method with w from BLEND_WEIGHTS chosen by the validation users' per-window
    RMSE; that w, and the blend's per-window RMSE on the test users."""
    def rmse(joined, w):
        blended = w * joined["prediction_other"] + (1 - w) * joined["prediction"]
        return math.sqrt(((blended - joined["rating"]) ** 2).mean())

    validation, test = same_targets(method_val, fold_in_val), same_targets(method_test, fold_in_test)
    scores = [rmse(validation, w) for w in BLEND_WEIGHTS]
    w = BLEND_WEIGHTS[int(np.argmin(scores))]
    return {"w": w, "rmse": rmse(test, w), "validation_rmse": min(scores)}


def best_no_network(reports, seed_index):
    """The baseline of NO_NETWORK with the lowest validation score (its choice's) in seed `seed_index`, and
    the scores {name: score}."""
    scores = {name: min(reports[(None, name)][seed_index]["selection"]["validation_scores"]) for name in NO_NETWORK}
    return min(scores, key=scores.get), scores


def paired_cell(results):
    """One seed: `difference [low, high]`; several: the mean of the differences with its 95% t interval
    over the seeds, in how many seeds MELO is lower, and in how many its own interval lies below 0."""
    differences = [r["difference"] for r in results]
    if len(results) == 1:
        r = results[0]
        return f"{r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
    mean, low, high = metrics.seed_interval(differences)
    below = sum(r["high"] < 0 for r in results)
    return (f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] over seeds; lower in {sum(d < 0 for d in differences)}/"
            f"{len(results)}, interval below 0 in {below}/{len(results)}")


def summary_of(values):
    mean, std = mean_std(values)
    return {"per_seed": values, "mean": mean, "std": std}


def reduction(better, baseline):
    """Per seed, how much lower `better`'s error is than `baseline`'s, in percent of the baseline's."""
    return [100.0 * (b - a) / b if a is not None and b else None for a, b in zip(better, baseline)]


def query_gradient_t(report, key="query_gradient_by_rating"):
    """{rating (or share bin): t} of a report's query gradient summary (None where one user had it)."""
    found = report.get(key)
    return None if found is None else {name: row["t"] for name, row in found.items()}


def at_edge(report):
    """{axis: side} of the grid axes whose choice in `report` stayed on an edge ({}: none, or no grid)."""
    selection = report.get("selection") or report.get("finetune_selection") or {}
    return selection.get("at_edge") or {}


def rating_key(text):
    return float(text)


def methods(config):
    return ["basic"] + (["finetune"] if config.finetune_steps_grid else []) + ["maml", "melo"]


def method_label(config, method):
    if method == "finetune":
        return "Fine-tune (tuned)"
    if method == "basic" and config.learned_loss_baseline:
        return "Basic (learned loss)"
    return METHOD_NAMES[method]


def reports_of(reports, model, method):
    """The reports (one per seed) of a backbone's method; a baseline's are the same for every backbone."""
    return reports[(None if method in baselines.BASELINES else model, method)]


def figure_reports(config, reports):
    """{backbone: {method label: report-like dict}}: each rating's RMSE and mean prediction averaged over
    the seeds whose test users have that rating."""
    def averaged(picked):
        per_rating = {}
        for rating in sorted({k for r in picked for k in r["per_rating"]}, key=rating_key):
            rows = [r["per_rating"][rating] for r in picked if rating in r["per_rating"]]
            per_rating[rating] = {key: mean_std([row[key] for row in rows])[0] for key in ("rmse", "mean_prediction")}
        return {"per_rating": per_rating}

    return {display(model): {method_label(config, method): averaged(reports_of(reports, model, method))
                             for method in list(baselines.BASELINES) + methods(config)}
            for model in config.models}


def build_tables(config, reports, predictions=None, validation=None):
    """The markdown text and a JSON-ready summary of every cell (per-seed values and their mean / std).
    `predictions` (read_predictions) adds the paired bootstrap tables, `validation` (read_validation) the
    blend with the fold-in."""
    models = config.models
    rows_methods = list(baselines.BASELINES) + methods(config)

    def values(model, method, key, per_user=False):
        picked = reports_of(reports, model, method)
        # a report from before per-user metrics has none: its cell shows –
        return [(r.get("per_user", {}) if per_user else r).get(key) for r in picked]

    summary = {"rmse_mae": {}, "per_user": {}, "per_rating_rmse": {}, "improvement_percent": {}, "paired": {},
               "by_support_rating": {}, "by_support_share": {}, "beyond_biases": {}}

    def metric_table(per_user):
        store = summary["per_user" if per_user else "rmse_mae"]
        header = "| Method | " + " | ".join(f"{display(m)} RMSE | {display(m)} MAE" for m in models) + " |"
        lines = [header, "|---|" + "---:|---:|" * len(models)]
        notes = []
        for method in rows_methods:
            row = [method_label(config, method)]
            for model in models:
                edges = [at_edge(r) for r in reports_of(reports, model, method)]
                for key in ("rmse", "mae"):
                    vals = values(model, method, key, per_user)
                    # † : a choice that the grid's extensions did not get off its edge (tuning.py)
                    row.append(cell(vals) + (" †" if key == "rmse" and any(edges) else ""))
                    store.setdefault(model, {}).setdefault(method, {})[key] = summary_of(vals)
                store[model][method]["at_edge"] = edges
                if any(edges) and (method not in baselines.BASELINES or model == models[0]):
                    axes = sorted({f"{axis} ({side})" for found in edges for axis, side in found.items()})
                    where = "" if method in baselines.BASELINES else f" on {display(model)}"
                    notes.append(f"† {method_label(config, method)}{where}: still on the edge of its grid after "
                                 f"{tuning.MAX_EXTENSIONS} extensions ({', '.join(axes)}) in "
                                 f"{sum(map(bool, edges))} of {len(edges)} seeds.")
            lines.append("| " + " | ".join(row) + " |")
        for other in ("basic", "maml"):
            row = [f"MELO vs {METHOD_NAMES[other]} (error reduction)"]
            for model in models:
                for key in ("rmse", "mae"):
                    vals = reduction(values(model, "melo", key, per_user), values(model, other, key, per_user))
                    row.append(cell(vals, percent=True))
                    if not per_user:
                        summary["improvement_percent"].setdefault(model, {}).setdefault(f"vs_{other}", {})[key] = \
                            summary_of(vals)
            lines.append("| " + " | ".join(row) + " |")
        return lines + ([""] + notes if notes else [])

    ratings = sorted({k for rs in reports.values() for r in rs for k in r["per_rating"]}, key=rating_key)
    per_rating = ["| Backbone | Method | " + " | ".join(f"{r} ★" for r in ratings) + " | mean of per-rating |",
                  "|---|---|" + "---:|" * (len(ratings) + 1)]

    def per_rating_row(backbone, model, method):
        picked = reports[(model, method)]
        row = [backbone, method_label(config, method)]
        for rating in ratings:
            vals = [r["per_rating"][rating]["rmse"] for r in picked if rating in r["per_rating"]]
            row.append(cell(vals, seeds=len(picked)))
            summary["per_rating_rmse"].setdefault(model or "all", {}).setdefault(method, {})[rating] = summary_of(vals)
        vals = [r["mean_per_rating_rmse"] for r in picked]
        row.append(cell(vals))
        summary["per_rating_rmse"][model or "all"][method]["mean_per_rating_rmse"] = summary_of(vals)
        per_rating.append("| " + " | ".join(row) + " |")

    for method in baselines.BASELINES:
        per_rating_row("all", None, method)
    for model in models:
        for method in methods(config):
            per_rating_row(display(model), model, method)

    def support_table(title, columns, labels, readers, store):
        """A table of (backbone, label, one cell per column) rows from each reader's {column: value} of
        the reports (mean ± std over seeds); empty for reports from before the field. `store(model,
        method, key)`: the summary dict that the row's cells go into."""
        rows = []
        for model in models:
            for method, key, label, read in readers:
                picked = [read(r) for r in reports[(model, method)]]
                if not any(picked):
                    continue
                row, cells = [display(model), label], store(model, method, key)
                for column in columns:
                    vals = [found.get(column) for found in picked if found]
                    row.append(cell(vals, seeds=len(picked)))
                    cells[column] = summary_of(vals)
                rows.append("| " + " | ".join(row) + " |")
        if not rows:
            return []
        return [f"| Backbone | {title} | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(columns)] + rows

    # what the meta-learners do with each support rating: MELO's learned weight, and the t statistic of the
    # query loss's gradient of more weight on it (|t| well below 2: no re-weighting by rating value to learn)
    support_ratings = sorted({k for rs in reports.values() for r in rs for k in
                              [*r.get("adaptive_weight_by_rating", {}), *r.get("query_gradient_by_rating", {})]},
                             key=rating_key)  # a support rating need not be any query target's
    by_support = support_table(
        "Per support rating", support_ratings, [f"{r} ★" for r in support_ratings],
        (("melo", "weight", "MELO's weight", lambda r: r.get("adaptive_weight_by_rating")),
         ("maml", "query_gradient_t", "MAML query-gradient t", query_gradient_t),
         ("melo", "query_gradient_t", "MELO query-gradient t", query_gradient_t)),
        lambda model, method, key: summary["by_support_rating"].setdefault(model, {}).setdefault(
            method, {}).setdefault(key, {}))
    # the same t, with each user's support positions grouped by their rating's share of that user's ratings
    by_share = support_table(
        "Share of the user's support set", SHARE_NAMES, SHARE_NAMES,
        [(method, None, f"{METHOD_NAMES[method]} query-gradient t by share",
          lambda r: query_gradient_t(r, "query_gradient_by_share")) for method in ("maml", "melo")],
        lambda model, method, key: summary["by_support_share"].setdefault(model, {}).setdefault(method, {}))

    paired = []
    if predictions is not None:
        paired = ["| Difference | " + " | ".join(f"{display(m)} RMSE | {display(m)} mean per-rating RMSE"
                                                 for m in models) + " |", "|---|" + "---:|---:|" * len(models)]
        for other in [m for m in PAIRED if m in methods(config)]:
            row = [f"MELO − {METHOD_NAMES[other]}"]
            for model in models:
                results = [paired_difference(melo, base, config.bootstrap, config.bootstrap_seed)
                           for melo, base in zip(predictions[(model, "melo")], predictions[(model, other)])]
                for key in ("rmse", "mean_per_rating_rmse"):
                    per_seed = [r[key] for r in results]
                    row.append(paired_cell(per_seed))
                    differences = [r["difference"] for r in per_seed]
                    over_seeds = metrics.seed_interval(differences)
                    summary["paired"].setdefault(model, {}).setdefault(f"melo_minus_{other}", {})[key] = {
                        **summary_of(differences), "intervals": per_seed,
                        "seed_interval": None if over_seeds is None else list(over_seeds[1:]),
                        "melo_lower": sum(d < 0 for d in differences)}
            paired.append("| " + " | ".join(row) + " |")

    beyond = beyond_biases(config, reports, predictions, validation, summary["beyond_biases"])

    counts = sorted({r["count"] for rs in reports.values() for r in rs})
    users = sorted({r["per_user"]["count"] for rs in reports.values() for r in rs if "per_user" in r})
    seeds = ("seeds " if len(config.seeds) > 1 else "seed ") + ", ".join(seed.label for seed in config.seeds)
    spread = " (mean ± standard deviation over seeds)" if len(config.seeds) > 1 else ""
    meta_args = options.parse_args(run_flags(config, config.seeds[0], START_FLAGS[config.start]))
    select_by = meta_args.select_by  # shared by every run: the START_FLAGS do not set it
    outer_loss = "the query target" if meta_args.query_loss == "target" else "every query position"
    intro = [
        f"# Comparison on {config.mode}",
        "",
        f"Data `{config.data_path}`; {seeds}{spread}; every network with the {meta_args.rating_head} rating head"
        + (f" (item biases starting at {meta_args.bias_start})" if meta_args.rating_head == "bias" else "")
        + f"; MAML / MELO: {config.iterations} iterations"
        f" from {START_DESCRIPTIONS[config.start]} (inner lr {meta_args.inner_lr:g}, outer loss on {outer_loss}; "
        f"MELO's weights {meta_args.adaptive_weights}, task state {meta_args.task_state}), tested at the last "
        f"checkpoint with the best-by-validation weights; Basic: {config.epochs} epochs, best-by-validation "
        f"weights (validation {select_by}); {'/'.join(map(str, counts))} test query windows "
        f"({'/'.join(map(str, users)) or '?'} test users) per seed, in stars. Error reduction: "
        "(other − MELO) / other, positive when MELO's error is lower.",
        "",
        f"Command: `python compare.py {' '.join(config.argv)}`",
        "",
        "## RMSE and MAE per query window",
        "",
        "Every query window counts; a test user's windows all end on the same target item.",
        "",
    ]
    text = intro + metric_table(False) + [
        "", "## RMSE and MAE per user", "",
        "Each user is scored once, on the mean of its query windows' predictions.",
        "", *metric_table(True), "", "## RMSE per rating value (per query window)", "", *per_rating]
    if by_support:
        text += ["", "## Per support rating: MELO's weight, the query loss's gradient", "",
                 "MELO's mean weight on the test users' support positions of each rating; for both meta-learners "
                 "the t statistic over the test users of the derivative of their query loss when that rating's "
                 "support positions gain weight (negative: more weight would lower it; |t| well below 2: no "
                 "consistent re-weighting by rating value to learn). Mean ± std over seeds.", "", *by_support]
        if by_share:  # (the share came with a later version of the reports)
            text += ["", "The same t with each user's support positions grouped by how common their rating is "
                     "among that user's support ratings (negative under <10%: more weight on each user's rare "
                     "ratings would help).", "", *by_share]
    if paired:
        text += ["", "## Paired differences per user, 95% bootstrap intervals", "",
                 f"MELO − other on the same test users (negative: MELO's error is lower); percentile interval of "
                 f"{config.bootstrap} resamples of the test users (seed {config.bootstrap_seed}).", "", *paired]
    text += beyond
    return "\n".join(text) + "\n", summary


def fold_in_figures(config, reports, store):
    """The table of how far the user + item bias fold-in's RMSE is from each neural method's, in percent of
    the method's (negative: the fold-in is better): the figures the real MovieLens-100K gave (issue 21;
    docs/comparison.md), to check a generator against."""
    fold_in = [r["rmse"] for r in reports[(None, FOLD_IN)]]
    header = "| Fold-in vs | " + " | ".join(display(m) for m in config.models) + " |"
    lines = ["", "### The fold-in against each method", "",
             f"{METHOD_NAMES[FOLD_IN]} RMSE against each method's, (fold-in − method) / method, mean ± std "
             "over seeds (negative: the fold-in is better):", "", header, "|---|" + "---:|" * len(config.models)]
    for method in methods(config):
        row = [method_label(config, method)]
        for model in config.models:
            own = [r["rmse"] for r in reports[(model, method)]]
            percent = [None if p is None else -p for p in reduction(fold_in, own)]
            store.setdefault("fold_in_vs_percent", {}).setdefault(model, {})[method] = summary_of(percent)
            row.append(cell(percent, percent=True, seeds=len(own)))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def beyond_biases(config, reports, predictions, validation, store):
    """The markdown section on what a network adds beyond the biases (filling `store`): each meta-learner −
    the best no-network baseline, paired per user, and each neural method's blend with the fold-in."""
    models, lines = config.models, []
    if predictions is not None:
        chosen = [best_no_network(reports, index) for index in range(len(config.seeds))]
        store["best_no_network"] = [{"seed": seed.label, "baseline": name, "validation_scores": scores}
                                    for seed, (name, scores) in zip(config.seeds, chosen)]
        select_by = reports[(None, FOLD_IN)][0]["selection"]["select_by"]
        lines += ["", "## What the network adds beyond the biases", "",
                  f"Best no-network baseline: the better of {' and '.join(METHOD_NAMES[n] for n in NO_NETWORK)} "
                  f"by validation {select_by}, per seed (its validation scores: "
                  f"{', '.join(METHOD_NAMES[n] for n in NO_NETWORK)}): " + "; ".join(
                      f"{seed.label}: {METHOD_NAMES[name]} ({', '.join(f'{v:.4f}' for v in scores.values())})"
                      for seed, (name, scores) in zip(config.seeds, chosen)) + ". Meta-learner − that baseline, "
                  f"and − {METHOD_NAMES[FOLD_IN]} in every seed, on the same test users (negative: the network's "
                  "error is lower), intervals as above.", "",
                  "| Difference | " + " | ".join(f"{display(m)} RMSE | {display(m)} mean per-rating RMSE"
                                                for m in models) + " |", "|---|" + "---:|---:|" * len(models)]
        against = [("best no-network", "best_no_network", [name for name, _ in chosen]),
                   (METHOD_NAMES[FOLD_IN], FOLD_IN, [FOLD_IN] * len(chosen))]
        for label, key_name, baselines in against:
            for method in ("maml", "melo"):
                row = [f"{METHOD_NAMES[method]} − {label}"]
                for model in models:
                    results = [paired_difference(mine, predictions[(None, name)][index], config.bootstrap,
                                                 config.bootstrap_seed)
                               for index, (mine, name) in enumerate(zip(predictions[(model, method)], baselines))]
                    for key in ("rmse", "mean_per_rating_rmse"):
                        per_seed = [r[key] for r in results]
                        row.append(paired_cell(per_seed))
                        differences = [r["difference"] for r in per_seed]
                        over_seeds = metrics.seed_interval(differences)
                        store.setdefault("paired", {}).setdefault(model, {}).setdefault(
                            f"{method}_minus_{key_name}", {})[key] = {
                            **summary_of(differences), "intervals": per_seed,
                            "seed_interval": None if over_seeds is None else list(over_seeds[1:])}
                lines.append("| " + " | ".join(row) + " |")
    lines += fold_in_figures(config, reports, store)
    if validation is not None and predictions is not None:
        rows, missing = [], False
        fold_in = [r["rmse"] for r in reports[(None, FOLD_IN)]]
        for model in models:
            for method in methods(config):  # (read_predictions holds every neural method's test targets)
                tests = zip(validation[(model, method)], validation[(None, FOLD_IN)], predictions[(model, method)],
                            predictions[(None, FOLD_IN)])
                per_seed = [None if mine is None or theirs is None else blend(mine, theirs, mine_test, their_test)
                            for mine, theirs, mine_test, their_test in tests]
                missing = missing or None in per_seed
                own = [r["rmse"] for r in reports[(model, method)]]
                blended, weights = [r and r["rmse"] for r in per_seed], [r and r["w"] for r in per_seed]
                store.setdefault("blend", {}).setdefault(model, {})[method] = {
                    "w": summary_of(weights), "rmse": summary_of(blended), "method_rmse": summary_of(own),
                    "fold_in_rmse": summary_of(fold_in), "vs_fold_in_percent": summary_of(reduction(blended, fold_in))}
                row = [display(model), f"{method_label(config, method)} + fold-in", cell(own), cell(fold_in),
                       cell(weights, seeds=len(per_seed)), cell(blended, seeds=len(per_seed)),
                       cell(reduction(blended, fold_in), percent=True)]
                rows.append("| " + " | ".join(row) + " |")
        lines += ["", f"Blend w · {METHOD_NAMES[FOLD_IN]} + (1 − w) · method, w in 0, 0.05, ..., 1 chosen by the "
                  "per-window RMSE on the validation users, scored on the test users (w = 1: the network adds "
                  "nothing the fold-in does not have; blend vs fold-in: the error reduction, positive when the "
                  "blend is better)." + (" A cell with – or n= lacks seeds whose reports predate the validation "
                                         "predictions (remove those reports to test them again)." if missing else ""),
                  "", "| Backbone | Blend | method RMSE | fold-in RMSE | w | blend RMSE | blend vs fold-in |",
                  "|---|---|---:|---:|---:|---:|---:|", *rows]
    return lines


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
    text, summary = build_tables(config, reports, read_predictions(pieces), read_validation(pieces))
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
