"""What the scripts share about a run: its name and files, its random streams, the options a checkpoint
must agree on and its TensorBoard writer (main.py, train_original.py, compare.py and ablation.py import
these from here, never from each other). The meta-learning algorithm itself is meta_learner.py."""
import contextlib
import os
import threading
import time

import numpy as np

from common.errors import MeloError
from models import HEADS, backbone_option_names
from ratings.tasks import SPLIT_OPTIONS
from training import checkpointing

# Options that change the shape or meaning of what a checkpoint holds; resuming or testing with other
# values is refused with the names of the ones that differ.
# The backbones' own size flags join them (`shape_option_names`).
META_SHAPE_OPTIONS = (
    "model", "mode", "max_seq_len", "num_inner_steps", "use_adaptive_loss", "use_learnable_params",
    "rating_head", "user_factors", "user_bias_start", "weighted_start", "inner_params", "adapt_user_bias", "adapt_item_bias",
    "lstm_input_size", "lstm_hidden", "lstm_num_layers", "weight_recency", "use_mlp", "use_mlp_mean", "use_step_loss",
    "loss_num_layers", "task_info_loss", "task_info_rating_mean", "task_info_rating_std",
    "task_info_labels", "task_info_predictions", "adaptive_weights", "task_state",
    "select_by",  # the meaning of the best weights a checkpoint keeps
)

# Options added after checkpoints or results folders were first written, with the value every earlier one
# had: an old checkpoint or folder is compared as if it recorded it (so one of the plain head is refused by
# name under today's default bias head, not loaded half-way; a folder from before step 0 was validated,
# early_log_until 0 in effect, is not reused).
PREDATED = {"rating_head": "plain", "user_factors": 0, "weighted_start": False, "weight_recency": False,
            "bias_outer_lr": None,
            "train_query_targets": 1, "early_log_until": 0, "train_windows": "random", "grid_choice": "minimum"}


def comparable(options):
    """Options (of a checkpoint, a run or a results folder) as they are compared: user_bias_start means
    nothing to a head without per-user parameters (the plain head; None there), and a bias head's from
    before the flag started b_user at its meta-learned value. Unchanged where neither is among them."""
    if "user_bias_start" not in options and "rating_head" not in options:
        return options
    options = dict(options)
    if not HEADS[options.get("rating_head", PREDATED["rating_head"])].user_parameters:
        options["user_bias_start"] = None
    else:
        options.setdefault("user_bias_start", "learned")
    return options


def settings_differences(saved, current):
    """'key=saved (now current)' for each setting that a results folder's `saved` settings and the `current`
    ones both know and that differs, PREDATED's keys known to both; user_bias_start compared as `comparable`
    reads it (so a folder from before the flag is not reused under the fold-in start)."""
    saved = {**{key: value for key, value in PREDATED.items() if key in current}, **saved}
    saved, current = comparable(saved), comparable(current)
    return checkpointing.option_differences(saved, current, sorted(set(saved) & set(current)))


def saved_shape(checkpoint_shape, current):
    """A checkpoint's or export's recorded shape options, with PREDATED's values for those it predates
    among the `current` ones, and user_bias_start as `comparable` reads it where `current` has it."""
    saved = {**{key: value for key, value in PREDATED.items() if key in current}, **checkpoint_shape}
    return comparable(saved) if "user_bias_start" in current else saved


# Options that shape the training trajectory but not the checkpoint: resuming with other values works
# (extending --num_train_iterations, say), but is no longer "as if never stopped", so it is pointed out.
# The backbones' own training flags (dropout) join them (`training_option_names`).
META_TRAINING_OPTIONS = (
    "num_train_iterations", "batch_size", "outer_lr", "min_outer_lr", "learn_lr", "lstm_lr", "min_lstm_lr",
    "task_info_lr", "loss_lr", "loss_weight_decay", "outer_weight_decay", "grad_clip", "use_multi_step",
    "multi_step_loss_num_epochs", "first_order_iterations", "bias_outer_lr", "num_samples", "num_query_set",
    "train_query_targets", "train_windows", "bias_start",
    "use_random_sequence_length", "val_size", "query_loss", "grid_choice",
)


