"""Checkpoint files: atomic writes, step listing, safe loading, and option compatibility checks.

A checkpoint holds tensors and plain Python values only, so it loads with `weights_only=True`.
It is written to a temporary file in the same folder and renamed, so a crash never leaves a broken one.
"""
import contextlib
import fcntl
import os
import pickle
import re
import sys
import tempfile
import warnings
import zipfile

import torch

from common.errors import MeloError
from common.runtime import TEMPORARY_PREFIX, write_atomic


# The "format" every checkpoint records; a change of layout raises it, so an old file is refused clearly.
CHECKPOINT_FORMAT = 1


def checkpoint_path(directory, prefix, step):
    return os.path.join(directory, f"{prefix}_step{step}.pt")


def save_atomic(state, path):
    """Write a checkpoint all at once. A failed write (a full disk, a file-size limit: OSError, or torch's
    RuntimeError from its zip writer) leaves nothing behind and is a one-line MeloError."""
    try:
        write_atomic(path, lambda out: torch.save(state, out))
    except (OSError, RuntimeError) as error:
        reason = getattr(error, "strerror", None) or (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise MeloError(f"could not write {path} ({reason}): is the disk full, or a file-size limit set? "
                        "The files saved before are intact") from None


def saved_runs(directory):
    """{run prefix: its saved steps} of the checkpoints in `directory`."""
    runs = {}
    if os.path.isdir(directory):
        for match in map(re.compile(r"(.+)_step(\d+)\.pt$").match, sorted(os.listdir(directory))):
            if match and not match.group(1).startswith("."):
                runs.setdefault(match.group(1), []).append(int(match.group(2)))
    return {prefix: sorted(steps) for prefix, steps in runs.items()}


def available_steps(directory, prefix):
    return saved_runs(directory).get(prefix, [])


def diverged(what, directory, prefix, bad_step, earlier_run, remedy):
    """The one-line error of a run stopped by a non-finite loss or score at `bad_step`: nothing is saved
    for it. The last good checkpoint is this run's latest before `bad_step`: not the bad step's own file
    (a resumed step saved before its validation, whose validation is now NaN), nor an earlier run's files
    that this one has not yet replaced (--overwrite)."""
    good = [] if earlier_run else [step for step in available_steps(directory, prefix) if step < bad_step]
    last = f"the last good checkpoint is step {good[-1]}" if good else "no checkpoint of this run was saved"
    return MeloError(f"{what}; stopped without saving step {bad_step} ({last}); try a lower {remedy}")


def check_output_folder(path, flag):
    """Create the folder `path` if needed and make sure a file can be written there: at start-up, not at
    the first save after an hour of training."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise MeloError(f"{flag}={path} is a file, not a folder: pass a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=TEMPORARY_PREFIX):
            pass
    except OSError as error:
        raise MeloError(f"{flag}={path} is not a folder MELO can write to ({error.strerror or error}): "
                        "pass another one") from None


class RunLock:
    """An exclusive lock (fcntl.flock) on `<directory>/.<prefix>.lock`, held for a training run's whole
    life, so that a second run of the same name into the same folder stops at once instead of mixing its
    step files with the first one's. The kernel releases the lock when the process ends, even on SIGKILL;
    a normal release also removes the file. Once it is held, the run's leftover temporary files (a
    SIGKILL during a save) are removed: nobody else writes them."""

    def __init__(self, directory, prefix, flag):
        self.directory, self.prefix, self.flag = directory, prefix, flag
        self.path = os.path.join(directory, f".{prefix}.lock")
        self.handle = None

    def acquire(self):
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as error:  # a file where the folder (or one above it) should be
            raise MeloError(f"cannot make the folder {self.directory} ({error.strerror or error}): pass another "
                            f"{self.flag}") from None
        while self.handle is None:
            handle = open(self.path, "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                raise MeloError(f"another {self.prefix} run is writing to {self.directory} (it holds "
                                f"{self.path}): wait until it has finished, or use another {self.flag}") from None
            except OSError as error:  # a file system without locks
                handle.close()
                raise MeloError(f"cannot lock {self.path} ({error.strerror or error}): use a {self.flag} on a "
                                "local file system") from None
            try:  # the holder may have released and removed the file between our open and flock
                current = os.path.samestat(os.fstat(handle.fileno()), os.stat(self.path))
            except FileNotFoundError:
                current = False
            if current:
                self.handle = handle
            else:
                handle.close()
        stale = f"{TEMPORARY_PREFIX}{self.prefix}_step"
        for name in os.listdir(self.directory):
            if name.startswith(stale):
                os.remove(os.path.join(self.directory, name))
        return self

    def release(self):
        if self.handle is not None:
            with contextlib.suppress(FileNotFoundError):  # while still holding it: a run that opens
                os.remove(self.path)                       # it now locks a file of its own
            self.handle.close()
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.release()
        return False


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


def claim_run(dist, lock, folders):
    """Before a training run: rank 0 checks its output folders ({flag: path}) and takes the run lock
    (under torchrun, the other ranks stop with rank 0's error instead of waiting for it)."""
    def claim():
        if dist.is_main:
            for flag, path in folders.items():
                check_output_folder(path, flag)
            lock.acquire()
    dist.main_first(claim)


def checked_log_folder(name, path):
    """The TensorBoard folder a checkpoint records is joined to --log_dir: a plain folder name only, so
    that a doctored checkpoint cannot make a run write elsewhere ('../..')."""
    if name is not None and (not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name
                             or "\\" in name):
        raise MeloError(f"{path} records the log folder {name!r}, which is not a plain folder name: a damaged "
                        "or doctored checkpoint; use another step")
    return name


def check_left_to_train(done, total, unit, flag):
    """Resuming at `done` of `total` steps (or epochs) must leave something to train."""
    if done >= total:
        raise MeloError(f"{unit} {done} already reaches {flag}={total}: nothing to train; evaluate it with "
                        f"--test, or train on with a larger {flag}")


def load_checkpoint(directory, prefix, step):
    """Load `prefix`'s checkpoint of `step`; a missing one is a MeloError listing the steps that exist."""
    path = checkpoint_path(directory, prefix, step)
    if not os.path.exists(path):
        runs = saved_runs(directory)
        if prefix in runs:
            found = f"steps saved for {prefix} in {directory}: {', '.join(map(str, runs[prefix]))}"
        elif runs:
            found = (f"{directory} holds no {prefix} run, but " + "; ".join(
                f"{name} (steps {', '.join(map(str, steps))})" for name, steps in runs.items())
                + ": pass the --model, --mode and --use_adaptive_loss (or --use_learned_loss_baseline) "
                  "of the one you mean")
        else:
            found = f"{directory} holds no checkpoints"
        raise MeloError(f"no checkpoint for step {step} at {path}; {found}")
    checkpoint = read_saved_dict(path, "checkpoint")
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise MeloError(f"{path} is not a MELO checkpoint of format {CHECKPOINT_FORMAT} (found format "
                        f"{checkpoint.get('format')!r}): use a checkpoint this version wrote")
    return checkpoint


def require_keys(saved, keys, path):
    """A checkpoint (or export) must hold every one of `keys`; else it is damaged or not MELO's."""
    missing = [key for key in keys if key not in saved]
    if missing:
        raise MeloError(f"{path} lacks {', '.join(missing)}: an incomplete or damaged file; use another step "
                        "(or retrain)")


def load_state(module, state, path, what):
    """`module.load_state_dict(state)`; keys or shapes that do not fit are a one-line MeloError."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise MeloError(f"the {what} in {path} do not fit this model ({reason}): a damaged checkpoint, or "
                        "one saved by another version") from None


def load_optimizer_moments(optimizer, state, path, keep):
    """Restore an optimizer from its saved `state` (Adam's moments and step counts) but keep the `keep`
    entries of each parameter group as they are now (load_state_dict would bring back the saved learning
    rates): a resumed run trains with the flags it is given. Returns those entries, group by group."""
    current = [{key: group[key] for key in keep} for group in optimizer.param_groups]
    load_state(optimizer, state, path, "optimizer state")
    for group, values in zip(optimizer.param_groups, current):
        group.update(values)
    return current


def check_data(saved, current, path, what="checkpoint"):
    """The data fingerprint `saved` with a checkpoint or export must be the current data's. Files saved
    before fingerprints were recorded hold none: they are used, with a warning (their shape and split
    options are still checked)."""
    if saved is None:
        print(f"warning: {what} {path} records no data fingerprint (saved by an older MELO): it cannot be "
              "checked that it was trained on this ratings file", file=sys.stderr)
    elif saved != current:
        raise MeloError(f"{what} {path} was trained on other data (data fingerprint {saved}, this data "
                        f"{current}): use the ratings file and data flags it was trained with")


def read_saved_dict(path, what):
    """`torch.load` a dict that MELO saved (a checkpoint, a pretrained export); anything else at `path` (a
    truncated, empty or foreign file) is a one-line MeloError naming it."""
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; torch.load read anything else as a
        # pickle, whose errors say nothing ('101', 'pop from empty list': a text file's bytes as opcodes)
        raise MeloError(f"cannot read {what} {path} (truncated, or not a file MELO wrote)")
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
