"""The comparison table in one command: Basic, MAML and MELO per backbone, plus the mean rating.

    python compare.py --mode=ml-100k --data_path=./Data/ml-100k/u.data --models=bert4rec,sasrec,gru4rec,narm
    python compare.py --mode=ml-100k --num_train_iterations=200 --pretrain_epochs=10 --seeds=3 \\
        --num_test_data=100 --max_seq_len=20            # any other main.py flag is passed to every run

For each seed and backbone it runs, each in a fresh process (`python main.py ...`,
`python train_original.py ...`), with the same data flags and seed:

* Basic: `train_original.py` for `--pretrain_epochs` epochs, then `--checkpoint_step=<epochs> --test`;
* Fine-tune (only with `--finetune_steps=K`): the Basic checkpoint tested with K SGD steps per test user;
* MAML (`--use_adaptive_loss=False`) and MELO: `main.py` for `--num_train_iterations` iterations, then
  `--checkpoint_step=<iterations> --test` (the last checkpoint, holding the best-by-validation weights);
* once per seed, the training users' mean rating (`main.py --test_baseline`).

Every run of seed s lives in `<results_dir>/<mode>/seed<s>/` (checkpoints/, pretrained/, runs/, logs/),
and every number comes from the JSON reports there: a run whose report exists is not repeated, a
finished training run is only tested. The settings shared by all runs are recorded in
`<results_dir>/<mode>/settings.json`; results made with other settings are refused rather than mixed in
(use another `--results_dir`). The tables (RMSE and MAE per backbone x method, MELO's error reduction
over Basic and over MAML, per-rating RMSE; mean +- standard deviation over seeds when `--seeds` > 1) are
printed and saved as `<results_dir>/<mode>/comparison.md` (and `comparison.json`).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import checkpointing
import main as meta_main
from dataloader import MetaDataset, load_data
import metrics
import options
import train_original
from options import MeloError

REPO = os.path.dirname(os.path.abspath(__file__))
DISPLAY = {"bert4rec": "BERT4Rec", "sasrec": "SASRec", "gru4rec": "GRU4Rec", "narm": "NARM"}
METHOD_NAMES = {"mean": "Mean rating", "basic": "Basic", "finetune": "Fine-tune", "maml": "MAML", "melo": "MELO"}
# Flags compare.py sets for each run itself: not allowed among the passed-through flags.
CONTROLLED = ("mode", "data_path", "model", "random_seed", "checkpoint_dir", "pretrain_log_dir", "log_dir",
              "test", "test_best", "test_baseline", "checkpoint_step", "use_adaptive_loss",
              "num_train_iterations", "pretrain_epochs", "finetune_steps", "save_pretrained",
              "load_pretrained", "load_pretrained_embedding")
# Options that do not change any result, or that name the result files themselves: left out of the
# settings record, so changing them never makes old results look foreign. (Not --task_chunk: with
# dropout, chunks draw the masks in another order.)
NOT_SETTINGS = CONTROLLED + ("data_path_given", "data_dir", "device", "num_threads", "keep_freed_memory",
                             "finetune_lr", "overwrite")


def build_parser():
    parser = options.CommandLineParser(
        description="Run (or reuse) Basic, MAML and MELO for each backbone plus the mean-rating baseline, "
                    "and print the comparison table. Flags not listed here are main.py's (see python "
                    "main.py --help) and are passed to every run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--mode", default="ml-1m", choices=options.MODES, help="data set")
    add("--data_path", default=None, help="ratings file (default: the mode's default location)")
    add("--models", default=",".join(options.MODELS), help="comma-separated backbones")
    add("--seeds", type=options.positive_int, default=1,
        help="number of seeds: --random_seed, --random_seed + 1, ...; >1 reports mean +- std")
    add("--random_seed", type=int, default=222, help="first seed")
    add("--num_train_iterations", type=options.positive_int, default=2000, help="main.py outer iterations")
    add("--pretrain_epochs", type=options.positive_int, default=100, help="train_original.py epochs")
    add("--finetune_steps", type=options.non_negative_int, default=0,
        help="also report the Basic model fine-tuned with this many SGD steps per test user (0 = no row)")
    add("--results_dir", default="./results", help="root of every run's files and of the table")
    add("--dry_run", action="store_true", help="print the commands that would run, run nothing")
    add("--verbose", action="store_true", help="show the runs' output instead of writing it to logs/")
    return parser


# ============================================================================ configuration
@dataclass
class Config:
    mode: str
    data_path: str
    models: list
    seeds: list
    iterations: int
    epochs: int
    finetune_steps: int
    root: str               # <results_dir>/<mode>
    extra: list             # passed-through main.py flags
    dry_run: bool = False
    verbose: bool = False
    learned_loss_baseline: bool = False
    argv: list = field(default_factory=list)


def given_flags(extra):
    """The destinations of the main.py flags explicitly present in `extra` (argparse's own matching)."""
    parser = options.build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser.prog = "compare.py"
    return vars(parser.parse_args(extra))


def parse(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    known, extra = build_parser().parse_known_args(argv)
    controlled = sorted(set(given_flags(extra)) & set(CONTROLLED))
    if controlled:
        raise MeloError(f"compare.py sets {', '.join('--' + c for c in controlled)} for each run itself; "
                        "leave them out (its own flags: python compare.py --help)")
    models = [m.strip() for m in known.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in options.MODELS]
    if unknown or not models:
        raise MeloError(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(options.MODELS)}")
    defaults = options.parse_args([f"--mode={known.mode}", *extra])
    data_path = known.data_path if known.data_path is not None else defaults.data_path
    return Config(mode=known.mode, data_path=data_path, models=list(dict.fromkeys(models)),
                  seeds=[known.random_seed + k for k in range(known.seeds)],
                  iterations=known.num_train_iterations, epochs=known.pretrain_epochs,
                  finetune_steps=known.finetune_steps, root=os.path.join(known.results_dir, known.mode),
                  extra=extra, dry_run=known.dry_run, verbose=known.verbose, argv=argv,
                  learned_loss_baseline=defaults.use_learned_loss_baseline)


def seed_dir(config, seed):
    return os.path.join(config.root, f"seed{seed}")


def run_flags(config, seed):
    """The flags every run of `seed` shares (data, seed, folders, passed-through flags)."""
    folder = seed_dir(config, seed)
    return [f"--mode={config.mode}", f"--data_path={config.data_path}", f"--random_seed={seed}",
            f"--checkpoint_dir={os.path.join(folder, 'checkpoints')}",
            f"--pretrain_log_dir={os.path.join(folder, 'pretrained')}",
            f"--log_dir={os.path.join(folder, 'runs')}", *config.extra]


def settings_of(config):
    args = options.parse_args(run_flags(config, config.seeds[0]))
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_SETTINGS}
    settings["data_path"] = os.path.abspath(config.data_path)
    settings["mode"] = config.mode
    return settings


def check_settings(config):
    """Refuse a results folder made with other shared settings; return the current ones."""
    current = settings_of(config)
    path = os.path.join(config.root, "settings.json")
    if os.path.exists(path):
        with open(path) as handle:
            saved = json.load(handle)
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
    seed: int
    model: str              # None for the mean rating
    method: str             # mean, basic, finetune, maml, melo
    report: str             # the JSON report it reads
    steps: list             # (label, script, argv) still to run, in order

    @property
    def name(self):
        what = f"{self.model} {METHOD_NAMES[self.method]}" if self.model else "mean rating"
        return f"seed {self.seed} {what}"


def plan(config):
    """Every piece, with the runs each still needs (none when its report exists)."""
    pieces = []
    for seed in config.seeds:
        shared = run_flags(config, seed)
        args = options.parse_args(shared)
        mean_report = os.path.join(args.checkpoint_dir, f"mean-rating_{config.mode}.test.json")
        pieces.append(Piece(seed, None, "mean", mean_report, [("test", "main.py", shared + ["--test_baseline"])]))
        for model in config.models:
            pieces += [basic_piece(config, seed, shared, model, 0)]
            if config.finetune_steps:
                pieces.append(basic_piece(config, seed, shared, model, config.finetune_steps))
            for method, adaptive in (("maml", "False"), ("melo", "True")):
                pieces.append(meta_piece(config, seed, shared, model, method, adaptive))
    for piece in pieces:
        if os.path.exists(piece.report):
            piece.steps = []
    return pieces


def basic_piece(config, seed, shared, model, finetune_steps):
    """Basic (finetune_steps=0: trains if its last checkpoint is missing, then tests) or Fine-tune (tests
    the Basic checkpoint, which the Basic piece before it trains)."""
    flags = shared + [f"--model={model}", f"--pretrain_epochs={config.epochs}"]
    args = options.parse_args(flags + [f"--finetune_steps={finetune_steps}"])
    steps = [("test", "train_original.py",
              flags + [f"--checkpoint_step={config.epochs}", "--test", f"--finetune_steps={finetune_steps}"])]
    prefix = train_original.run_prefix(args)
    checkpoint = checkpointing.checkpoint_path(args.pretrain_log_dir, prefix, config.epochs)
    if not finetune_steps and not os.path.exists(checkpoint):
        steps.insert(0, training_step("train_original.py", flags, args.pretrain_log_dir, prefix, config.epochs))
    method = "finetune" if finetune_steps else "basic"
    return Piece(seed, model, method, train_original.report_path(args, config.epochs), steps)


def meta_piece(config, seed, shared, model, method, adaptive):
    flags = shared + [f"--model={model}", f"--use_adaptive_loss={adaptive}",
                      f"--num_train_iterations={config.iterations}"]
    args = options.parse_args(flags)
    prefix = meta_main.run_prefix(args)
    steps = [("test", "main.py", flags + [f"--checkpoint_step={config.iterations}", "--test"])]
    if not os.path.exists(checkpointing.checkpoint_path(args.checkpoint_dir, prefix, config.iterations)):
        steps.insert(0, training_step("main.py", flags, args.checkpoint_dir, prefix, config.iterations))
    return Piece(seed, model, method, meta_main.report_path(args, prefix, config.iterations), steps)


def training_step(script, flags, directory, prefix, last_step):
    """The step that makes a missing final checkpoint: a fresh run, or, after an interrupted one, resuming
    from the last checkpoint it saved (exactly as if it had never stopped)."""
    earlier = [step for step in checkpointing.available_steps(directory, prefix) if step < last_step]
    return ("train", script, flags + ([f"--checkpoint_step={earlier[-1]}"] if earlier else []))


def run_script(script, argv, log_path, verbose):
    """Run `python <script> argv` in a fresh process from the current folder; its output goes to
    `log_path` (or the terminal with --verbose). Returns the exit status."""
    command = [sys.executable, os.path.join(REPO, script), *argv]
    if verbose:
        return subprocess.run(command).returncode
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode


def last_line(path):
    try:
        with open(path, errors="replace") as handle:
            lines = [line.strip() for line in handle.read().replace("\r", "\n").splitlines() if line.strip()]
        return lines[-1] if lines else "(no output)"
    except OSError:
        return "(no log)"


def execute(config, pieces):
    todo = [(piece, step) for piece in pieces for step in piece.steps]
    for number, (piece, (label, script, argv)) in enumerate(todo, 1):
        what = f"[{number}/{len(todo)}] {piece.name}: {label}"
        log_path = os.path.join(seed_dir(config, piece.seed), "logs",
                                f"{piece.model}_{piece.method}_{label}.log" if piece.model else "mean-rating.log")
        if config.dry_run:
            print(f"{what}\n    python {script} {' '.join(argv)}")
            continue
        print(f"{what} ..." + ("" if config.verbose else f" (log: {log_path})"), flush=True)
        start = time.time()
        status = run_script(script, argv, log_path, config.verbose)
        if status != 0:
            detail = "" if config.verbose else f": {last_line(log_path)} (full log: {log_path})"
            raise MeloError(f"{piece.name} ({label}: python {script}) failed with exit status {status}{detail}")
        print(f"    done in {time.time() - start:.0f} s", flush=True)
    if config.dry_run:
        return
    missing = [piece.report for piece in pieces if not os.path.exists(piece.report)]
    if missing:
        raise MeloError(f"expected reports are missing after the runs: {', '.join(missing)}")


# ============================================================================ the tables
def read_reports(pieces):
    """{(model or None, method): [report per seed in seed order]}."""
    found = {}
    for piece in pieces:
        with open(piece.report) as handle:
            found.setdefault((piece.model, piece.method), []).append(json.load(handle))
    return found


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def cell(values, percent=False, seeds=None):
    """Mean (± sample standard deviation over seeds); `(n=k)` when only k of `seeds` seeds have a value."""
    mean, std = mean_std(values)
    if mean is None:
        return "–"
    text = f"{mean:+.2f}%" if percent else f"{mean:.4f}"
    if std is not None:
        text += f" ± {std:.2f}%" if percent else f" ± {std:.4f}"
    count = sum(v is not None for v in values)
    if seeds is not None and count < seeds:
        text += f" (n={count})"
    return text


def reduction(better, baseline):
    """Per seed, how much lower `better`'s error is than `baseline`'s, in percent of the baseline's."""
    return [100.0 * (b - a) / b if b else None for a, b in zip(better, baseline)]


def rating_key(text):
    return float(text)


def methods(config):
    return ["basic"] + (["finetune"] if config.finetune_steps else []) + ["maml", "melo"]


def method_label(config, method):
    if method == "finetune":
        return f"Fine-tune ({config.finetune_steps} steps)"
    if method == "basic" and config.learned_loss_baseline:
        return "Basic (learned loss)"
    return METHOD_NAMES[method]


def build_tables(config, reports):
    """The markdown text and a JSON-ready summary of every cell (per-seed values and their mean / std)."""
    models = config.models

    def values(model, method, key):
        return [r[key] for r in reports[(None if method == "mean" else model, method)]]

    header = "| Method | " + " | ".join(f"{DISPLAY[m]} RMSE | {DISPLAY[m]} MAE" for m in models) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(models)]
    summary = {"rmse_mae": {}, "per_rating_rmse": {}, "improvement_percent": {}}
    for method in ["mean"] + methods(config):
        row = [method_label(config, method)]
        for model in models:
            for key in ("rmse", "mae"):
                vals = values(model, method, key)
                row.append(cell(vals))
                summary["rmse_mae"].setdefault(model, {}).setdefault(method, {})[key] = {
                    "per_seed": vals, "mean": mean_std(vals)[0], "std": mean_std(vals)[1]}
        lines.append("| " + " | ".join(row) + " |")
    for other in ("basic", "maml"):
        row = [f"MELO vs {METHOD_NAMES[other]} (error reduction)"]
        for model in models:
            for key in ("rmse", "mae"):
                vals = reduction(values(model, "melo", key), values(model, other, key))
                row.append(cell(vals, percent=True))
                summary["improvement_percent"].setdefault(model, {}).setdefault(f"vs_{other}", {})[key] = {
                    "per_seed": vals, "mean": mean_std(vals)[0], "std": mean_std(vals)[1]}
        lines.append("| " + " | ".join(row) + " |")

    ratings = sorted({k for rs in reports.values() for r in rs for k in r["per_rating"]}, key=rating_key)
    per_rating = ["| Backbone | Method | " + " | ".join(f"{r} ★" for r in ratings) + " | mean of per-rating |",
                  "|---|---|" + "---:|" * (len(ratings) + 1)]

    def per_rating_row(backbone, model, method):
        picked = reports[(model, method)]
        row = [backbone, method_label(config, method)]
        for rating in ratings:
            vals = [r["per_rating"][rating]["rmse"] for r in picked if rating in r["per_rating"]]
            row.append(cell(vals, seeds=len(picked)))
            summary["per_rating_rmse"].setdefault(model or "all", {}).setdefault(method, {})[rating] = {
                "per_seed": vals, "mean": mean_std(vals)[0], "std": mean_std(vals)[1]}
        vals = [r["mean_per_rating_rmse"] for r in picked]
        row.append(cell(vals))
        summary["per_rating_rmse"][model or "all"][method]["mean_per_rating_rmse"] = {
            "per_seed": vals, "mean": mean_std(vals)[0], "std": mean_std(vals)[1]}
        per_rating.append("| " + " | ".join(row) + " |")

    per_rating_row("all", None, "mean")
    for model in models:
        for method in methods(config):
            per_rating_row(DISPLAY[model], model, method)

    counts = sorted({r["count"] for rs in reports.values() for r in rs})
    seeds = ", ".join(map(str, config.seeds))
    spread = " (mean ± standard deviation over seeds)" if len(config.seeds) > 1 else ""
    intro = [
        f"# Comparison on {config.mode}",
        "",
        f"Data `{config.data_path}`; seeds {seeds}{spread}; MAML / MELO: {config.iterations} iterations, "
        f"tested at the last checkpoint with the best-by-validation weights; Basic: {config.epochs} epochs, "
        f"best-by-validation weights; {'/'.join(map(str, counts))} test targets per seed, in stars. "
        "Error reduction: (other − MELO) / other, positive when MELO's error is lower.",
        "",
        f"Command: `python compare.py {' '.join(config.argv)}`",
        "",
        "## RMSE and MAE",
        "",
    ]
    text = "\n".join(intro + lines + ["", "## RMSE per rating value", ""] + per_rating) + "\n"
    return text, summary


def main(argv=None):
    config = parse(argv)
    pieces = plan(config)
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
        execute(config, pieces)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept and reused by the next compare.py", file=sys.stderr)
        raise SystemExit(130)
    if config.dry_run:
        return None
    reports = read_reports(pieces)
    text, summary = build_tables(config, reports)
    print()
    print(text)
    path = os.path.join(config.root, "comparison.md")
    os.makedirs(config.root, exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    metrics.write_json_atomic({"settings": settings, "seeds": config.seeds, "models": config.models,
                               "iterations": config.iterations, "epochs": config.epochs,
                               "finetune_steps": config.finetune_steps,
                               "reports": {p.name: p.report for p in pieces}, "cells": summary},
                              os.path.join(config.root, "comparison.json"))
    print(f"table written to {path}")
    return text, summary


def cli(argv=None):
    try:
        main(argv)
    except MeloError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
