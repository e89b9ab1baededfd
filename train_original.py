"""The non-meta baseline ("Basic"): a backbone trained on the training users' windows, no meta-learning.

    python train_original.py --model=bert4rec                      # train (100 epochs by default)
    python train_original.py --model=bert4rec --checkpoint_step=N  # resume after epoch N
    python train_original.py --model=bert4rec --checkpoint_step=N --test                     # no adaptation
    python train_original.py --model=bert4rec --checkpoint_step=N --test --finetune_steps=5  # fine-tuning
    python train_original.py --model=bert4rec --checkpoint_step=N --test \\
        --finetune_lr_grid=0.01,0.1 --finetune_steps_grid=1,5            # lr and steps chosen on validation
    python train_original.py --save_pretrained=True && python main.py --load_pretrained_embedding=True
    torchrun --standalone --nproc_per_node=K train_original.py ...   # DistributedDataParallel, K processes

Same footing as main.py: the same data flags, the same cold-start split (`MetaDataset`), the same
per-position loss (masked mean squared error of ratings / max rating), and the same fixed validation and
test targets (the last position of every query window of `val_tasks()` / `test_tasks()`), scored by the
same `metrics` code. An epoch is one pass over `MetaDataset.window_dataset(epoch)`: for every training
user, the support and query windows of one training-style task, shuffled by torch's DistributedSampler
seeded with (seed, epoch), and dropout is seeded per (seed, epoch, rank), so an epoch is a pure function
of the seed and a resumed run is identical to an uninterrupted one.

Under `torchrun --nproc_per_node=K train_original.py ...` the backbone (and encoder) is wrapped in
DistributedDataParallel: each global batch of --pretraining_batch_size windows is dealt over the ranks by
torch's DistributedSampler, the squared errors are normalised by the real positions of the whole global
batch, so a step equals the single-process step (with --use_learned_loss_baseline the encoder's weights
are normalised to mean 1 within each rank's shard instead), and validation and test tasks are sharded
with their error sums added up. Only rank 0 writes checkpoints, logs, reports.

After every epoch the validation targets are scored (the backbone predicts the query windows directly),
TensorBoard is written under `--log_dir`, and `<pretrain_log_dir>/<model>_<mode>_<method>_step<epoch>.pt`
is saved with the best-so-far weights inside; only the latest and the best epoch's files are kept.
`--test` scores the best weights (or, with `--test_best=False`, those of exactly that epoch) on the test
targets and writes the report as JSON beside the checkpoint.

`--finetune_steps=K` (with `--test`): for each test user, a copy of the weights takes K plain SGD steps
(`--finetune_lr`, on the MSE of that user's support windows, dropout off) before its query windows are
predicted: the fine-tuning baseline between "no adaptation" and MAML. The copies are batched with
`torch.func.vmap`, `--batch_size` users at a time. With `--finetune_lr_grid` and / or
`--finetune_steps_grid` the (lr, K) pair is chosen on the validation tasks by `--select_by` (one pass of
max K steps per lr scores every K); where the choice sits on an edge of a grid (the largest lr or K, the
smallest lr, or the smallest K above 0), that grid is extended (x2, /2) up to 3 times (tuning.py), and the
report records the choice, every pair's score, the grid searched and any axis still `at_edge`.

`--use_learned_loss_baseline=True` weights each position's squared error with MELO's rating-sequence
encoder (`models.loss_networks.RatingSequenceEncoder`, each window read as a task of one window), trained
jointly with the backbone by the same Adam. Minimising a weighted loss over the weights too has a trivial
solution: shrink every weight towards zero. So the weights are normalised to mean 1 over the batch's real
positions (the normaliser is part of the graph, computed in log space so it stays exact when every
sigmoid is tiny): the encoder can only move weight between positions, and the loss keeps the scale of the
plain MSE. Its head starts at zero, so training starts as the plain MSE.
"""
from common import errors

if __name__ == "__main__":  # before the imports below, which take seconds (torch)
    errors.say_when_terminated()

import math
import os
import sys

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from common.errors import MeloError
from common.runtime import Distributed, check_stop, configure_cpu, interruption, progress, seed_everything
from evaluation import metrics, tuning
from meta_learner import adapt
from models import export_weights, model_factory
from models.loss_networks import RatingSequenceEncoder, masked_mean
from options import build_parser, run_cli
from ratings.tasks import STREAM_WINDOWS
from training import checkpointing, runs
from training.trainers import Trainer, state_copy, step_alias, train_run