# The same for train_original.py (Basic): its optimiser, the tasks it validates on, and what its head's start
# is fitted from (not --pretrain_epochs: no schedule depends on it, so a longer resumed run equals one never
# stopped). Its export records them too, so that ablation.py does not reuse one made under others.
BASIC_TRAINING_OPTIONS = (
    "pretraining_batch_size", "pretraining_lr", "bias_outer_lr", "bias_start", "grid_choice", "train_windows",
    "train_query_targets", "num_samples", "num_query_set", "min_sub_window_size", "use_random_sequence_length",
    "val_size",
)

# The training options that say where the rating head starts: fitted when a run begins and kept in its
# checkpoints, so a resumed run keeps its start whatever they say now.
START_OPTIONS = ("bias_start", "grid_choice", "train_windows", "train_query_targets")


def shape_option_names():
    return META_SHAPE_OPTIONS + backbone_option_names(shape=True)


def training_option_names():
    return META_TRAINING_OPTIONS + backbone_option_names(shape=False)


def basic_training_option_names():
    return BASIC_TRAINING_OPTIONS + backbone_option_names(shape=False)


def resume_warning(path, saved, args, names, step):
    """The warning for resuming checkpoint `path` whose recorded training options `saved` differ from
    `args` in any of `names` (None where none differ, or the checkpoint predates the record)."""
    differing = checkpointing.option_differences(saved, vars(args), names)
    if not differing:
        return None
    best = ("; the best weights so far were chosen on other validation tasks, and later steps are compared "
            "with them" if "val_size" in saved and saved["val_size"] != args.val_size else "")
    start = [key for key in START_OPTIONS if key in saved and saved[key] != getattr(args, key)]
    kept = f"; the rating head keeps the start it began with ({', '.join(start)} as saved)" if start else ""
    return (f"warning: resuming {path} with other training options: {', '.join(differing)}; from step {step} on "
            f"the run trains with the options given now (learning rates and their schedules included), so it "
            f"will not equal one that was never stopped{best}{kept}")

LEARNED_LOSS_OPTIONS = ("lstm_input_size", "lstm_hidden", "lstm_num_layers")


# ------------------------------------------------------------------ names and files
def meta_prefix(args):
    """main.py's checkpoint / report name: model, data set and method (melo or maml)."""
    return f"{args.model}_{args.mode}_{'melo' if args.use_adaptive_loss else 'maml'}"


def meta_report_path(args, prefix, step):
    """main.py --test's JSON report beside the checkpoint."""
    kind = "best" if args.test_best else "step"
    return os.path.join(args.checkpoint_dir, f"{prefix}_step{step}.test_{kind}.json")


def basic_method(args):
    """train_original.py's method name: the plain backbone, or with the learned loss."""
    return "basic-learned-loss" if args.use_learned_loss_baseline else "basic"


def basic_prefix(args):
    """train_original.py's checkpoint / report name: model, data set and method."""
    return f"{args.model}_{args.mode}_{basic_method(args)}"


def pretrained_path(args):
    """Where train_original.py --save_pretrained writes its export and main.py
    --load_pretrained[_embedding] looks for it."""
    return os.path.join(args.pretrain_log_dir, f"{args.model}_{args.mode}_pretrained.pt")


def tuned_finetuning(args):
    return bool(args.finetune_steps_grid or args.finetune_lr_grid)


def basic_report_path(args, step):
    """train_original.py --test's JSON report beside the checkpoint; fine-tuning runs are named by their K
    and lr, or `finetune-tuned` when they are chosen on validation (--finetune_lr_grid / --finetune_steps_grid)."""
    if tuned_finetuning(args):
        finetune = ".finetune-tuned"
    else:
        finetune = f".finetune{args.finetune_steps}_lr{args.finetune_lr:g}" if args.finetune_steps else ""
    kind = "best" if args.test_best else "step"
    return os.path.join(args.pretrain_log_dir, f"{basic_prefix(args)}_step{step}{finetune}.test_{kind}.json")


# ------------------------------------------------------------------ what a checkpoint must agree on
def meta_shape_options(args, data):
    """What a main.py checkpoint must agree on: its shapes and meaning, and the user split (testing under
    another split would score users the checkpoint was trained on)."""
    options = {key: getattr(args, key) for key in shape_option_names() + SPLIT_OPTIONS}
    options.update(num_items=int(data.num_items), max_rating=float(data.max_rating))
    return comparable(options)


