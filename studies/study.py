"""What compare.py and ablation.py share to run a study: the recipes a meta-learner starts from, which
options are settings, which reports and checkpoints are fresh for the data as it is now, the training
and test steps a missing report needs, each step run in a child process (stopped with the study, one
study per results folder), and the mean ± std cells of the tables."""
import argparse
import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections import namedtuple

from common import runtime
from common.errors import MeloError
from evaluation import metrics
import options
from ratings.preprocess import load_data
from training import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root, where the scripts are


# How MAML and MELO start (--start), as main.py flags given to both, before the passed-through flags (which
# win). `fold-in` is the recipe chosen on real ML-1M's validation users (docs/comparison.md): random weights,
# so that with the bias head's zeroed output layer (f ≡ 0) and the user's (b_user, p_user) at their fold-in
# start the untrained meta-learner is the better fold-in (compare.py's --user_factors: the MF fold-in where
# it validates better), and the network learns only what adds to it. The user's and items' parameters stay
# at that start in the inner loop (adapting b_user un-shrank it: 1.5 % worse on ML-1M at step 0), which
# adapts the output layer alone (ANIL), its learned rates from 0 (at 0.1 SASRec's head moved 0.5 % away
# from the start before any training); the outer loss is on the held-out target; MELO's weights also fit
# the start and read each rating's recency (no-ops for MAML++); --test keeps the start unless the best
# step's validation gain over it exceeds one standard error (on a product-review-shaped set SASRec's MELO
# took a step 0.0009 better on validation and 0.013 worse on test). `basic` meta-learns from the fine-tuning
# baseline's own start, the whole Basic model, whose residual f, learned without the user, starts far from
# the fold-in. `embedding` is the original's recipe.
START_FLAGS = {"fold-in": ("--user_bias_start=fold-in", "--inner_lr=0", "--query_loss=target", "--adapt_user_bias=False",
                           "--adapt_item_bias=False", "--inner_params=head", "--weighted_start=True",
                           "--weight_recency=True", "--step_choice=one-se"),
               "basic": ("--load_pretrained=True", "--inner_lr=0.1", "--query_loss=target"),
               "embedding": ("--load_pretrained_embedding=True",),
               "random": ()}
START_DESCRIPTIONS = {"fold-in": "the fold-in (random weights, f = 0)", "basic": "the whole Basic model",
                      "embedding": "the Basic item embedding", "random": "random weights"}


# Flags compare.py sets for each run itself: not allowed among the passed-through flags.
CONTROLLED = ("mode", "data_path", "model", "random_seed", "checkpoint_dir", "pretrain_log_dir", "log_dir",
              "test", "test_best", "test_baseline", "checkpoint_step", "use_adaptive_loss",
              "num_train_iterations", "pretrain_epochs", "finetune_steps", "save_pretrained",
              "load_pretrained", "load_pretrained_embedding", "model_init_seed", "baseline",
              "finetune_steps_grid", "finetune_lr_grid", "finetune_lr")


# Options that name the result files themselves, change nothing, or change only the order of float sums
# (the thread count, the device: rounding that training can grow into small differences): left out of
# the settings record, so that a results folder can be finished on another machine. (Not --task_chunk:
# with dropout, chunks draw the masks in another order.)
NOT_SETTINGS = CONTROLLED + ("data_path_given", "data_dir", "device", "num_threads", "keep_freed_memory",
                             "overwrite")


def given_flags(extra):
    """The destinations of the main.py flags explicitly present in `extra` (argparse's own matching)."""
    parser = options.build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser.prog = "compare.py"  # as in its errors (ablation.py uses it too)
    return vars(parser.parse_args(extra))


DATA_OPTIONS = ("mode", "data_path", "data_dir", "min_item", "min_sequence", "min_sub_window_size",
                "keep_duplicates", "csv_columns")  # what load_data reads: its result's fingerprint


def data_fingerprint(args, known=None):
    """The fingerprint of the data `args` read (as main.py records it), computed once per data options
    in the dict `known`."""
    key = tuple(getattr(args, name) for name in DATA_OPTIONS)
    known = {} if known is None else known
    if key not in known:
        known[key] = load_data(args).fingerprint()
    return known[key]