def normalised_weights(logits, mask):
    """sigmoid(logits) divided by its mean over the real positions (so their mean is exactly 1), computed
    in log space: exact even where every sigmoid underflows."""
    log_weights = torch.nn.functional.logsigmoid(logits).masked_fill(~mask, torch.finfo(logits.dtype).min)
    log_mean = torch.logsumexp(log_weights.flatten(), 0) - torch.log(mask.sum().clamp_min(1).to(logits.dtype))
    return torch.exp(log_weights - log_mean) * mask


class WindowLoss(nn.Module):
    """The training loss of a batch of windows as one module, so that DistributedDataParallel can wrap the
    backbone and the optional learned-loss encoder together. Returns the sum of the (weighted) squared
    errors of normalised ratings over the real positions, and the number of those positions. The learned
    weights are normalised to mean 1 over this batch's positions (under torchrun: this rank's shard)."""

    def __init__(self, backbone, encoder, max_rating):
        super().__init__()
        self.backbone, self.encoder, self.max_rating = backbone, encoder, max_rating

    def forward(self, items, ratings):
        labels = ratings / self.max_rating
        mask = items != 0
        errors = (self.backbone(items) - labels) ** 2
        if self.encoder is not None:
            logits = self.encoder(labels[:, None], mask[:, None]).squeeze(1)  # each window a task of one window
            errors = normalised_weights(logits, mask) * errors
        return (errors * mask).sum(), mask.sum()


