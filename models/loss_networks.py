"""Inner-loop losses: plain MSE (MAML++) and MELO's learned, task-adaptive loss.

Every inner loss is used in two phases, so that the part that only reads labels runs once per task and
outside `vmap`, and the part that depends on the adapted parameters is a plain function of tensors:

    context = loss.prepare(support_labels[T, S, L], support_mask[T, S, L])   # once per meta-batch
    value   = loss(predictions[S, L], labels[S, L], mask[S, L], context_of_one_task, step)  # per task

`labels` are ratings divided by the data set's maximum rating; `mask` marks real (unpadded) positions.
The returned inner loss is always a masked mean over real positions, so its scale does not depend on
how many windows a user has.
"""
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from evaluation.metrics import half_star_buckets, num_half_star_buckets

# How a position's logit z becomes its weight (--adaptive_weights). The weight network's last layer starts
# at zero, so every form starts with every weight exactly 1: MELO starts as plain MAML++.
#   normalised: WEIGHT_FLOOR + 2·sigmoid(z), divided by its mean over the task's real support positions
#       (mean exactly 1): the learned inner rates own the step size, the weights only move it between
#       positions. The floor bounds the ratio of two weights (at most 21), so that no task's whole weight
#       can pile onto a few positions.
#   centred:    normalised, from z minus its task mean, so that the logits cannot all saturate together
#       (then every weight is exactly 1 and the gradient vanishes: a dead loss network).
#   bounded:    2·sigmoid(z), in (0, 2), per position.
#   unbounded:  |1 + z|, the original MELO's |Linear(LSTM state)|, shifted to start at 1.
# What each form did on data: docs/design.md (the inner loop) and docs/comparison.md (the ablation).
WEIGHT_FLOOR = 0.1


def masked_mean(values, mask):
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def task_mean(values, mask):
    """The mean of `values` [.., S, L] over the real positions of the last two dims (one task's support
    set), shaped [.., 1, 1]."""
    mask = mask.to(values.dtype)
    dims = (values.dim() - 2, values.dim() - 1)
    return (values * mask).sum(dims, keepdim=True) / mask.sum(dims, keepdim=True).clamp_min(1.0)


def normalise_over_task(raw, mask):
    """`raw` [.., S, L] divided by its mean over the task's real positions: mean exactly 1 over them,
    whatever the task's size."""
    return raw / task_mean(raw, mask).clamp_min(torch.finfo(raw.dtype).tiny)


def rating_bucket_ids(labels, mask, max_rating):
    """Half-star bucket of each rating (1 .. 2*max_rating, metrics.half_star_buckets); 0 is padding."""
    ids = half_star_buckets(labels * max_rating).clamp(1, num_half_star_buckets(max_rating) - 1)
    return torch.where(mask, ids, torch.zeros_like(ids))


def _mlp(sizes, zero_last=True):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    if zero_last:
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
    return nn.Sequential(*layers)


def query_loss(predictions, labels, mask, kind="all", target_weights=None):
    """The outer loss of one task after adaptation (--query_loss `kind`): the mean squared error over every
    real position of its query windows (all), or over the held-out last position of each window (target),
    each of those squared errors times its `target_weights` [Q] (balanced)."""
    if kind == "all":
        return masked_mean((predictions - labels) ** 2, mask)
    squared_errors = (predictions[:, -1] - labels[:, -1]) ** 2
    if kind == "balanced":
        squared_errors = squared_errors * target_weights
    return masked_mean(squared_errors, mask[:, -1])


class MSEInnerLoss(nn.Module):
    """Plain MAML++: the masked mean squared error."""

    has_weights = False

    def prepare(self, support_labels, support_mask, support_age=None):
        return {}

    def terms(self, predictions, labels, mask, context, step):
        """Each position's term of the loss [S, L] (the loss is their masked mean)."""
        return (predictions - labels) ** 2

    def forward(self, predictions, labels, mask, context, step):
        return masked_mean(self.terms(predictions, labels, mask, context, step), mask)