def report_problem(path, fingerprint, with_predictions):
    """Why the report at `path` cannot be reused for the data of `fingerprint`, or None when it can: a
    report is fresh only when it records this data's fingerprint and (with_predictions) its per-target
    CSV is the one written with it. `fingerprint` may be a function that gives it."""
    if not os.path.exists(path):
        return f"{path} is missing"
    fingerprint = fingerprint() if callable(fingerprint) else fingerprint
    try:
        with open(path) as handle:
            report = json.load(handle)
    except (OSError, ValueError) as error:  # ValueError: JSONDecodeError, UnicodeDecodeError
        return f"{path} cannot be read (truncated or damaged: {error})"
    if not isinstance(report, dict):
        return f"{path} is not a MELO report"
    saved = report.get("data_fingerprint")
    if saved is None:
        return f"{path} records no data fingerprint (written before reports recorded one)"
    if saved != fingerprint:
        return f"{path} was made from other data (data fingerprint {saved}, this data {fingerprint})"
    if with_predictions:
        csv = metrics.predictions_path(path)
        if not os.path.exists(csv):
            return f"{csv} is missing"
        if metrics.file_sha256(csv) != report.get("predictions_sha256"):
            return f"{csv} is not the one written with {path} (truncated or replaced)"
        validation = metrics.validation_predictions_path(path)
        if "validation_predictions_sha256" in report and (not os.path.exists(validation) or metrics.file_sha256(
                validation) != report["validation_predictions_sha256"]):
            return f"{validation} is not the one written with {path} (missing, truncated or replaced)"
    return None


def read_report(path, fingerprint, with_predictions=False):
    """The report at `path`; a stale or damaged one (report_problem) is a one-line MeloError."""
    problem = report_problem(path, fingerprint, with_predictions)
    if problem:
        raise MeloError(f"{problem}: remove it, and run the same command again to make it anew")
    with open(path) as handle:
        return json.load(handle)


def checkpoint_is_stale(saved, fingerprint):
    """Was a checkpoint or export (its dict `saved`) made from other data than `fingerprint`'s (or a function
    that gives it), or before fingerprints were saved?"""
    fingerprint = fingerprint() if callable(fingerprint) else fingerprint
    return saved.get("data_fingerprint") != fingerprint


def check_schedule(saved, path, last_step):
    """Refuse a main.py checkpoint (its dict `saved`, at `path`) of a run of another
    --num_train_iterations than `last_step`: its outer learning rates were annealed over that many, so it
    is not a step of a run of `last_step`, to be tested or resumed as one (and training over it would
    lose that run). Checkpoints that record no such option (train_original.py's, whose epochs follow no
    schedule) pass."""
    total = saved.get("training_options", {}).get("num_train_iterations")
    if total is not None and total != last_step:
        raise MeloError(f"{path} is from a run of {total} iterations, not {last_step} (its learning rates were "
                        f"annealed over {total}): use another --results_dir, or remove that run's checkpoints")


def usable_checkpoint(path, fingerprint, last_step):
    """The dict of the checkpoint at `path`, to be tested or resumed in a run of `last_step` iterations;
    None when it was made from other data (a fresh run goes over it). One of a run of another length is
    refused (check_schedule)."""
    saved = checkpointing.read_saved_dict(path, "checkpoint")
    if checkpoint_is_stale(saved, fingerprint):
        return None
    check_schedule(saved, path, last_step)
    return saved


def remake(piece_name, report, problem):
    """Say why a report that exists is made again (its `problem`: report_problem's, which may name its CSV)."""
    if os.path.exists(report):
        print(f"{piece_name}: {problem}: making it again", flush=True)


def training_need(script, flags, directory, prefix, last_step, fingerprint):
    """The training step a test of `last_step` needs first: none when its checkpoint exists, was made from
    this data by a run of `last_step` iterations (check_schedule) and finished its validation; resuming
    it when it was stopped before that validation (its best weights would miss that step); a fresh run
    over a stale one (--overwrite=True); else training_step."""
    final = checkpointing.checkpoint_path(directory, prefix, last_step)
    if not os.path.exists(final):
        return training_step(script, flags, directory, prefix, last_step, fingerprint)
    saved = usable_checkpoint(final, fingerprint, last_step)
    if saved is None:
        print(f"    {final} was trained on other data: training it again", flush=True)
        return ("train", script, flags + ["--overwrite=True"])
    if saved.get("pending_validation"):
        print(f"    {final} was saved before its validation finished: resuming it to validate it", flush=True)
        return ("train", script, flags + [f"--checkpoint_step={last_step}"])
    return None