class BaselineTrainer(Trainer):
    folder_flag, unit, total_flag, remedy = "--pretrain_log_dir", "epoch", "--pretrain_epochs", "--pretraining_lr"
    required, best_key = ("model_state", "encoder_state", "best_model_state"), "best_model_state"
    epoch = step_alias()

    def __init__(self, args, dist=None):
        super().__init__(args, dist if dist is not None else Distributed(args.device))
        self.max_rating = float(self.data.max_rating)
        self.model = model_factory(args, self.data.num_items).to(self.device)
        if args.checkpoint_step < 0:
            self.start_head()
        self.encoder = None
        if args.use_learned_loss_baseline:
            with torch.random.fork_rng(devices=[]), torch.device("cpu"):
                torch.default_generator.manual_seed(args.model_init_seed + 1)  # as main.py's loss networks
                self.encoder = RatingSequenceEncoder(self.max_rating, args.lstm_input_size, args.lstm_hidden,
                                                     args.lstm_num_layers)
            self.encoder.to(self.device)
        self.window_loss = WindowLoss(self.model, self.encoder, self.max_rating)
        self.training_loss = self.window_loss  # wrapped in DDP when training under torchrun (train())
        head_tables = self.model.rating_head.parameters_of(self.model) if args.bias_outer_lr is not None else {}
        rest = [p for name, p in self.window_loss.named_parameters()
                if name.removeprefix("backbone.") not in head_tables]
        groups = [{"params": rest}] + ([{"params": list(head_tables.values()), "lr": args.bias_outer_lr}]
                                       if head_tables else [])
        self.optimizer = torch.optim.Adam(groups, lr=args.pretraining_lr)
        self.prefix = runs.basic_prefix(args)
        self.shape = runs.basic_shape_options(args, self.data)

    # ------------------------------------------------------------------ loss
    def loss(self, items, ratings):
        """The masked mean squared error of normalised ratings over real positions, weighted by the
        rating-sequence encoder with --use_learned_loss_baseline (weights of mean 1, see the docstring)."""
        error_sum, count = self.window_loss(items, ratings)
        return error_sum / count.clamp_min(1)

    def epoch_batches(self, epoch):
        """This rank's batches of the shuffled training windows of `epoch`.

        torch's DistributedSampler deals a permutation of the windows round-robin over the K ranks (rank r
        gets positions r, r + K, ...; its padding repeats are dropped). Of the j-th global batch, positions
        [jB, (j + 1)B) with B = --pretraining_batch_size, rank r takes the positions that are its own, so
        the union over ranks of their j-th batches is exactly the j-th batch a single process takes, for
        any K; every rank yields the same number of batches (some possibly empty)."""
        items, ratings = self.dataset.window_dataset(epoch)
        ranks, rank, size = self.dist.world_size, self.dist.rank, self.args.pretraining_batch_size
        # The sampler shuffles with seed + epoch: a seed of its own stream keeps (seed, epoch + 1) and
        # (seed + 1, epoch) apart. 62 bits, so that seed + epoch stays a valid int64.
        sampler = DistributedSampler(range(len(items)), num_replicas=ranks, rank=rank, shuffle=True,
                                     seed=runs.stream_seed(self.args.random_seed, STREAM_WINDOWS) >> 1)
        sampler.set_epoch(epoch)
        mine = torch.tensor(list(sampler), dtype=torch.long)[:len(range(rank, len(items), ranks))]

        def first_own(position):  # index in `mine` of this rank's first position >= `position`
            return -((rank - position) // ranks)

        for start in range(0, len(items), size):
            index = mine[first_own(start):first_own(start + size)]
            yield items[index].to(self.device), ratings[index].to(self.device)

    @property
    def tested_module(self):
        return self.model

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self):
        return {
            "training_options": self.training_options(),
            "model_state": state_copy(self.model),
            "encoder_state": state_copy(self.encoder) if self.encoder is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "best_model_state": self.best["state"],
        }

    def save(self):
        """Save this epoch's checkpoint, then remove this run's other step files but the best epoch's and
        epoch 0's (the start, which --step_choice=one-se compares with)."""
        path = super().save()
        if path is not None:
            for step in checkpointing.available_steps(self.directory, self.prefix):
                if step not in (self.epoch, self.best["step"], 0):
                    os.remove(self.checkpoint_path(step))
        return path

    def restore(self, checkpoint, path, restore_training):
        checkpointing.load_state(self.model, checkpoint["model_state"], path, "weights")
        if self.encoder is not None:
            checkpointing.load_state(self.encoder, checkpoint["encoder_state"], path, "encoder weights")
        self.best = {"rmse": checkpoint["best_rmse"], "step": checkpoint["best_step"],
                     "state": checkpoint["best_model_state"]}
        if restore_training:
            checkpointing.require_keys(checkpoint, ("optimizer",), path)
            warning = runs.resume_warning(path, checkpoint.get("training_options", {}), self.args,
                                          runs.basic_training_option_names(), self.epoch)
            if warning and self.dist.is_main:
                print(warning, file=sys.stderr)
            # Adam's moments from the checkpoint, the learning rates of the flags given now (as main.py's)
            checkpointing.load_optimizer_moments(self.optimizer, checkpoint["optimizer"], path, ("lr", "weight_decay"))

    def training_options(self):
        """What this run's numbers depend on beyond its shape options (runs.BASIC_TRAINING_OPTIONS)."""
        return {key: getattr(self.args, key) for key in runs.basic_training_option_names()}

    def finish(self, writer):
        if self.args.save_pretrained and self.dist.is_main:
            self.export()

    # ------------------------------------------------------------------ evaluation
    def predict(self, tasks, lr=None, record=None, user_start=True):
        """Predicted stars [R, T, Q] for the last position of every query window, after each of the R
        fine-tuning step counts in `record` (default: --finetune_steps; 0 = the backbone as it is, but for
        b_user's fold-in start under --user_bias_start=fold-in, unless not `user_start`) with SGD learning
        rate `lr` (default --finetune_lr), a copy of the weights per task."""
        lr = self.args.finetune_lr if lr is None else lr
        record = (self.args.finetune_steps,) if record is None else tuple(record)
        self.model.eval()
        predictions = []
        # b_user's fold-in start needs the support set
        if max(record) or (user_start and self.model.rating_head.user_bias_reg is not None):
            for start in range(0, len(tasks), self.args.batch_size):
                chunk = tasks.select(slice(start, start + self.args.batch_size)).to(self.device)
                predictions.append(self.finetuned_predictions(chunk, lr, record, user_start).cpu())
        else:
            per_chunk = max(1, self.args.pretraining_batch_size // max(1, tasks.query_items.shape[1]))
            with torch.no_grad():
                for start in range(0, len(tasks), per_chunk):
                    items = tasks.query_items[start:start + per_chunk].to(self.device)
                    predicted = self.model(items.flatten(0, 1)).view(items.shape)[..., -1]
                    predictions.append((predicted * self.max_rating).cpu().expand(len(record), *predicted.shape))
        self.model.train()
        if not predictions:
            return torch.zeros(len(record), *tasks.query_mask.shape)
        return self.clipped(torch.cat(predictions, dim=1))

    def finetuned_predictions(self, tasks, lr=None, record=None, user_start=True):
        """SGD steps per task on its own copy of the weights (vmapped over tasks), from b_user's fold-in start
        (with `user_start`); the predictions [R, T, Q] after each step count of `record` (default
        (--finetune_steps,)), with learning rate `lr`."""
        lr = self.args.finetune_lr if lr is None else lr
        record = (self.args.finetune_steps,) if record is None else tuple(record)
        params = {name: p.detach() for name, p in self.model.named_parameters()}
        buffers = {name: b.detach() for name, b in self.model.named_buffers()}
        model = self.model

        def one_task(items, labels, age, query_items):
            def support_loss(current, step):
                predicted = functional_call(model, {**current, **buffers}, (items,))
                return masked_mean((predicted - labels) ** 2, items != 0), ()

            def sgd(current, grads, step):
                return {name: value - lr * grads[name] for name, value in current.items()}

            def query(current):
                return functional_call(model, {**current, **buffers}, (query_items,))[:, -1]

            start = model.rating_head.task_start(model, params, items, labels, items != 0, age=age) if user_start \
                else params
            recorded = {0: query(start)} if 0 in record else {}

            def after_step(step, current, aux):
                if step + 1 in record:
                    recorded[step + 1] = query(current)

            adapt(start, support_loss, sgd, max(record), after_step=after_step)
            return torch.stack([recorded[step] for step in record])

        labels = tasks.support_ratings / self.max_rating
        predicted = vmap(one_task, randomness="different", out_dims=1)(tasks.support_items, labels,
                                                                       tasks.support_age, tasks.query_items)
        return predicted.detach() * self.max_rating

    def validation_stars(self, tasks):
        return self.predictions(tasks)[0]

    def predictions(self, tasks, lr=None, record=None, user_start=True):
        """predict() of a whole fixed task set: under torchrun the tasks are sharded and each rank's rows
        added into zeros, so every rank gets all of them (and the report equals a single process's)."""
        part = self.dist.shard(len(tasks))
        mine = self.predict(tasks.select(part), lr, record, user_start)
        full = torch.zeros(mine.shape[0], *tasks.query_mask.shape, dtype=torch.float64, device=self.device)
        full[:, part] = mine.double().to(self.device)
        return self.dist.sum_(full).cpu()

    def evaluate(self, tasks):
        """Report over a fixed task set (per window, and per user under "per_user"), scored as --test scores
        Basic: with b_user's (and p_user's) fold-in start from each user's support set under
        --user_bias_start=fold-in, so the best epoch is the best Basic as tested (and epoch 0, the
        untrained model, is the fold-in itself)."""
        return metrics.task_report(self.validation_stars(tasks), tasks, self.max_rating)

    def choose_finetuning(self, tasks):
        """The (lr, steps) of --finetune_lr_grid x --finetune_steps_grid (an empty grid: the single
        --finetune_lr / --finetune_steps) with the lowest --select_by on `tasks`, each grid extended where
        the choice sits on its edge (tuning.search); every pair's score, and the chosen pair's predictions."""
        args = self.args
        axes = [tuning.Axis("lr", tuple(args.finetune_lr_grid or [args.finetune_lr])),
                tuning.Axis("steps", tuple(sorted(set(args.finetune_steps_grid or [args.finetune_steps]))),
                            integer=True)]
        predicted = {}

        def score(points):
            for lr in dict.fromkeys(lr for lr, _ in points):  # one pass per lr records all of its step counts
                counts = [count for other, count in points if other == lr]
                predicted.update(((lr, count), found) for count, found in
                                 zip(counts, self.predictions(tasks, lr, counts)))
            return [metrics.task_report(predicted[point], tasks, self.max_rating)[args.select_by] for point in points]

        (lr, steps), searched = tuning.search(axes, score)
        scored = [{"lr": lr_, "steps": count, "score": value}
                  for (lr_, count), value in zip(searched["points"], searched["scores"])]
        return lr, steps, {"select_by": args.select_by, "validation_scores": scored, "axes": searched["axes"],
                           "extensions": searched["extensions"], "at_edge": searched["at_edge"]}, predicted[lr, steps]

    # ------------------------------------------------------------------ training
    def train_epoch(self, bar):
        # Dropout draws from a stream of (seed, epoch, rank): a resumed run repeats it, ranks differ.
        torch.manual_seed(runs.stream_seed(self.args.random_seed, STREAM_WINDOWS, self.epoch, self.dist.rank))
        total, count = 0.0, 0
        for items, ratings in self.epoch_batches(self.epoch):
            check_stop()  # a stop signal acts between batches, never inside autograd or torch.func
            with self.dist.communicating():  # DDP's forward and backward talk to the other ranks
                error_sum, positions = self.training_loss(items, ratings)
            # The loss is the mean over the real positions of the whole global batch, on every rank alike.
            sums = self.dist.sum_(torch.stack([error_sum.detach().double(), positions.double()]))
            loss = (sums[0] / sums[1].clamp_min(1)).item()
            if not math.isfinite(loss):
                raise self.diverged(f"the training loss became {loss} in epoch {self.epoch + 1}", self.epoch + 1)
            self.optimizer.zero_grad(set_to_none=True)
            # DDP divides the summed gradients by the world size; multiplying by it here leaves the gradient
            # of the global mean.
            with self.dist.communicating():
                (error_sum * (self.dist.world_size / sums[1].clamp_min(1).to(error_sum.dtype))).backward()
            self.optimizer.step()
            total, count = total + sums[0].item(), count + sums[1].item()
            bar.set_postfix(loss=f"{loss:.4f}")
        self.epoch += 1
        return total / max(count, 1)

    def train(self, writer):
        args = self.args
        if writer is not None:  # recorded in the checkpoints, for a resumed run to write on
            self.log_folder = os.path.basename(writer.log_dir)
        if self.dist.enabled and self.training_loss is self.window_loss:
            # DDP averages the gradients over ranks during backward (first-order training, so its hooks
            # are exact here; main.py's second-order meta-gradients are all-reduced by hand).
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.training_loss = DistributedDataParallel(self.window_loss, device_ids=device_ids)
        val_tasks = self.dataset.val_tasks()
        bar = progress(range(self.epoch, args.pretrain_epochs), initial=self.epoch, total=args.pretrain_epochs,
                       desc=f"{self.prefix} epochs", disable=not self.dist.is_main)
        try:
            if self.epoch == 0:  # a fresh run: epoch 0, the untrained start, is validated and saved too
                check_stop()
                self.validate_and_save(val_tasks, writer, None)
            for _ in bar:
                check_stop()  # after the last finished epoch was saved
                train_loss = self.train_epoch(bar)
                self.validate_and_save(val_tasks, writer, train_loss)
        except KeyboardInterrupt as error:  # Ctrl-C or SIGTERM, raised by check_stop
            # Mid-epoch state cannot be resumed exactly: the last finished epoch's checkpoint stands.
            what, status = interruption(error)
            saved = checkpointing.available_steps(args.pretrain_log_dir, self.prefix)
            if self.dist.is_main:
                print(f"\n{what} in epoch {self.epoch + 1}; resume with --checkpoint_step="
                      f"{saved[-1] if saved else 'none (nothing saved yet)'}", file=sys.stderr)
            raise SystemExit(status)

    def validate_and_save(self, val_tasks, writer, train_loss):
        """Score this epoch on the validation tasks, keep the best weights and save the epoch's checkpoint;
        `train_loss`: the epoch's mean training loss (None at epoch 0)."""
        args = self.args
        report = self.evaluate(val_tasks)
        if not math.isfinite(report["rmse"]):
            raise self.diverged(f"the validation RMSE became {report['rmse']} after epoch {self.epoch}", self.epoch)
        self.warn_if_diverging(report, val_tasks)
        # best["rmse"] holds the best validation --select_by (the checkpoint's name for it)
        if report[args.select_by] < self.best["rmse"]:
            self.best = {"rmse": report[args.select_by], "step": self.epoch, "state": state_copy(self.model)}
        path = self.save()
        if self.dist.is_main:
            loss = "-" if train_loss is None else f"{train_loss:.4f}"
            tqdm.write(f"epoch {self.epoch}: train loss {loss} | val RMSE {report['rmse']:.4f} MAE {report['mae']:.4f} "
                       f"mean per-rating RMSE {report['mean_per_rating_rmse']:.4f} | best {args.select_by} "
                       f"{self.best['rmse']:.4f} at epoch {self.best['step']} | saved {path}")
        if writer is not None:
            if train_loss is not None:
                writer.add_scalar("train/loss", train_loss, self.epoch)
            for key in ("rmse", "mae", "mean_per_rating_rmse"):
                writer.add_scalar(f"val/{key}", report[key], self.epoch)
            for rating, row in report["per_rating"].items():
                writer.add_scalar(f"val_rmse_per_rating/{rating}", row["rmse"], self.epoch)
            writer.flush()

    def best_weights(self):
        return self.best["state"] if self.best["state"] is not None else state_copy(self.model)

    def export(self):
        """Save the best weights where main.py --load_pretrained[_embedding]=True finds them."""
        model = model_factory(self.args, self.data.num_items)
        model.load_state_dict(self.best_weights())
        exported = export_weights(model)
        # Extra context for people reading the file; main.py checks the model name and every shape.
        exported.update(mode=self.args.mode, shape_options=self.shape, best_step=self.best["step"],
                        random_seed=self.args.random_seed, data_fingerprint=self.fingerprint,
                        pretrain_epochs=self.args.pretrain_epochs, model_init_seed=self.args.model_init_seed,
                        training_options=self.training_options())  # ablation.py reuses it only for these
        path = runs.pretrained_path(self.args)
        checkpointing.save_atomic(exported, path)
        folder = ("" if self.args.pretrain_log_dir == build_parser().get_default("pretrain_log_dir")
                  else f" --pretrain_log_dir={self.args.pretrain_log_dir}")
        print(f"pretrained weights (best epoch {self.best['step']}) saved to {path}: use them with python "
              f"main.py --model={self.args.model} --mode={self.args.mode}{folder} --load_pretrained_embedding=True "
              f"(or --load_pretrained=True), with the same data and size flags")
        return path


def test(trainer):
    args = trainer.args
    _, which, _ = trainer.load_tested()
    lr, steps, selection = args.finetune_lr, args.finetune_steps, None
    val_tasks = trainer.dataset.val_tasks()
    if runs.tuned_finetuning(args):
        lr, steps, selection, val_predicted = trainer.choose_finetuning(val_tasks)
    else:  # the validation users' predictions too, for compare.py's blend with the fold-in
        val_predicted = trainer.predictions(val_tasks, lr, (steps,))[0]
    if steps:
        which += f", fine-tuned {steps} SGD steps (lr {lr:g}{', chosen on validation' if selection else ''}) per user"
    tasks = trainer.dataset.test_tasks()
    predicted = trainer.predictions(tasks, lr, (steps,))[0]
    report = metrics.task_report(predicted, tasks, trainer.max_rating)
    report.update(method="finetune" if steps or selection else runs.basic_method(args), model=args.model,
                  mode=args.mode, checkpoint_step=args.checkpoint_step, weights=which,
                  random_seed=args.random_seed, model_init_seed=args.model_init_seed, select_by=args.select_by,
                  finetune_steps=steps, finetune_lr=lr, **trainer.backbone.rating_head.reported_start())
    if selection is not None:
        report["finetune_selection"] = selection
    if trainer.dist.is_main:
        metrics.publish(report, f"test {trainer.prefix}, {which}", runs.basic_report_path(args, args.checkpoint_step),
                        metrics.prediction_frame(tasks, predicted, trainer.data),
                        metrics.prediction_frame(val_tasks, val_predicted, trainer.data), trainer.fingerprint)
    return report


def main(args):
    configure_cpu(args)
    seed_everything(args.random_seed)
    if args.test_baseline:
        raise MeloError("--test_baseline belongs to main.py: python main.py --test_baseline")
    if args.load_pretrained or args.load_pretrained_embedding:
        raise MeloError("--load_pretrained / --load_pretrained_embedding are main.py's; train_original.py "
                        "resumes its own runs with --checkpoint_step=N")
    with Distributed(args.device) as dist:
        trainer = BaselineTrainer(args, dist)
        if args.test:
            return test(trainer)
        return train_run(trainer)


if __name__ == "__main__":
    run_cli(main)
