"""Checkpoint files: atomic writes, step listing, safe loading, and option compatibility checks.

A checkpoint holds tensors and plain Python values only, so it loads with `weights_only=True`.
It is written to a temporary file in the same folder and renamed, so a crash never leaves a broken one.
"""
import os
import pickle
import re
import warnings

import torch

from options import MeloError
from runtime import write_atomic


# The "format" every checkpoint records; a change of layout raises it, so an old file is refused clearly.
CHECKPOINT_FORMAT = 1


def checkpoint_path(directory, prefix, step):
    return os.path.join(directory, f"{prefix}_step{step}.pt")


def save_atomic(state, path):
    write_atomic(path, lambda out: torch.save(state, out))


def available_steps(directory, prefix):
    pattern = re.compile(re.escape(prefix) + r"_step(\d+)\.pt$")
    if not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for m in map(pattern.match, os.listdir(directory)) if m)


def start_fresh(directory, prefix, folder_flag, overwrite):
    """Before a fresh run: an earlier run with the same name in `directory` is refused (its checkpoints
    would be overwritten, or pruned) unless `overwrite`. Returns that earlier run's checkpoints and
    reports, for `replace_earlier_run` to delete once the new run has saved its first checkpoint, so that
    a run that fails before (bad pretrained weights, a NaN, Ctrl-C) leaves the earlier one intact."""
    steps = available_steps(directory, prefix)
    if not steps:
        return []
    if not overwrite:
        raise MeloError(f"{directory} already holds checkpoints of a {prefix} run (steps "
                        f"{', '.join(map(str, steps))}): resume it with --checkpoint_step={steps[-1]}, start "
                        f"afresh with another {folder_flag}, or replace it with --overwrite=True")
    run_file = re.compile(re.escape(prefix) + r"_step\d+\.")  # its checkpoints and their reports
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if run_file.match(name))


def replace_earlier_run(earlier_files, saved_path):
    """Delete the earlier run's files (`start_fresh`) now that `saved_path`, the new run's first
    checkpoint, is on disk; a file of the same name is the new one and stays. Returns []."""
    for path in earlier_files:
        if os.path.abspath(path) != os.path.abspath(saved_path) and os.path.exists(path):
            os.remove(path)
    return []


def check_left_to_train(done, total, unit, flag):
    """Resuming at `done` of `total` steps (or epochs) must leave something to train."""
    if done >= total:
        raise MeloError(f"{unit} {done} already reaches {flag}={total}: nothing to train; evaluate it with "
                        f"--test, or train on with a larger {flag}")


def load_checkpoint(directory, prefix, step):
    """Load `prefix`'s checkpoint of `step`; a missing one is a MeloError listing the steps that exist."""
    path = checkpoint_path(directory, prefix, step)
    if not os.path.exists(path):
        steps = available_steps(directory, prefix)
        found = ", ".join(map(str, steps)) if steps else "none"
        raise MeloError(f"no checkpoint for step {step} at {path}; steps saved for {prefix} in "
                        f"{directory}: {found}")
    checkpoint = read_saved_dict(path, "checkpoint")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise MeloError(f"{path} is not a MELO checkpoint of format {CHECKPOINT_FORMAT} (found format "
                        f"{checkpoint.get('format')!r}): use a checkpoint this version wrote")
    return checkpoint


def read_saved_dict(path, what):
    """`torch.load` a dict that MELO saved (a checkpoint, a pretrained export); anything else at `path` (a
    truncated, empty or foreign file) is a one-line MeloError naming it."""
    try:
        with warnings.catch_warnings():  # garbage can look like an unusual pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would advise weights_only=False: unsafe, and no help
        raise MeloError(f"cannot read {what} {path}: not a file MELO wrote (or a damaged one)") from None
    except Exception as error:  # torch.load raises many types (RuntimeError, EOFError, ...)
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MeloError(f"cannot read {what} {path} (truncated, or not a file MELO wrote): {reason}") from None
    if not isinstance(loaded, dict):
        raise MeloError(f"{path} is not a MELO {what} (expected a dict, got {type(loaded).__name__})")
    return loaded


def option_differences(saved, current, keys):
    """'key=saved (now current)' for each of `keys` that the `saved` options record with a value other
    than the `current` one's (a dict, e.g. vars(args)); keys `saved` lacks are not compared."""
    return [f"{key}={saved[key]!r} (now {current.get(key)!r})"
            for key in keys if key in saved and saved[key] != current.get(key)]


def check_compatible(saved, current, path):
    """Every option that shapes the saved state must equal the current one; else say which differs."""
    differing = option_differences(saved, current, sorted(saved))
    if differing:
        raise MeloError(f"checkpoint {path} was made with other settings: {', '.join(differing)}; "
                        "use the same options or another --checkpoint_dir")


def tested_weights(checkpoint, step, test_best, best_key):
    """What `--checkpoint_step=N --test` scores: (the best-so-far weights saved with step N, or None for
    step N's own weights when --test_best=False or no best was kept), and a description for the report."""
    if test_best and checkpoint[best_key] is not None:
        return checkpoint[best_key], f"best weights up to step {step} (from step {checkpoint['best_step']})"
    return None, f"weights of step {step}"
