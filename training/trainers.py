"""The run skeleton that main.py's MetaTrainer and train_original.py's BaselineTrainer share.

`Trainer` holds what every training run has: the data and its user split, the checkpoint's shape
options and data fingerprint, the step counter, the best-so-far weights, saving and loading a checkpoint
(with every check a resume or a test needs), and the one-line error of a run whose loss diverged.
`train_run(trainer)` is the sequence around training: the run lock, resume or a fresh start, the
TensorBoard writer, stop signals as a flag, and the writer closed whatever happens.

A subclass says what it trains and how: `prefix`, `shape`, its checkpoint folder (`directory`, named
by `folder_flag`), the extra checkpoint entries (`extra_state` / `restore`), one `train(writer)`, and
the hooks `fresh_start`, `check_resume` and `finish`.
"""
import functools
import sys

import numpy as np

from common.errors import MeloError
from common.runtime import LostPeer, stop_signals_as_flag
from evaluation import baselines, metrics
from ratings.preprocess import load_data
from ratings.tasks import MetaDataset
from training import checkpointing, runs


class Trainer:
    folder_flag = "--checkpoint_dir"  # the flag of `directory`, for messages
    unit = "step"                     # what `step` counts: "step" (outer iterations) or "epoch"
    total_flag = "--num_train_iterations"
    remedy = "--inner_lr, --outer_lr or --lstm_lr"  # what to lower when the run diverges
    required = ()                     # checkpoint keys of the subclass's own entries
    best_key = None                   # the checkpoint key of the best-so-far weights

    def __init__(self, args, dist):
        self.args, self.dist, self.device = args, dist, dist.device
        self.data = dist.main_first(load_data, args)
        self.dataset = MetaDataset.from_args(self.data, args)
        self.fingerprint = self.data.fingerprint()
        self.step = 0
        self.best = {"rmse": float("inf"), "step": None, "state": None}
        self.earlier_run = []  # an earlier run's files that this one replaces (--overwrite)
        self.log_folder = None  # the run's TensorBoard folder under --log_dir (runs.open_writer)
        self.warned_diverging = False

    @functools.cached_property
    def training_ratings(self):
        """Every rating of the training users (stars)."""
        return np.concatenate([self.data.sequence(u)[1] for u in self.dataset.train_users])

    @functools.cached_property
    def rating_range(self):
        """(lowest, highest) rating of the training users: every network's evaluated predictions are
        clipped to it, as the baselines' are (baselines.Fitted), so no method gains from clipping alone."""
        return float(self.training_ratings.min()), float(self.training_ratings.max())

    def clipped(self, predicted):
        return predicted.clamp(*self.rating_range)

    @property
    def directory(self):
        """The checkpoint folder, the value of `folder_flag`."""
        return getattr(self.args, self.folder_flag[2:])

    @property
    def total(self):
        """How many steps the run trains, the value of `total_flag`."""
        return getattr(self.args, self.total_flag[2:])

    # ------------------------------------------------------------------ the subclass's part
    def validation_stars(self, tasks):
        """Predicted stars [T, Q] of `tasks`' query targets by the tested weights as they are (no
        fine-tuning): what --step_choice=one-se compares."""
        raise NotImplementedError

    @property
    def tested_module(self):
        """The module whose weights the checkpoints hold and --test scores."""
        raise NotImplementedError

    @property
    def backbone(self):
        """The backbone inside `tested_module` (the meta-learner's, or the module itself)."""
        return getattr(self.tested_module, "backbone", self.tested_module)

    def extra_state(self):
        """The subclass's checkpoint entries (weights, optimizer, the best weights, ...)."""
        raise NotImplementedError

    def restore(self, checkpoint, path, restore_training):
        """Load the subclass's entries of `checkpoint` (read from `path`; `step` is already set) and
        `best`; with `restore_training` its training state too."""
        raise NotImplementedError

    def train(self, writer):
        raise NotImplementedError

    def start_head(self):
        """The bias rating head's start from the data (μ, the item biases and factors, the fold-in's λs;
        baselines.start_bias_head): before a fresh run trains, and on loading a checkpoint from before the
        λs were saved in it. A checkpoint holds the rest, so a test or resume skips the fold-in searches.
        A subclass calls it once its model is built, unless --checkpoint_step names a checkpoint to load."""
        self.start_head_of(self.backbone)

    def start_head_of(self, backbone):
        """`backbone`'s rating head started from this run's data and flags (`start_head`'s work)."""
        baselines.start_bias_head(backbone, self.data, self.dataset, self.args)

    def fresh_start(self):
        """Before a fresh (not resumed) run trains."""

    def check_resume(self):
        """A resumed run must leave something to train."""
        checkpointing.check_left_to_train(self.step, self.total, self.unit, self.total_flag)

    def finish(self, writer):
        """After training, before the writer closes (rank 0 has the writer; the others get None)."""

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_path(self, step):
        return checkpointing.checkpoint_path(self.directory, self.prefix, step)

    def state(self):
        return {"format": checkpointing.CHECKPOINT_FORMAT, "step": self.step, "log_folder": self.log_folder,
                "data_fingerprint": self.fingerprint, "shape_options": self.shape, **self.extra_state(),
                # λ of b_user's fold-in start, chosen on the validation tasks at the run's start: kept, so a
                # test or resume under other --val_size / window flags starts b_user as the run trained it
                **self.backbone.rating_head.start_settings(),
                "best_rmse": self.best["rmse"], "best_step": self.best["step"]}

    def save(self):
        """This step's checkpoint (rank 0 only; the others return None); an earlier run's files it replaces
        go once it is written."""
        if not self.dist.is_main:
            return None
        path = self.checkpoint_path(self.step)
        checkpointing.save_atomic(self.state(), path)
        self.earlier_run = checkpointing.replace_earlier_run(self.earlier_run, path)
        return path

    def load(self, step, restore_training):
        """The checkpoint of `step`, checked (the same shape options and data) and loaded; with
        `restore_training` the training state too, to resume."""
        checkpoint = checkpointing.load_checkpoint(self.directory, self.prefix, step)
        path = self.checkpoint_path(step)
        if "user_bias_reg" not in checkpoint:  # from before the start's λs were saved: chosen now
            self.start_head()
        checkpointing.require_keys(checkpoint, ("step", "shape_options", "best_rmse", "best_step", *self.required),
                                   path)
        checkpointing.check_compatible(runs.saved_shape(checkpoint["shape_options"], self.shape), self.shape, path)
        checkpointing.check_data(checkpoint.get("data_fingerprint"), self.fingerprint, path)
        self.step = checkpoint["step"]
        self.log_folder = checkpointing.checked_log_folder(checkpoint.get("log_folder"), path)
        self.restore(checkpoint, path, restore_training)
        # (checkpoints from before the settings were saved keep the ones chosen now)
        self.backbone.rating_head.load_start_settings(checkpoint)
        return checkpoint

    def load_tested(self):
        """For --test: the checkpoint of --checkpoint_step, and the weights it says to score (with
        --test_best the best so far saved with it) loaded into `tested_module`; (checkpoint, a description
        of those weights for the report, whether they are the best-so-far weights)."""
        step = self.args.checkpoint_step
        checkpoint = self.load(step, restore_training=False)
        best, which = checkpointing.tested_weights(checkpoint, step, self.args.test_best, self.best_key)
        if best is not None:
            checkpointing.load_state(self.tested_module, best, self.checkpoint_path(step), "best weights")
            if self.args.step_choice == "one-se" and checkpoint["best_step"]:
                checkpoint, which = self.start_unless_resolved(checkpoint, which)
        return checkpoint, which, best is not None

    def start_unless_resolved(self, checkpoint, which):
        """--step_choice=one-se: the best step's weights (loaded) stay only if their validation --select_by
        beats the start's (step 0, the untrained network: the fold-in under the fold-in start) by more than
        one standard error of the paired per-user difference; else the start's weights are loaded. A best
        step picked among many by a gain within the noise of the validation users is as likely to lose on
        test as to win (docs/comparison.md). (checkpoint, which): with the start, the checkpoint's best_step
        and best_report are the start's."""
        path = self.checkpoint_path(0)
        start = checkpointing.load_checkpoint(self.directory, self.prefix, 0)
        if start.get("best_step") != 0 or start.get(self.best_key) is None:
            raise MeloError(f"--step_choice=one-se compares the best step with the start, but {path} holds no "
                            f"validated start; test with --step_choice=minimum")
        tasks = self.dataset.val_tasks()
        best_stars = self.validation_stars(tasks)
        best_state = state_copy(self.tested_module)
        checkpointing.load_state(self.tested_module, start[self.best_key], path, "start's weights")
        start_stars = self.validation_stars(tasks)
        frame = functools.partial(metrics.prediction_frame, tasks, data=self.data)
        gain = metrics.paired_gain(frame(predicted_stars=best_stars), frame(predicted_stars=start_stars),
                                   self.args.select_by)
        said = (f"step {checkpoint['best_step']}'s validation {self.args.select_by} {gain['difference']:+.4f} "
                f"against the start, one standard error {gain['standard_error']:.4f}")
        if gain["resolved"]:
            checkpointing.load_state(self.tested_module, best_state, self.checkpoint_path(checkpoint["step"]),
                                     "best weights")
            return checkpoint, f"{which}; {said}"
        start_report = metrics.task_report(start_stars, tasks, self.data.max_rating)
        return ({**checkpoint, "best_step": 0, "best_report": start_report},
                f"the start's weights (step 0): {said}, within it (--step_choice=one-se)")

    def mean_rating_rmse(self, tasks):
        """The RMSE (per window) on `tasks` of predicting the training users' mean rating for everyone
        (computed each time: one pass over a few thousand targets, at validation steps only)."""
        mean = self.training_mean_rating
        targets = tasks.query_ratings[..., -1][tasks.query_mask].double()
        return float(((targets - mean) ** 2).mean().sqrt())

    @functools.cached_property
    def training_mean_rating(self):
        return float(self.training_ratings.mean())

    def warn_if_diverging(self, report, tasks):
        """Say once, in a line on stderr, when `report` (this step's validation on `tasks`, before it is
        compared with the best so far) shows the run diverging; a validation RMSE of 2.9e12 at
        --inner_lr=10000 went by without a word. Diverging: an RMSE above that of predicting the training
        users' mean rating for everyone (clipped predictions cannot blow up, but they can be worse than
        knowing nothing of the user), or a score more than twice the best so far (the start, step 0, among
        them). Such a step is not the best while an earlier one scored lower; the run goes on."""
        if self.warned_diverging:
            return
        name = {"rmse": "RMSE", "mean_per_rating_rmse": "mean per-rating RMSE"}[self.args.select_by]
        score, best, best_step = report[self.args.select_by], self.best["rmse"], self.best["step"]
        knowing_nothing = self.mean_rating_rmse(tasks)
        if report["rmse"] > knowing_nothing:
            why = (f"RMSE {report['rmse']:.4g} is worse than predicting the training users' mean rating "
                   f"({knowing_nothing:.4f})")
        elif score > 2 * best:
            why = f"{name} {score:.4g} is more than twice the best so far ({best:.4f} at {self.unit} {best_step})"
        else:
            return
        self.warned_diverging = True
        kept = "" if best_step is None else f"; the best weights stay those of {self.unit} {best_step}"
        print(f"warning: the run diverges: at {self.unit} {self.step} the validation {why}{kept}; try a lower "
              f"{self.remedy}", file=sys.stderr)

    def resume_hint(self):
        """How to go on after a stop that saved nothing: from this run's latest checkpoint (not an earlier
        run's, which a fresh --overwrite run has not replaced yet)."""
        steps = [] if self.earlier_run else checkpointing.available_steps(self.directory, self.prefix)
        return (f"resume with --checkpoint_step={steps[-1]}" if steps
                else "no checkpoint of this run was saved: run it again")

    def diverged(self, what, bad_step):
        """The error that stops a run whose loss or validation score is no longer finite; nothing is saved."""
        return checkpointing.diverged(what, self.directory, self.prefix, bad_step, self.earlier_run, self.remedy)


