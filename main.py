"""MELO / MAML++ meta-training, evaluation and resume.

    python main.py                                   # meta-train MELO on MovieLens-1M (downloaded)
    python main.py --use_adaptive_loss=False         # plain MAML++
    python main.py --checkpoint_step=N --test        # score step N on the cold-start test users
    python main.py --checkpoint_step=N               # resume training at step N
    python main.py --test_baseline                   # the baselines without a network, same targets
    torchrun --standalone --nproc_per_node=K main.py ...   # K processes, one meta-batch shared

Every `--log_interval` iterations the fixed validation tasks are scored, TensorBoard is written under
`--log_dir`, and a checkpoint of that step (with the best-so-far weights) is saved in `--checkpoint_dir`.
"""
from common import errors

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    errors.say_when_terminated()

import math
import os
import sys

import torch
from tqdm import tqdm

from common.errors import MeloError
from common.runtime import Distributed, check_stop, configure_cpu, interruption, progress, seed_everything
from evaluation import baselines, metrics
from meta_learner import build_meta_training, meta_train_step, step_weights
from options import run_cli
from ratings.preprocess import duplicates_note
from ratings.tasks import SPLIT_OPTIONS
from studies import figures
from training import checkpointing, runs
from training.analysis import (SHARE_NAMES, mean_weight_by_rating, query_gradient_by_rating,
                               query_gradient_by_share, query_gradient_of_weights, summarise_query_gradients,
                               support_weights, weight_sums_by_rating)
from training.trainers import Trainer, state_copy, step_alias, train_run


def load_optimizer_state(optimizer, scheduler, checkpoint, path):
    """Restore Adam's moments and the schedule's position from `checkpoint`, but keep the learning rates,
    their schedules and the weight decay that the current flags give (load_state_dict would bring back the
    saved ones): a resumed run trains with the flags it is given, from its step on."""
    current = checkpointing.load_optimizer_moments(optimizer, checkpoint["optimizer"], path,
                                                   ("initial_lr", "weight_decay"))
    checkpointing.load_state(scheduler, checkpoint["scheduler"], path, "scheduler state")
    scheduler.base_lrs = [values["initial_lr"] for values in current]
    for group, values, schedule in zip(optimizer.param_groups, current, scheduler.lr_lambdas):
        group["lr"] = values["initial_lr"] * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def load_pretrained(args, learner, fingerprint):
    """Start from train_original.py's exported weights (--load_pretrained[_embedding]), which must have
    been trained on the data of `fingerprint`."""
    from models import load_pretrained_weights

    path = os.path.join(args.pretrain_log_dir, f"{args.model}_{args.mode}_pretrained.pt")
    if not os.path.exists(path):
        raise MeloError(f"no pretrained weights at {path}: run train_original.py --model={args.model} "
                        f"--mode={args.mode} --save_pretrained=True first")
    exported = checkpointing.read_saved_dict(path, "pretrained export")
    checkpointing.check_data(exported.get("data_fingerprint"), fingerprint, path, "pretrained export")
    saved = runs.saved_shape(exported.get("shape_options", {}), vars(args))
    differing = checkpointing.option_differences(saved, vars(args), SPLIT_OPTIONS)
    if differing:
        raise MeloError(f"pretrained weights {path} were trained under another user split "
                        f"({', '.join(differing)}), so their training users may be test users here: use the "
                        "same flags, or retrain with train_original.py --save_pretrained=True")
    if args.load_pretrained and saved["rating_head"] != args.rating_head:
        raise MeloError(f"pretrained weights {path} have the {saved['rating_head']} rating head and this run the "
                        f"{args.rating_head} one: use --rating_head={saved['rating_head']}, or retrain with "
                        f"train_original.py --rating_head={args.rating_head} --save_pretrained=True")
    load_pretrained_weights(learner.backbone, exported, embedding_only=not args.load_pretrained, source=path)