def basic_shape_options(args, data):
    """The options a train_original.py checkpoint depends on: the shape options that concern the backbone,
    the learned-loss encoder's sizes when it is used, and the options of the user split."""
    everything = meta_shape_options(args, data)
    keys = ["model", "mode", "max_seq_len", "num_items", "max_rating", "select_by", "rating_head", "user_factors",
            "user_bias_start", *SPLIT_OPTIONS]  # (validation scores each epoch with the test's user start)
    keys += backbone_option_names(shape=True)
    if args.use_learned_loss_baseline:
        keys += LEARNED_LOSS_OPTIONS
    options = {key: everything[key] for key in keys}
    options["use_learned_loss_baseline"] = args.use_learned_loss_baseline
    return options


# ------------------------------------------------------------------ random streams
def stream_seed(*keys):
    """A 63-bit seed mixed from integers (numpy's SeedSequence), for per-iteration random streams.
    (A Python int before the shift: numpy 1.x cannot shift a uint64 by an int.)"""
    return int(np.random.SeedSequence([k % 2 ** 63 for k in keys]).generate_state(2, np.uint64)[0]) >> 1


# ------------------------------------------------------------------ TensorBoard
class LogWriteError(MeloError):
    """The TensorBoard log could not be written (a full --log_dir disk); train_run adds where to resume."""


def _quiet_log_thread(hook_args, report=threading.excepthook):
    """threading.excepthook: TensorBoard writes its events in a thread of its own, which printed a full disk's
    OSError as 'Exception in thread ...' and its traceback (interleaved with the one-line error) before the
    main thread's next write raised it again, which LogWriter reports. Other threads' errors are printed."""
    if not (issubclass(hook_args.exc_type, OSError) and type(hook_args.thread).__module__.startswith("tensorboard.")):
        report(hook_args)


class LogWriter:
    """A TensorBoard writer whose write errors (a full disk on --log_dir: OSError) are a one-line
    LogWriteError, as a full checkpoint disk is; the checkpoints saved before are intact. After one failure,
    close() gives up quietly instead of raising the same error again."""

    def __init__(self, folder, **kwargs):
        from torch.utils.tensorboard import SummaryWriter

        threading.excepthook = _quiet_log_thread
        self.folder, self.failed = folder, False
        self.writer = self._guarded(SummaryWriter, folder, **kwargs)
        self.log_dir = self.writer.log_dir

    def _guarded(self, method, *args, **kwargs):
        try:
            return method(*args, **kwargs)
        except OSError as error:
            self.failed = True
            raise LogWriteError(f"could not write the TensorBoard log in {self.folder} ({error.strerror or error}): "
                                "is the disk full? The checkpoints saved before are intact") from None

    def __getattr__(self, name):  # add_scalar, add_figure, add_text, add_hparams, flush
        method = getattr(self.writer, name)
        return lambda *args, **kwargs: self._guarded(method, *args, **kwargs)

    def close(self):
        if self.failed:
            with contextlib.suppress(OSError):
                self.writer.close()
            return
        self._guarded(self.writer.close)


def open_writer(args, prefix, log_folder=None, step=0):
    """The run's TensorBoard writer. A fresh run gets a new folder `<prefix>_<time>_seed<seed>` under
    `--log_dir`; a run resumed at `step` goes on writing into its `log_folder` (its checkpoint records
    it), where what an interrupted attempt logged after that step is hidden (purge_step)."""
    if log_folder is not None:
        return LogWriter(os.path.join(args.log_dir, log_folder), purge_step=step + 1)
    name = f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}_seed{args.random_seed}"
    folder, copy = os.path.join(args.log_dir, name), 1
    while os.path.exists(folder):  # two runs started in the same second
        copy += 1
        folder = os.path.join(args.log_dir, f"{name}-{copy}")
    writer = LogWriter(folder)
    writer.add_text("options", "\n".join(f"    {k} = {v}" for k, v in sorted(vars(args).items())))
    return writer


def log_hparams(writer, args, best):
    """The run's options beside its best validation score, for TensorBoard's HPARAMS tab."""
    hparams = {k: v for k, v in vars(args).items() if isinstance(v, (bool, int, float, str))}
    writer.add_hparams(hparams, {"hparam/best_val_rmse": best["rmse"]}, run_name=".")