def step_alias():
    """A subclass's own name for `step` (main.py's `iteration`, train_original.py's `epoch`)."""
    return property(lambda self: self.step, lambda self, value: setattr(self, "step", value))


def state_copy(module):
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def train_run(trainer):
    """Train `trainer` as its script's command line asks: under the run lock, resumed at
    --checkpoint_step or started afresh (refusing to overwrite an earlier run without --overwrite), with
    TensorBoard on rank 0 and SIGTERM / Ctrl-C as a flag that the training loop checks between steps."""
    args, dist = trainer.args, trainer.dist
    with checkpointing.RunLock(trainer.directory, trainer.prefix, trainer.folder_flag) as lock:
        checkpointing.claim_run(dist, lock, {trainer.folder_flag: trainer.directory, "--log_dir": args.log_dir})
        if args.checkpoint_step >= 0:
            trainer.load(args.checkpoint_step, restore_training=True)
            trainer.check_resume()
        else:
            trainer.earlier_run = checkpointing.start_fresh(trainer.directory, trainer.prefix, trainer.folder_flag,
                                                            args.overwrite)
            trainer.fresh_start()
        writer = None
        try:
            writer = runs.open_writer(args, trainer.prefix, trainer.log_folder, trainer.step) if dist.is_main else None
            with stop_signals_as_flag():
                trainer.train(writer)
            trainer.finish(writer)
        except (LostPeer, runs.LogWriteError) as error:  # another torchrun process is gone, a full log disk:
            raise MeloError(f"{error}; {trainer.resume_hint()}") from None  # what was saved stands
        finally:
            if writer is not None:
                writer.close()
    return trainer