def training_step(script, flags, directory, prefix, last_step, fingerprint=None):
    """The step that makes a missing final checkpoint: a fresh run, or, after an interrupted one, resuming
    from the last checkpoint it saved (exactly as if it had never stopped), unless that checkpoint was
    made from other data than `fingerprint`'s: then a fresh run over it. One of a run of another length
    is refused (check_schedule)."""
    earlier = [step for step in checkpointing.available_steps(directory, prefix) if step < last_step]
    if earlier and fingerprint is not None and usable_checkpoint(
            checkpointing.checkpoint_path(directory, prefix, earlier[-1]), fingerprint, last_step) is None:
        return ("train", script, flags + ["--overwrite=True"])
    return ("train", script, flags + ([f"--checkpoint_step={earlier[-1]}"] if earlier else []))


def run_script(script, argv, log_path, verbose):
    """Run `python <script> argv` in a fresh process from the current folder; its output goes to
    `log_path` (or the terminal with --verbose). Returns the exit status. A SIGTERM or Ctrl-C meanwhile is
    forwarded to it, and once it has saved and exited, raised here (runtime.run_child)."""
    command = [sys.executable, os.path.join(REPO, script), *argv]
    keep = [lock.handle.fileno() for lock in HELD if lock.handle is not None]
    if verbose:
        status, stopped = runtime.run_child(command, keep_fds=keep)
    else:
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            log.write(" ".join(command) + "\n")
            log.flush()
            status, stopped = runtime.run_child(command, log, keep_fds=keep)
    if stopped is not None:
        raise runtime.stop_by(stopped)
    return status


# One run of a study: `what` it is (for the progress line), where its log goes, and `python script argv`;
# `failure` names it in an error, `before` (or None) is called just before it starts.
Step = namedtuple("Step", "what label log_path script argv failure before")


def run_steps(steps, dry_run, verbose):
    """Run the steps in order, each in a fresh process (run_script), with a progress line each; a failed
    one stops the study with its log's error line. With `dry_run`, print the commands instead."""
    for number, step in enumerate(steps, 1):
        what = f"[{number}/{len(steps)}] {step.what}"
        if dry_run:
            print(f"{what}\n    python {step.script} {' '.join(step.argv)}")
            continue
        print(f"{what} ..." + ("" if verbose else f" (log: {step.log_path})"), flush=True)
        if step.before is not None:
            step.before()
        start = time.time()
        status = run_script(step.script, step.argv, step.log_path, verbose)
        if status != 0:
            detail = "" if verbose else f": {failure_line(step.log_path)} (full log: {step.log_path})"
            raise MeloError(f"{step.failure} ({step.label}: python {step.script}) failed with exit status "
                            f"{status}{detail}")
        print(f"    done in {time.time() - start:.0f} s", flush=True)


# The results folder's lock (lock_results), inherited by every child: a second compare.py is refused for
# as long as a child of this one lives, even one still saving after this process was SIGKILLed.
HELD = []


@contextlib.contextmanager
def lock_results(folder, script):
    """One study at a time per results folder: a second `script` (compare, ablation) into `folder` stops
    at once with one line, before it reads or truncates anything there."""
    lock = checkpointing.RunLock(folder, script, "--results_dir")
    with lock:
        lock.acquire()
        HELD.append(lock)
        try:
            yield lock
        finally:
            HELD.remove(lock)


def failure_line(path):
    """What to quote of a failed run's log: its last `error: ...` line (a lock refusal, a bad flag), not
    whatever it printed after (a progress line), else its last line (a traceback's exception)."""
    try:
        with open(path, errors="replace") as handle:
            lines = [line.strip() for line in handle.read().replace("\r", "\n").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if line.startswith("error:")]
    return errors[-1] if errors else lines[-1] if lines else "(no output)"


def stopped_line(error, script, argv):
    """The one line of a study stopped by SIGTERM or Ctrl-C, and its exit status."""
    what, status = runtime.interruption(error)
    return (f"{what}: the running step saved what it had, finished runs are kept; resume with: python {script} "
            f"{shlex.join(argv)}"), status


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