class MetaTrainer(Trainer):
    required, best_key = ("meta_state", "best_meta_state"), "best_meta_state"
    iteration = step_alias()

    def __init__(self, args, dist):
        super().__init__(args, dist)
        fresh = args.checkpoint_step < 0 and not args.test_baseline  # else the checkpoint holds the head's start
        self.learner, self.optimizer, self.scheduler = build_meta_training(
            args, self.data.num_items, self.data.max_rating, self.device, self.start_head_of if fresh else None)
        if args.query_loss == "balanced":
            self.learner.balance_query_ratings(self.training_ratings)
        self.prefix = runs.meta_prefix(args)
        self.shape = runs.meta_shape_options(args, self.data)
        # the last step whose validation finished (None: the resumed step's did not; -1: none yet, so a fresh
        # run validates and saves step 0, the untrained start, which best-by-validation can then choose)
        self.validated = -1
        self.recent = []  # outer losses since the last validation, for its "train loss"

    @property
    def tested_module(self):
        return self.learner

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self):
        return {
            "training_options": {key: getattr(self.args, key) for key in runs.training_option_names()},
            "pending_validation": self.validation_pending(),
            "recent_losses": list(self.recent),
            "meta_state": state_copy(self.learner),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "best_meta_state": self.best["state"],
            "best_report": self.best.get("report"),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    def restore(self, checkpoint, path, restore_training):
        checkpointing.load_state(self.learner, checkpoint["meta_state"], path, "weights")
        self.best = {"rmse": checkpoint["best_rmse"], "step": checkpoint["best_step"],
                     "state": checkpoint["best_meta_state"], "report": checkpoint.get("best_report")}
        self.validated = None if checkpoint.get("pending_validation") else self.iteration
        if restore_training:
            checkpointing.require_keys(checkpoint, ("optimizer", "scheduler", "torch_rng", "cuda_rng"), path)
            warning = runs.resume_warning(path, checkpoint.get("training_options", {}), self.args,
                                          runs.training_option_names(), self.iteration)
            if warning and self.dist.is_main:
                print(warning, file=sys.stderr)
            load_optimizer_state(self.optimizer, self.scheduler, checkpoint, path)
            self.recent = list(checkpoint.get("recent_losses", []))
            torch.set_rng_state(checkpoint["torch_rng"])
            if checkpoint["cuda_rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])

    def fresh_start(self):
        if self.args.load_pretrained or self.args.load_pretrained_embedding:
            load_pretrained(self.args, self.learner, self.fingerprint)

    def check_resume(self):
        if not self.validation_pending():  # else its validation is left to do
            super().check_resume()

    def finish(self, writer):
        if writer is not None:
            runs.log_hparams(writer, self.args, self.best)

    # ------------------------------------------------------------------ evaluation
    def validation_stars(self, tasks):
        return self.predictions(tasks)[0]

    def predictions(self, tasks, with_weights=False):
        """Predicted stars [T, Q] (CPU) of a fixed task set's query targets, and with `with_weights` the
        adaptive loss's weight sums per rating value on the tasks' support sets (None for MAML++). The
        tasks are sharded over ranks and each rank's rows added into zeros, so every rank gets all of them."""
        self.learner.eval()
        part = self.dist.shard(len(tasks))
        mine = tasks.select(part)
        predicted = torch.zeros(tasks.query_mask.shape, dtype=torch.float64, device=self.device)
        weight_sums = None
        size = self.dataset.batch_size  # --batch_size, at most the training users
        for start in range(0, len(mine), size):
            check_stop()  # a stop signal acts between batches, never inside torch.func
            chunk = mine.select(slice(start, start + size)).to(self.device)
            predicted[part.start + start:part.start + start + len(chunk)] = self.clipped(self.learner.predict(chunk)).double()
            if with_weights and self.learner.inner_loss.has_weights:
                found = weight_sums_by_rating(*support_weights(self.learner, chunk), self.data.max_rating)
                weight_sums = found if weight_sums is None else weight_sums + found
        self.learner.train()
        if weight_sums is not None:
            weight_sums = self.dist.sum_(weight_sums.to(self.device)).cpu()
        return self.dist.sum_(predicted).cpu(), weight_sums

    def query_gradients(self, tasks):
        """summarise_query_gradients of a fixed task set, by support rating value and by the rating's
        share of each user's support set: which ratings the outer loss would have weighted up or down
        (sharded over ranks like predictions; chunks of --task_chunk or --batch_size tasks, since it is a
        training step's second-order pass)."""
        self.learner.eval()  # no dropout: the gradient of the model as tested
        part = self.dist.shard(len(tasks))
        mine = tasks.select(part)
        by_rating = torch.zeros(len(tasks), metrics.num_half_star_buckets(self.data.max_rating), 2, dtype=torch.float64,
                                device=self.device)
        by_share = torch.zeros(len(tasks), len(SHARE_NAMES), 2, dtype=torch.float64, device=self.device)
        size = self.args.task_chunk or self.dataset.batch_size
        for start in range(0, len(mine), size):
            chunk = mine.select(slice(start, start + size)).to(self.device)
            rows = slice(part.start + start, part.start + start + len(chunk))
            gradients, mask = query_gradient_of_weights(self.learner, chunk), chunk.support_items != 0
            by_rating[rows] = query_gradient_by_rating(gradients, chunk.support_ratings, mask, self.data.max_rating)
            by_share[rows] = query_gradient_by_share(gradients, chunk.support_ratings, mask, self.data.max_rating)
        self.learner.train()
        return (summarise_query_gradients(self.dist.sum_(by_rating).cpu()),
                summarise_query_gradients(self.dist.sum_(by_share).cpu(), SHARE_NAMES))

    def report(self, tasks, predicted, weight_sums=None):
        """The report of predictions(tasks): per window, per user under "per_user", and the adaptive
        loss's mean weight per rating value when `weight_sums` are given."""
        report = metrics.task_report(predicted, tasks, self.data.max_rating)
        if weight_sums is not None:
            report["adaptive_weight_by_rating"], report["adaptive_weight_by_rating_per_step"] = \
                mean_weight_by_rating(weight_sums)
        return report

    def evaluate(self, tasks, with_weights=False):
        """Report over a fixed task set (see report())."""
        return self.report(tasks, *self.predictions(tasks, with_weights))

    # ------------------------------------------------------------------ training
    def is_log_step(self, step):
        """Whether `step` is validated, logged and checkpointed: step 0 (the start), the last step, every
        --log_interval, and every --early_log_interval up to --early_log_until."""
        args = self.args
        return (step % args.log_interval == 0 or step == args.num_train_iterations
                or (step <= args.early_log_until and step % args.early_log_interval == 0))

    def log_schedule(self):
        args = self.args
        if args.early_log_until and args.early_log_interval < args.log_interval:
            return (f"at step 0, every {args.early_log_interval} iterations up to {args.early_log_until} and every "
                    f"{args.log_interval} after")
        return f"at step 0 and every {args.log_interval} iterations"

    def validation_pending(self):
        """At a log step whose validation has not finished: a fresh run's step 0, a step stopped between its
        update and the end of its validation, or a resumed step whose validation was stopped (the saved
        step is marked, and a resume validates it first)."""
        return self.validated != self.iteration and (self.validated is None or self.is_log_step(self.iteration))

    def train_step(self):
        """One outer iteration over this rank's share of the meta-batch; returns the mean outer loss."""
        args = self.args
        # Dropout draws from a stream that is a pure function of (seed, iteration, rank): a resumed run
        # repeats it exactly, and ranks do not share masks.
        torch.manual_seed(runs.stream_seed(args.random_seed, self.iteration, self.dist.rank))
        size = self.dataset.batch_size  # --batch_size, at most the training users
        batch = self.dataset.train_batch(self.iteration, self.dist.shard(size)).to(self.device)
        loss = meta_train_step(self.learner, self.optimizer, self.scheduler, batch, args, self.iteration, size,
                               self.dist)
        if math.isfinite(loss):
            self.iteration += 1
        return loss

    def train(self, writer):
        args = self.args
        if writer is not None:  # recorded in the checkpoints, for a resumed run to write on
            self.log_folder = os.path.basename(writer.log_dir)
        val_tasks = self.dataset.val_tasks()
        if self.dist.is_main:
            dataset, validated = self.dataset, len(val_tasks.support_items)
            capped = f" (--val_size={args.val_size} capped)" if validated < args.val_size else ""
            batch = (f"; every meta-batch all {dataset.batch_size} of them (--batch_size={args.batch_size} "
                     "capped)" if dataset.batch_size < args.batch_size else "")
            print(f"{args.mode}: {len(dataset.train_users)} training, {len(dataset.val_users)} validation and "
                  f"{len(dataset.test_users)} test users, {self.data.num_items} items{batch}; validating on "
                  f"{validated} users{capped} {self.log_schedule()}; duplicates: "
                  f"{duplicates_note(self.data.duplicates_dropped, args)}")
        bar = progress(range(self.iteration, args.num_train_iterations), initial=self.iteration,
                       total=args.num_train_iterations, disable=not self.dist.is_main)
        try:
            if self.validation_pending():  # step 0 of a fresh run, or resumed at a step whose validation was stopped
                self.validate_and_save(val_tasks, writer)
            for _ in bar:
                check_stop()  # stop signals act here and between validation batches, never inside torch.func
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise self.diverged(f"the outer loss became {loss} at iteration {self.iteration + 1}",
                                        self.iteration + 1)
                self.recent.append(loss)
                bar.set_postfix(loss=f"{loss:.4f}")
                if writer is not None:
                    writer.add_scalar("train/outer_loss", loss, self.iteration)
                check_stop()  # the step that was running when the signal came is saved
                if self.validation_pending():
                    self.validate_and_save(val_tasks, writer)
        except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM, raised by check_stop
            what, status = interruption(error)
            path = self.save()
            pending = (" before its validation finished (the resumed run validates it first)"
                       if self.validation_pending() else "")
            print(f"\n{what}: saved step {self.iteration} to {path}{pending}; resume with "
                  f"--checkpoint_step={self.iteration}", file=sys.stderr)
            raise SystemExit(status)

    def validate_and_save(self, val_tasks, writer):
        report = self.evaluate(val_tasks)
        if not math.isfinite(report["rmse"]):
            raise self.diverged(f"the validation RMSE became {report['rmse']} at step {self.iteration}", self.iteration)
        self.warn_if_diverging(report, val_tasks)
        train_loss = f"{sum(self.recent) / len(self.recent):.4f}" if self.recent else "-"  # none before step 1
        # best["rmse"] holds the best validation --select_by (RMSE by default; the name is the checkpoint's)
        if report[self.args.select_by] < self.best["rmse"]:
            self.best = {"rmse": report[self.args.select_by], "step": self.iteration, "report": report,
                         "state": state_copy(self.learner)}
        self.validated, self.recent = self.iteration, []
        path = self.save()
        if self.dist.is_main:
            tqdm.write(f"step {self.iteration}: train loss {train_loss} | val RMSE {report['rmse']:.4f} "
                       f"MAE {report['mae']:.4f} mean per-rating RMSE {report['mean_per_rating_rmse']:.4f} | "
                       f"best {self.args.select_by} {self.best['rmse']:.4f} at step {self.best['step']} | "
                       f"saved {path}")
        if writer is not None:
            self.log_to_tensorboard(writer, report)

    def log_to_tensorboard(self, writer, report):
        step = self.iteration
        for key in ("rmse", "mae", "mean_per_rating_rmse"):
            writer.add_scalar(f"val/{key}", report[key], step)
        for rating, row in report["per_rating"].items():
            writer.add_scalar(f"val_rmse_per_rating/{rating}", row["rmse"], step)
        writer.add_figure("val/per_rating", figures.report_figure(report), step)
        for name, rates in self.learner.lslr.rates_by_parameter().items():
            for k, rate in enumerate(rates):
                writer.add_scalar(f"inner_lr/step{k}/{name}", rate, step)
        for k, weight in enumerate(step_weights(self.args, self.iteration).tolist()):
            writer.add_scalar(f"multi_step_loss/step{k}", weight, step)
        for i, group in enumerate(self.optimizer.param_groups):
            writer.add_scalar(f"meta_lr/group{i}", group["lr"], step)
        self.log_adaptive_weights(writer, step)
        writer.flush()

    def log_adaptive_weights(self, writer, step):
        """Mean weight the learned loss gives to each rating value on a fixed training meta-batch, over the
        inner steps and at each step (the weights vary by step with --task_state=per_step)."""
        if not self.learner.inner_loss.has_weights:
            return
        self.learner.eval()
        found = support_weights(self.learner, self.dataset.train_batch(0).to(self.device))
        self.learner.train()
        overall, per_step = mean_weight_by_rating(weight_sums_by_rating(*found, self.data.max_rating))
        for rating, weight in overall.items():
            writer.add_scalar(f"adaptive_weight/rating_{rating}", weight, step)
        for k, weights in enumerate(per_step):
            for rating, weight in weights.items():
                writer.add_scalar(f"adaptive_weight_step{k}/rating_{rating}", weight, step)


def test(trainer):
    args = trainer.args
    checkpoint, which, from_best = trainer.load_tested()
    if checkpoint.get("pending_validation") and args.test_best:
        print(f"warning: {trainer.checkpoint_path(args.checkpoint_step)} was saved before its own validation "
              f"finished: its best weights are those of the steps before; resume it once to validate it",
              file=sys.stderr)
    tasks = trainer.dataset.test_tasks()
    predicted, weight_sums = trainer.predictions(tasks, with_weights=True)
    report = trainer.report(tasks, predicted, weight_sums)
    report["query_gradient_by_rating"], report["query_gradient_by_share"] = trainer.query_gradients(tasks)
    val_tasks = trainer.dataset.val_tasks()  # their predictions too, for compare.py's blend with the fold-in
    val_predicted, _ = trainer.predictions(val_tasks)
    report.update(method=trainer.prefix.rsplit("_", 1)[1], model=args.model, mode=args.mode,
                  checkpoint_step=args.checkpoint_step, weights=which, random_seed=args.random_seed,
                  model_init_seed=args.model_init_seed, select_by=args.select_by,
                  **trainer.backbone.rating_head.reported_start())
    if checkpoint.get("best_report") is not None and from_best:  # what chose these weights
        report["validation"] = {key: checkpoint["best_report"][key] for key in ("rmse", "mae", "mean_per_rating_rmse")}
        report["validation"]["step"] = checkpoint["best_step"]
    if trainer.dist.is_main:
        metrics.publish(report, f"test {trainer.prefix}, {which}",
                        runs.meta_report_path(args, trainer.prefix, args.checkpoint_step),
                        metrics.prediction_frame(tasks, predicted, trainer.data),
                        metrics.prediction_frame(val_tasks, val_predicted, trainer.data), trainer.fingerprint)
    return report


def test_baseline(trainer):
    """The baselines of --baseline (baselines.py) on the test targets: {name: report}."""
    args = trainer.args
    names = baselines.BASELINES if args.baseline == "all" else (args.baseline,)
    return {name: baselines.test(args, trainer.data, trainer.dataset, name, publish=trainer.dist.is_main)
            for name in names}


def main(args):
    configure_cpu(args)
    seed_everything(args.random_seed)
    with Distributed(args.device) as dist:
        trainer = MetaTrainer(args, dist)
        if args.test_baseline:
            return test_baseline(trainer)
        if args.test:
            return test(trainer)
        return train_run(trainer)


if __name__ == "__main__":
    run_cli(main)