class RatingSequenceEncoder(nn.Module):
    """MELO's task-state encoder: an LSTM reads the rating sequence of each support window.

    The task state is the mean of the windows' final states; each position's weight comes from the task
    state, the LSTM state at that position and the position's own rating (and, with `extra_inputs`, what
    the caller appends per position: the current prediction, error and step), so the weight of a rating
    can depend on how common that rating is for this user. The LSTM reads labels only, so it runs outside
    the inner loop and `nn.LSTM` (cuDNN included) is fine here.
    """

    def __init__(self, max_rating, input_size, hidden_size, num_layers, extra_inputs=0, recency=False):
        super().__init__()
        self.max_rating = max_rating
        self.rating_embedding = nn.Embedding(num_half_star_buckets(max_rating), input_size, padding_idx=0)
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.initial_hidden = nn.Parameter(torch.zeros(num_layers, 1, hidden_size))
        self.initial_cell = nn.Parameter(torch.zeros(num_layers, 1, hidden_size))
        # --weight_recency: an embedding of each position's recency (its distance in items from the user's
        # latest support item, the last RECENCY_BUCKETS - 1 and beyond sharing one row)
        self.recency_embedding = nn.Embedding(RECENCY_BUCKETS, input_size) if recency else None
        self.head = _mlp([2 * hidden_size + input_size * (2 if recency else 1) + extra_inputs, hidden_size, 1])

    def features(self, labels, mask, age=None):
        """labels, mask (and with recency, age): [T, S, L] -> per-position features [T, S, L, 2H + E (+ E)]
        (task state, LSTM state at the position, rating embedding, recency embedding)."""
        num_tasks, num_windows, length = labels.shape
        ids = rating_bucket_ids(labels, mask, self.max_rating)
        embedded = self.rating_embedding(ids).flatten(0, 1)  # [T*S, L, E]
        batch = embedded.shape[0]
        state = (self.initial_hidden.expand(-1, batch, -1).contiguous(),
                 self.initial_cell.expand(-1, batch, -1).contiguous())
        outputs, (hidden, _) = self.lstm(embedded, state)
        hidden_size = hidden.shape[-1]  # explicit sizes below: an empty batch (a rank's last shard) works
        window_state = hidden[-1].view(num_tasks, num_windows, hidden_size)
        real_window = mask.any(dim=2, keepdim=True).to(window_state.dtype)  # [T, S, 1]
        task_state = (window_state * real_window).sum(1) / real_window.sum(1).clamp_min(1.0)  # [T, H]
        parts = [
            task_state[:, None, None, :].expand(-1, num_windows, length, -1),
            outputs.view(num_tasks, num_windows, length, hidden_size),
            embedded.view(num_tasks, num_windows, length, embedded.shape[-1]),
        ]
        if self.recency_embedding is not None:
            if age is None:
                raise ValueError("--weight_recency needs the support positions' recency (TaskBatch.support_age)")
            parts.append(self.recency_embedding(age.clamp(0, RECENCY_BUCKETS - 1)))
        return torch.cat(parts, dim=-1)

    def forward(self, labels, mask, age=None):
        """labels, mask (age): [T, S, L] -> per-position logits [T, S, L]."""
        return self.head(self.features(labels, mask, age)).squeeze(-1)


TASK_FEATURES = ("loss", "rating_mean", "rating_std", "labels", "predictions")
RECENCY_BUCKETS = 64


class TaskStatisticsWeightNet(nn.Module):
    """`--use_mlp`: an MLP weight network fed per-position task statistics (`features`, of TASK_FEATURES)."""

    def __init__(self, features, hidden_size):
        super().__init__()
        self.features = [f for f in TASK_FEATURES if f in features]
        if not self.features:
            raise ValueError("--use_mlp needs at least one --task_info_* input set to True")
        self.mlp = _mlp([len(self.features), hidden_size, 1])

    def forward(self, errors, labels, predictions, rating_mean, rating_std):
        available = {"loss": errors, "labels": labels, "predictions": predictions,
                     "rating_mean": rating_mean.expand_as(errors), "rating_std": rating_std.expand_as(errors)}
        return self.mlp(torch.stack([available[f] for f in self.features], dim=-1)).squeeze(-1)


@dataclass(frozen=True)
class LossConfig:
    """What shapes MELO's learned inner loss; `from_args` reads it from the flags of the same names
    (`weight_form`: --adaptive_weights; `task_features`: the --task_info_* set to True)."""
    num_inner_steps: int
    weight_form: str = "normalised"
    task_state: str = "static"
    use_softmax: bool = False
    use_focal_loss: bool = False
    use_mlp: bool = False
    task_features: tuple = TASK_FEATURES
    lstm_input_size: int = 16
    lstm_hidden: int = 32
    lstm_num_layers: int = 1
    use_mlp_mean: bool = False
    use_step_loss: bool = False
    loss_num_layers: int = 2
    weight_recency: bool = False

    @classmethod
    def from_args(cls, args):
        named = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls)
                 if hasattr(args, field.name)}
        return cls(**named, weight_form=args.adaptive_weights,
                   task_features=tuple(f for f in TASK_FEATURES if getattr(args, f"task_info_{f}")))


