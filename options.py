"""Every command-line flag of MELO, in one parser.

`build_parser()` builds it and `parse_args(argv)` parses and validates; nothing is parsed at import, so
tests and scripts can build their own argument sets (`parse_args(["--mode=ml-100k", ...])`).

Flag names and meanings follow the original MELO project, and its defaults except where this project's
ablations chose otherwise (--rating_head, --lstm_lr, --adaptive_weights: docs/comparison.md). Booleans are
written `--flag=True` / `--flag=False`.
"""
import argparse
import os
import sys

from common.errors import MeloError, out_of_memory
from common.flag_types import (LR_MAX, WIDTH_MAX, checked, comma_list, depth, learning_rate, non_negative_float,
                               non_negative_int, positive_int, seed, size, str2bool, weight_decay, width)
from evaluation.baselines import BASELINES
from models import BACKBONES, HEADS, backbone_flags, check_flags
from ratings.readers import MAX_RATING

MODES = ("ml-1m", "ml-10m", "ml-100k", "amazon", "yelp")

# The four columns of a ratings file, in the order MELO reads them (--csv_columns names them in file order).
COLUMN_ROLES = ("user", "item", "rating", "timestamp")
BIAS_STARTS = ("fold-in", "blend", "zero")  # --bias_start's choices

# Where each mode's ratings live when --data_path is not given (MovieLens is downloaded there).
DEFAULT_DATA_PATHS = {
    "ml-1m": "./Data/ml-1m/ratings.dat",
    "ml-10m": "./Data/ml-10m/ratings.dat",
    "ml-100k": "./Data/ml-100k/u.data",
    "amazon": "./Data/amazon/ratings.csv",
    "yelp": "./Data/yelp/ratings.csv",
}