class AdaptiveInnerLoss(nn.Module):
    """MELO's learned inner loss: a non-negative weight per position times its squared error.

    Options (all trained by the outer loop whenever used):
      weights from the rating-sequence LSTM (default) or from task statistics (`--use_mlp`);
      `--task_state=per_step`: the LSTM's features plus each position's current prediction, error and the
      step, recomputed at every inner step (METAL-style), instead of once per task;
      `--adaptive_weights`: how logits become weights (the forms above);
      `--use_softmax`: weights are a masked softmax over the task's positions (times their count);
      `--use_focal_loss`: each error is scaled by its size relative to the task's mean error;
      `--use_mlp_mean`: a (per-step with `--use_step_loss`) MLP reshapes each weighted error,
      e + MLP(e), METAL-style, before the masked mean.
    """

    has_weights = True

    def __init__(self, config, max_rating):
        super().__init__()
        self.use_softmax = config.use_softmax
        self.use_focal_loss = config.use_focal_loss
        self.weight_form = config.weight_form
        self.num_steps = config.num_inner_steps
        self.per_step = config.task_state == "per_step"
        if config.use_mlp:
            self.encoder, self.weight_net = None, TaskStatisticsWeightNet(config.task_features, config.lstm_hidden)
        else:
            # per step, the head also reads the prediction, its signed error and a one-hot of the step
            extra = 2 + self.num_steps if self.per_step else 0
            self.encoder = RatingSequenceEncoder(max_rating, config.lstm_input_size, config.lstm_hidden,
                                                 config.lstm_num_layers, extra, config.weight_recency)
            self.weight_net = None
        self.loss_mlps = None
        if config.use_mlp_mean:
            count = config.num_inner_steps if config.use_step_loss else 1
            sizes = [1] + [config.lstm_hidden] * (config.loss_num_layers - 1) + [1]
            self.loss_mlps = nn.ModuleList(_mlp(sizes) for _ in range(count))

    def prepare(self, support_labels, support_mask, support_age=None):
        context = {}
        if self.encoder is not None:
            if self.per_step:
                context["features"] = self.encoder.features(support_labels, support_mask, support_age)
            else:
                context["weights"] = self._weights(self.encoder(support_labels, support_mask, support_age),
                                                   support_mask)
        else:
            mask = support_mask.to(support_labels.dtype)
            count = mask.sum((1, 2)).clamp_min(1.0)
            mean = (support_labels * mask).sum((1, 2)) / count
            var = (((support_labels - mean[:, None, None]) ** 2) * mask).sum((1, 2)) / count
            context["rating_mean"], context["rating_std"] = mean, var.sqrt()
        return context

    def _weights(self, logits, mask):
        """Weights of one task's positions (the last two dims) from their logits."""
        if self.use_softmax:
            # Softmax over the real positions of one task (the last two dims), scaled so the mean is 1.
            dims = tuple(range(logits.dim() - 2, logits.dim()))
            masked = torch.where(mask, logits, torch.full_like(logits, torch.finfo(logits.dtype).min))
            flat = masked.flatten(-2).softmax(-1).view_as(logits)
            return flat * mask.sum(dims, keepdim=True).to(logits.dtype)
        if self.weight_form == "unbounded":
            return (1.0 + logits).abs()
        if self.weight_form in ("normalised", "centred"):
            if self.weight_form == "centred":
                logits = logits - task_mean(logits, mask)
            # scaled so that the neutral start is exactly 1 before the mean (x / x == 1 in floating point):
            # then every weight starts at exactly 1 and MELO's first steps are MAML++'s to the bit
            raw = (WEIGHT_FLOOR + 2.0 * torch.sigmoid(logits)) / (WEIGHT_FLOOR + 1.0)
            return normalise_over_task(raw, mask)
        return 2.0 * torch.sigmoid(logits)

    def position_weights(self, predictions, labels, mask, context, step):
        """The weight of each position of one task's support set [S, L] at inner step `step`."""
        if "weights" in context:
            return context["weights"]
        if self.encoder is not None:
            features = context["features"]
            step_code = torch.eye(self.num_steps, dtype=features.dtype, device=features.device)[step]
            inputs = torch.cat([features, predictions[..., None], (predictions - labels)[..., None],
                                step_code.expand(*predictions.shape, -1)], dim=-1)
            logits = self.encoder.head(inputs).squeeze(-1)
        else:
            errors = (predictions - labels) ** 2
            logits = self.weight_net(errors, labels, predictions, context["rating_mean"], context["rating_std"])
        return self._weights(logits, mask)

    def terms(self, predictions, labels, mask, context, step):
        """Each position's whole term of the loss [S, L] (the loss is their masked mean)."""
        errors = (predictions - labels) ** 2
        weighted = self.position_weights(predictions, labels, mask, context, step) * errors
        if self.use_focal_loss:
            weighted = weighted * errors / masked_mean(errors, mask).clamp_min(1e-12)
        if self.loss_mlps is not None:
            mlp = self.loss_mlps[step if len(self.loss_mlps) > 1 else 0]
            weighted = weighted + mlp(weighted.unsqueeze(-1)).squeeze(-1)
        return weighted

    def forward(self, predictions, labels, mask, context, step):
        return masked_mean(self.terms(predictions, labels, mask, context, step), mask)


def build_inner_loss(args, max_rating):
    """The inner loss the flags ask for: MELO's adaptive loss, or MSE with --use_adaptive_loss=False."""
    if not args.use_adaptive_loss:
        return MSEInnerLoss()
    return AdaptiveInnerLoss(LossConfig.from_args(args), max_rating)