class CommandLineParser(argparse.ArgumentParser):
    """argparse with a one-line error in the form of every other error (`error: ...`, as run_cli prints a
    MeloError; not argparse's `main.py: error:` under the whole usage block) and no abbreviated flags
    (`--num_train_iteration=5` would silently mean `--num_train_iterations`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (--help lists the options)\n")


def can_blend(args):
    """Does --bias_start=blend apply: a bias head with a factor term (the MF fold-in's part of the blend)?"""
    return args.rating_head == "bias" and args.user_factors > 0


def build_parser():
    parser = CommandLineParser(
        description="MELO: meta-learning with a learned adaptive loss for cold-start sequential "
                    "rating prediction.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # ---------------------------------------------------------------- data
    data = parser.add_argument_group("data")
    add = data.add_argument
    add("--mode", default="ml-1m", choices=MODES,
        help="data set: MovieLens 1M/10M/100K (downloaded when missing), Amazon or Yelp ratings")
    add("--data_path", default=None,
        help="ratings file; default depends on --mode (" +
             ", ".join(f"{m}: {p}" for m, p in DEFAULT_DATA_PATHS.items()) + ")")
    add("--data_dir", default="./Data",
        help="where downloads and the preprocessing cache live")
    add("--min_item", type=non_negative_int, default=50,
        help="drop items with fewer ratings than this (applied first)")
    add("--min_sequence", type=positive_int, default=5,
        help="then drop users with fewer ratings than this")
    add("--max_seq_len", type=size(WIDTH_MAX, minimum=3), default=30,
        help="length L of every window; a task uses at most this many of a user's latest items")
    add("--min_sub_window_size", type=checked(int, 2, ">= 2"), default=2,
        help="shortest support / query window")
    add("--num_samples", type=positive_int, default=25,
        help="support windows per task (fewer when a user's history has fewer distinct windows)")
    add("--num_query_set", type=width, default=3,
        help="query windows per task, all ending on the task's last item")
    add("--train_query_targets", type=width, default=1,
        help="query targets of a training task: its window's last m items are held out (query window j ends "
             "on the (j mod m)-th from the end; the support windows come from the items before them), so each "
             "meta-batch scores m targets per user instead of one (max(--num_query_set, m) query windows); "
             "validation and test tasks keep one target, the latest item, and --num_query_set windows")
    add("--train_windows", default="random", choices=("random", "latest", "held-out"),
        help="where a training task's window lies in the user's history: random (uniform start), latest (ending "
             "on the latest rating, as validation and test tasks do, so every training target is a latest item), "
             "held-out (latest, and the bias head's fitted start leaves those targets, each training user's last "
             "--train_query_targets ratings, out of its item tables, so that they are unseen by the tables as a "
             "new user's target is)")
    add("--num_test_data", type=positive_int, default=1000,
        help="number of cold-start test users")
    add("--val_size", type=positive_int, default=600,
        help="number of fixed validation tasks scored at each --log_interval (at most the number of "
             "validation users)")
    add("--val_fraction", type=checked(float, 0.0, "in (0, 1)"), default=0.15,
        help="share of the non-test users held out as validation users")
    add("--batch_size", type=positive_int, default=16,
        help="tasks (users) per meta-batch (at most the number of training users)")
    add("--random_seed", type=seed, default=222,
        help="seeds the user split, every task, dropout and the training order")
    add("--use_random_sequence_length", type=str2bool, default=False,
        help="training tasks use a random window length instead of max_seq_len")
    add("--keep_duplicates", type=str2bool, default=False,
        help="keep every rating of a (user, item) pair; by default only the latest one (by time, then file "
             "order) is kept, so that a repeated rating cannot put a test target into the support set")
    add("--csv_columns", default="",
        help="Amazon / Yelp CSV: what the file's four columns hold, in file order, e.g. "
             "item,user,rating,timestamp (overrides the header names; needed for a header MELO does not "
             "know; empty = from the header, or user,item,rating,timestamp without one)")

    # (masked, yet it passes through the squared error: a value near FLOAT32_MAX overflowed there)
    add("--default_rating", type=checked(float, -MAX_RATING, f"from {-MAX_RATING:g} to {MAX_RATING:g}", MAX_RATING),
        default=0, help="rating value written at padded positions (masks come from item id 0)")

    # ---------------------------------------------------------------- model
    model = parser.add_argument_group("backbone")
    add = model.add_argument

    add("--model", default="bert4rec", choices=tuple(BACKBONES), help="sequential backbone")
    add("--model_init_seed", type=seed, default=0, help="seeds the backbone's initial weights")
    add("--rating_head", default="bias", choices=tuple(HEADS),
        help="how a backbone outputs a rating: plain = 0.1 + sigmoid(head), in stars / 5; bias = mu + b_user + "
             "b_item + sigmoid(head) - 1/2, with mu the training users' mean, b_item an item-bias table and "
             "b_user a per-user bias adapted in the inner loop (and by fine-tuning) with its own rate, the "
             "network a residual")
    for flag, declared_by in backbone_flags():  # each backbone's own flags (models/backbones.py)
        add(f"--{flag.name}", type=flag.type, default=flag.default, help=f"{flag.help} ({', '.join(declared_by)})")

    # ---------------------------------------------------------------- meta-learning
    meta = parser.add_argument_group("meta-training (main.py)")
    add = meta.add_argument
    add("--num_train_iterations", type=positive_int, default=2000, help="outer iterations")
    add("--num_inner_steps", type=depth, default=3, help="inner-loop gradient steps per task")
    add("--inner_lr", type=learning_rate, default=1e-3,
        help="initial value of every learned inner learning rate")
    add("--user_bias_lr", type=learning_rate, default=None,
        help="--rating_head=bias: initial inner learning rate of b_user (default: --inner_lr); 0.5 makes one "
             "inner step on b_user alone the support set's mean residual (the squared loss's Newton step)")
    add("--user_factors", type=checked(int, 0, "from 0 to 256", 256), default=0,
        help="--rating_head=bias: K > 0 adds a user x item factor term p_user . q_item (K columns) to the head. "
             "With --bias_start=fold-in the head starts as the better on the validation users of the user + "
             "item bias fold-in and the MF fold-in of rank <= K (its item biases and factors from ALS on the "
             "training users), and with --user_bias_start=fold-in each task's (p_user, b_user) start at that "
             "fold-in's ridge estimate from its support set: with f = 0 the head is then that fold-in")
    add("--weighted_start", type=str2bool, default=False,
        help="MELO with --user_bias_start=fold-in: the fold-in start of b_user (and p_user) is the weighted "
             "least-squares fit with the learned loss's weights, i.e. the minimum over the user's parameters "
             "of the (ridge-penalised) adaptive inner loss, so the weights act on the user's estimate too")
    add("--bias_start", default="fold-in", choices=BIAS_STARTS,
        help="--rating_head=bias: the item biases start at the user + item bias fold-in's (closed form on the "
             "training users, regularisation chosen on validation; with --user_factors, the better of it and "
             "the MF fold-in), at the fold-in blend's (with --user_factors: s * MF fold-in + (1 - s) * user + "
             "item bias fold-in, s chosen on validation, each user's part of both fold-ins solved per task), "
             "or at zero; mu is the training users' mean")
    add("--user_bias_start", default="fold-in", choices=("fold-in", "learned"),
        help="--rating_head=bias: where each user's b_user starts before the inner loop (and fine-tuning): at "
             "its meta-learned value (learned), or moved from it to the user + item bias fold-in's shrunk "
             "estimate from the support set's residuals (fold-in; lambda_user chosen on validation as for the "
             "fold-in's report), so that with f = 0 the head starts as the fold-in")
    add("--inner_params", default="all", choices=("all", "head"),
        help="what the inner loop adapts: all = every backbone parameter; head = only the output layer and "
             "the bias head's biases (ANIL-style), the rest is learned by the outer loop alone")
    add("--adapt_user_bias", type=str2bool, default=True,
        help="--rating_head=bias: the inner loop adapts b_user (False: it stays where --user_bias_start puts it)")
    add("--adapt_item_bias", type=str2bool, default=True,
        help="--rating_head=bias: the inner loop adapts b_item (False: only the outer loop learns it)")
    add("--use_learnable_params", type=str2bool, default=True,
        help="meta-learn the per-layer, per-step inner learning rates (MAML++ LSLR)")
    add("--learn_lr", type=learning_rate, default=1e-3, help="Adam lr of the inner learning rates")
    add("--outer_lr", type=learning_rate, default=1e-3, help="Adam lr of the backbone")
    add("--outer_weight_decay", type=weight_decay, default=0.0,
        help="Adam weight decay of the backbone in the outer loop (against overfitting the training users)")
    add("--min_outer_lr", type=learning_rate, default=1e-4,
        help="cosine annealing floor of --outer_lr")
    add("--bias_outer_lr", type=learning_rate, default=None,
        help="--rating_head=bias: Adam lr of the head's own tables (b_item, q_item and the meta-learned starts "
             "of b_user, p_user), in main.py annealed like --outer_lr (default: --outer_lr, in the backbone's "
             "group) and in train_original.py constant (default: --pretraining_lr); 0 keeps them at their "
             "fold-in start, which Adam's per-row steps on a few users' gradients would otherwise move by noise")
    add("--grad_clip", type=non_negative_float, default=5.0,
        help="clip the meta-gradient norm (0 = off)")
    add("--use_multi_step", type=str2bool, default=True, help="MAML++ multi-step loss")
    add("--multi_step_loss_num_epochs", type=non_negative_int, default=1000,
        help="iterations that use the multi-step loss; later only the last step counts")
    add("--first_order_iterations", type=non_negative_int, default=0,
        help="first K iterations are first-order for the backbone and learning rates "
             "(the learned loss still gets its second-order meta-gradient)")
    add("--query_loss", default="all", choices=("all", "target", "balanced"),
        help="outer loss over every real position of the query windows (all, the original), or over the "
             "held-out target, their last position, only (target: most other query positions are items "
             "the support windows also hold), or over the target with each rating weighted by the inverse "
             "of its share of the training users' ratings (balanced: the outer loss of the mean per-rating "
             "RMSE, the rare ratings as heavy as the common ones; pair it with --select_by=mean_per_rating_rmse)")
    add("--task_chunk", type=non_negative_int, default=0,
        help="process the meta-batch in chunks of this many tasks, accumulating gradients "
             "(bounded memory; 0 = all at once)")

    loss = parser.add_argument_group("learned inner loss (MELO)")
    add = loss.add_argument
    add("--use_adaptive_loss", type=str2bool, default=True,
        help="MELO's learned, task-adaptive inner loss; False = plain MAML++ with MSE")
    add("--lstm_input_size", type=width, default=16, help="rating-embedding size of the encoder")
    add("--lstm_hidden", type=width, default=32, help="hidden size of the rating-sequence LSTM")
    add("--lstm_num_layers", type=depth, default=1, help="layers of the rating-sequence LSTM")
    add("--weight_recency", type=str2bool, default=False,
        help="MELO: the weight network also reads each support position's recency (its distance in items from "
             "the user's latest support item), so the learned weights can favour recent ratings")
    add("--lstm_lr", type=learning_rate, default=0.01,
        help="Adam lr of the loss networks, cosine-annealed to --min_lstm_lr (the original's 0.1 drives the "
             "weights to their extremes: docs/comparison.md)")
    add("--min_lstm_lr", type=learning_rate, default=0.001, help="floor of --lstm_lr")
    add("--use_mlp", type=str2bool, default=False,
        help="weight network: an MLP fed the task statistics chosen below")
    add("--task_info_loss", type=str2bool, default=True, help="MLP input: per-position loss")
    add("--task_info_rating_mean", type=str2bool, default=True, help="MLP input: task rating mean")
    add("--task_info_rating_std", type=str2bool, default=True, help="MLP input: task rating std")
    add("--task_info_labels", type=str2bool, default=True, help="MLP input: the label")
    add("--task_info_predictions", type=str2bool, default=True, help="MLP input: the prediction")
    add("--task_info_lr", type=learning_rate, default=1e-3, help="Adam lr of the MLP weight net")
    add("--use_mlp_mean", type=str2bool, default=False,
        help="METAL-style: an MLP turns the weighted losses into the inner loss")
    add("--use_step_loss", type=str2bool, default=False,
        help="with --use_mlp_mean: one loss MLP per inner step")
    add("--loss_num_layers", type=depth, default=2, help="layers of the loss MLP")
    add("--loss_lr", type=learning_rate, default=1e-3, help="Adam lr of the loss MLP")
    add("--loss_weight_decay", type=weight_decay, default=0.0, help="weight decay of the loss MLP")
    add("--adaptive_weights", default="normalised", choices=("normalised", "centred", "bounded", "unbounded"),
        help="how the weight network's output z becomes a position's weight: normalised = 0.1 + 2·sigmoid(z) "
             "divided by its mean over the task's support positions (the loss moves weight between "
             "positions, the inner rates own the step size); centred = the same of z minus its task mean "
             "(the logits cannot all saturate together); bounded = 2·sigmoid(z) in (0, 2); unbounded = "
             "|1 + z| (the original MELO's |Linear(LSTM state)|)")
    add("--task_state", default="static", choices=("static", "per_step"),
        help="what the weight network reads: static = the user's rating sequence, once per task; per_step "
             "= METAL-style, recomputed at every inner step from that sequence's state plus each position's "
             "current prediction, error and the step")
    add("--use_softmax", type=str2bool, default=False,
        help="normalise weights with a masked softmax over positions")
    add("--use_focal_loss", type=str2bool, default=False,
        help="scale each position's loss by its relative size (focal-style)")

    # ---------------------------------------------------------------- run control
    run = parser.add_argument_group("run control")
    add = run.add_argument
    add("--test", action="store_true", help="evaluate --checkpoint_step on the test users")
    add("--test_best", type=str2bool, default=True,
        help="with --test: use the best-by-validation weights saved with that step "
             "(False: the weights of exactly that step)")
    add("--step_choice", default="minimum", choices=("minimum", "one-se"),
        help="with --test and --test_best: minimum = the weights of the step with the lowest validation "
             "--select_by; one-se = those only if they beat the start's (step 0, the untrained network) by more "
             "than one standard error of the paired per-user difference on the validation users, else the "
             "start's (docs/comparison.md)")
    add("--test_baseline", action="store_true",
        help="score the baselines without a network (--baseline) on the test targets")

    add("--baseline", default="all", choices=(*BASELINES, "all"),
        help="with --test_baseline: mean-rating (the training users' global mean), user-mean (the mean of "
             "the user's support items), shrunk-user-mean (pulled toward the global mean, strength chosen "
             "on validation), user-item-bias (item biases from training users, the user's bias from the "
             "support set, regularisation chosen on validation), mf-fold-in (biased matrix factorisation by "
             "ALS on the training users, the user's factor and bias by ridge regression on the support set, "
             "rank and regularisation chosen on validation), mf-fold-in-recalibrated (its predictions mapped "
             "to a + b * p, a and b fitted on the validation users), fold-in-blend (s * mf-fold-in + (1 - s) * "
             "user-item-bias, s chosen on the validation users), or all; see baselines.py")
    add("--select_by", default="rmse", choices=("rmse", "mean_per_rating_rmse"),
        help="validation metric that picks the best weights (main.py, train_original.py) and the "
             "baselines' and fine-tuning's settings")
    add("--grid_choice", default="auto", choices=("auto", "one-se", "minimum"),
        help="how the MF fold-in's setting (rank, ALS lambda, lambda_u, lambda_b, decay) is chosen on the "
             "validation users, for its report and for the bias head's start: minimum = the grid's minimum, "
             "which overfits a few hundred validation users; one-se = the simplest point (lowest rank, then "
             "strongest regularisation) within one standard error (over 10 folds of the validation users) of "
             "the minimum, which can oversimplify; auto = of the two, the one with the lower cross-fitted "
             "score (docs/comparison.md). Other baselines: the minimum")
    add("--checkpoint_step", type=int, default=-1,
        help="step to resume from (training) or to evaluate (--test); -1 = none")
    add("--checkpoint_dir", default="./checkpoints", help="where main.py keeps its checkpoints")
    add("--overwrite", type=str2bool, default=False,
        help="a fresh run replaces an earlier run of the same name (model, data set, method) instead of "
             "refusing to start: its checkpoints and reports are deleted once the new run saved a checkpoint")
    add("--log_dir", default="./runs", help="TensorBoard logs, one folder per run")
    add("--log_interval", type=positive_int, default=50,
        help="validate, log and checkpoint every this many iterations (and at step 0, the untrained start)")
    add("--early_log_interval", type=positive_int, default=10,
        help="up to --early_log_until, validate, log and checkpoint every this many iterations instead: the "
             "curve moves most early on, and the best weights may be those of an early step")
    add("--early_log_until", type=non_negative_int, default=100,
        help="the last iteration of the --early_log_interval schedule (0 = none)")
    add("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    add("--num_threads", type=non_negative_int, default=0,
        help="torch CPU threads (0 = PyTorch's default, one per core)")
    add("--keep_freed_memory", type=str2bool, default=True,
        help="glibc: keep freed memory in the process for the next iteration instead of returning it to "
             "the OS and page-faulting it in again (faster on the CPU; the process holds its peak memory)")

    # ---------------------------------------------------------------- baseline
    base = parser.add_argument_group("non-meta baseline (train_original.py) and pretraining")
    add = base.add_argument
    add("--pretraining_batch_size", type=positive_int, default=128, help="windows per batch")
    add("--pretrain_epochs", type=positive_int, default=100, help="training epochs")  # 0: nothing to train
    add("--pretraining_lr", type=learning_rate, default=1e-3, help="Adam lr")
    add("--pretrain_log_dir", default="./pretrained",
        help="checkpoints and exported weights of train_original.py")
    add("--use_learned_loss_baseline", type=str2bool, default=False,
        help="weight the baseline's loss with the rating-sequence encoder")
    add("--finetune_steps", type=non_negative_int, default=0,
        help="train_original.py --test: plain SGD steps on each test user's support windows before "
             "predicting (the fine-tuning baseline between no adaptation and MAML; 0 = none)")
    add("--finetune_lr", type=learning_rate, default=0.1,
        help="SGD learning rate of --finetune_steps (on the masked mean squared error of ratings / 5)")
    add("--finetune_steps_grid", type=comma_list(non_negative_int), default="",
        help="train_original.py --test: comma-separated step counts; with --finetune_lr_grid, the "
             "(lr, steps) pair with the best validation --select_by is used (replaces --finetune_steps); "
             "a grid whose choice sits on its edge is extended (see tuning.py)")
    add("--finetune_lr_grid", type=comma_list(learning_rate), default="",
        help="comma-separated fine-tuning learning rates chosen from on validation (replaces --finetune_lr)")
    add("--save_pretrained", type=str2bool, default=False,
        help="export the item embedding and the whole model for main.py")
    add("--load_pretrained_embedding", type=str2bool, default=False,
        help="main.py starts from the item embedding saved by train_original.py")
    add("--load_pretrained", type=str2bool, default=False,
        help="main.py starts from the whole model saved by train_original.py")
    for action in parser._actions:  # every bounded flag says its bounds (argparse checks them through the type)
        if getattr(action.type, "bounds", None):
            action.help += " ({} to {})".format(*(f"{bound:g}" if isinstance(bound, float) else bound
                                                  for bound in action.type.bounds))
        elif action.dest == "finetune_lr_grid":
            action.help += f" (0 to {LR_MAX:g})"
    return parser


def validate(parser, args):
    """Cross-flag checks that argparse types cannot express; errors exit with argparse's message."""
    if args.min_sub_window_size >= args.max_seq_len:
        # support windows lie within a task window's first max_seq_len - 1 items
        parser.error(f"--min_sub_window_size ({args.min_sub_window_size}) must be smaller than "
                     f"--max_seq_len ({args.max_seq_len})")
    if not 0.0 < args.val_fraction < 1.0:
        parser.error(f"--val_fraction must be in (0, 1), got {args.val_fraction}")
    backbone_problem = check_flags(args)  # each backbone's own cross-flag checks (models/backbones.py)
    if backbone_problem:
        parser.error(backbone_problem)
    if args.checkpoint_step < -1:
        parser.error(f"--checkpoint_step must be a saved step (>= 0) or -1 (none), got {args.checkpoint_step}")
    if args.csv_columns and sorted(args.csv_columns.split(",")) != sorted(COLUMN_ROLES):
        parser.error(f"--csv_columns must name {', '.join(COLUMN_ROLES)} once each, in the file's column "
                     f"order, got {args.csv_columns!r}")
    if args.bias_start == "blend" and not can_blend(args):
        parser.error("--bias_start=blend starts the bias head's factor term as the MF fold-in's: it needs "
                     "--rating_head=bias and --user_factors=K (K > 0)")
    if args.test and args.checkpoint_step < 0 and not args.test_baseline:
        parser.error("--test needs --checkpoint_step=N (the step to evaluate)")


def parse_args(argv=None):
    """Parse `argv` (default: sys.argv), fill mode-dependent defaults, and validate."""
    parser = build_parser()
    args = parser.parse_args(argv)
    validate(parser, args)
    args.data_path_given = args.data_path is not None
    if args.data_path is None:
        args.data_path = os.path.join(args.data_dir, os.path.relpath(DEFAULT_DATA_PATHS[args.mode], "./Data"))
    return args


def run_cli(main_function, argv=None, parse=parse_args):
    """Run a script's main(parse(argv)); a MeloError, or an allocation that failed (sizes past memory),
    becomes `error: ...` on stderr and exit status 2. Output piped into a reader that stops early (`| head`)
    ends the run quietly, as other commands do."""
    try:
        main_function(parse(argv))
    except (MeloError, MemoryError, RuntimeError) as error:
        message = error if isinstance(error, MeloError) else out_of_memory(error)
        if message is None:
            raise
        sys.stderr.write(f"error: {message}\n")  # one write: the lines of several ranks do not interleave
        sys.exit(2)
    except BrokenPipeError:
        # Python would report the broken pipe again when it flushes stdout at exit (Python docs, signal)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
