"""What the meta-learners' reports and logs say about the learned loss; the method itself is in
meta_learner.py and models/loss_networks.py.

* `support_weights`: the weight MELO's loss gives each support position at each inner step, and
  `weight_sums_by_rating` / `mean_weight_by_rating`, their mean per rating value (reports, TensorBoard);
* `query_gradient_of_weights`: what re-weighting the support positions would do to the query loss, for
  MAML++ as for MELO, grouped by rating value (`query_gradient_by_rating`) or by how common the rating is
  for the user (`query_gradient_by_share`) and summarised over users (`summarise_query_gradients`).
"""
import torch
from torch import nn
from torch.func import functional_call

from evaluation.metrics import half_star_buckets, half_star_name, num_half_star_buckets
from meta_learner import adapt
from models.loss_networks import masked_mean, rating_bucket_ids, task_mean


def support_weights(learner, batch):
    """The adaptive loss's weight of every support position at every inner step, as the inner loop
    computes them on `batch`: (weights [T, K, S, L], support ratings in stars [T, S, L], mask), or None
    for a loss without weights (MAML++). For logging and reports; no graph is kept."""
    if not learner.inner_loss.has_weights:
        return None

    def weights_of_task(params, support, context, query):
        items, labels, mask = support
        params, fixed = learner.task_start(params, support, context)

        def loss_and_weights(current, step):  # one forward gives the step's loss and its weights
            predictions = functional_call(learner.backbone, {**fixed, **current}, (items,))
            return (learner.inner_loss(predictions, labels, mask, context, step),
                    learner.inner_loss.position_weights(predictions, labels, mask, context, step))

        weights = []
        adapt(params, loss_and_weights, learner.lslr.update, learner.num_inner_steps,
              after_step=lambda step, params, step_weights: weights.append(step_weights))
        return torch.stack(weights)

    with torch.no_grad():
        weights = learner.vmap_tasks(batch, weights_of_task)
    return weights, batch.support_ratings, batch.support_items != 0


# The context entry [S, L] of each task that multiplies every position's term of its inner loss
# (WithPositionFactor): only ever 1, it exists so that the query loss can be differentiated with respect to it.
POSITION_FACTOR = "position_factor"


class WithPositionFactor(nn.Module):
    """An inner loss whose every position's term (`inner_loss.terms`) is multiplied by the task's
    POSITION_FACTOR from the context before the masked mean."""

    def __init__(self, inner_loss):
        super().__init__()
        self.inner_loss = inner_loss

    def prepare(self, support_labels, support_mask, support_age=None):
        return self.inner_loss.prepare(support_labels, support_mask, support_age)

    @property
    def has_weights(self):
        return True

    def position_weights(self, predictions, labels, mask, context, step):
        """The wrapped loss's weights (1 for MAML++'s) times the factor: what a weighted fold-in start fits."""
        if not self.inner_loss.has_weights:
            return context[POSITION_FACTOR]
        return self.inner_loss.position_weights(predictions, labels, mask, context, step) * context[POSITION_FACTOR]

    def forward(self, predictions, labels, mask, context, step):
        terms = self.inner_loss.terms(predictions, labels, mask, context, step)
        return masked_mean(terms * context[POSITION_FACTOR], mask)


def query_gradient_of_weights(learner, batch):
    """What re-weighting the outer loss would reward, for MAML++ as for MELO: per support position, the
    derivative of the task's outer loss (its query loss after the last inner step, in stars²) with
    respect to a factor on that position's weight, at 1, centred over the task's real positions
    (only a redistribution, the mean weight kept, can change anything that the learned inner rates
    do not). [T, S, L], zero at padding; second order through the inner loop, no parameter
    gradient is kept. Negative where more weight on that position would lower the query loss."""
    mask = batch.support_items != 0
    factor = torch.ones(mask.shape, dtype=learner.backbone.item_embedding.weight.dtype, device=mask.device,
                        requires_grad=True)
    last = (learner.num_inner_steps - 1,)
    with torch.enable_grad():
        losses, _ = learner.vmap_tasks(batch, lambda params, support, context, query: learner.adapt_task(
            params, support, context, query, last, first_order=False, inner_loss=WithPositionFactor(
                learner.inner_loss)), {POSITION_FACTOR: factor})
        gradient, = torch.autograd.grad(losses.sum() * learner.max_rating ** 2, factor)
    return torch.where(mask, gradient - task_mean(gradient, mask), torch.zeros_like(gradient))


def _group_sums(gradients, groups, mask, num_groups):
    """Per task and group (`groups`: a group id per position, [T, S·L]), the sum of the group's centred
    gradients (the derivative of the task's query loss when each of its positions' factors gains ε and
    every position's loses it evenly) and whether the group counts: it holds some of the task's real
    positions but not all (where it holds all, no weight can move and the sum is 0 up to round-off).
    float64 [T, num_groups, 2], to be put together over batches (and ranks) before
    `summarise_query_gradients`."""
    real = mask.flatten(1).double()
    found = torch.zeros(gradients.shape[0], num_groups, 2, dtype=torch.float64, device=gradients.device)
    found[..., 0].scatter_add_(1, groups, (gradients * mask).flatten(1).double())
    found[..., 1].scatter_add_(1, groups, real)
    found[..., 1] = ((found[..., 1] > 0) & (found[..., 1] < real.sum(1, keepdim=True))).double()
    return found


def _rating_buckets(stars, mask, max_rating):
    """The half-star bucket of every support position, [T, S·L]; padding (any --default_rating) is 0,
    a bucket that never counts, since it holds no real position."""
    return rating_bucket_ids(stars / max_rating, mask, max_rating).flatten(1)


def query_gradient_by_rating(gradients, stars, mask, max_rating):
    """`_group_sums` of the support positions grouped by half-star rating value: [T, buckets, 2]."""
    return _group_sums(gradients, _rating_buckets(stars, mask, max_rating), mask, num_half_star_buckets(max_rating))


# Bins of a support rating's share of the user's support positions (its 1★ among mostly 4★ is rare): the
# query gradient by share says whether the outer loss rewards weighting each user's rare ratings up.
SHARE_BOUNDS = (0.1, 0.25, 0.5)
SHARE_NAMES = ("<10%", "10-25%", "25-50%", ">=50%")


def query_gradient_by_share(gradients, stars, mask, max_rating):
    """`_group_sums` of the support positions grouped by how common their rating is in the user's support
    set (SHARE_NAMES) instead of by rating value: [T, len(SHARE_NAMES), 2]."""
    buckets = _rating_buckets(stars, mask, max_rating)
    real = mask.flatten(1).double()
    counts = torch.zeros(buckets.shape[0], num_half_star_buckets(max_rating), dtype=torch.float64,
                         device=buckets.device)
    counts.scatter_add_(1, buckets, real)
    share = counts.gather(1, buckets) / real.sum(1, keepdim=True).clamp_min(1.0)
    bins = torch.bucketize(share, torch.tensor(SHARE_BOUNDS, dtype=share.dtype, device=share.device), right=True)
    return _group_sums(gradients, bins, mask, len(SHARE_NAMES))


def summarise_query_gradients(found, names=None):
    """{rating: {mean, t, helped, users, non_finite}} over the tasks where the rating counts: the mean
    derivative, its t statistic (mean / standard error over tasks), the share of tasks where more weight
    on the rating lowers the query loss, and how many tasks were left out for a non-finite derivative
    (a second-order overflow must not void the test report); from `query_gradient_by_rating` (keys: the
    ratings) or `query_gradient_by_share` (with `names`=SHARE_NAMES)."""
    summary = {}
    for bucket in range(found.shape[1]):
        values = found[found[:, bucket, 1] > 0, bucket, 0]
        finite = torch.isfinite(values)
        non_finite, values = int((~finite).sum()), values[finite]
        if len(values) == 0:
            continue
        error = values.std().item() / len(values) ** 0.5 if len(values) > 1 else 0.0
        mean = values.mean().item()
        name = half_star_name(bucket) if names is None else names[bucket]
        summary[name] = {"mean": mean, "t": mean / error if error > 0 else None,  # JSON: no nan
                         "helped": (values < 0).double().mean().item(), "users": len(values),
                         "non_finite": non_finite}
    return summary


def weight_sums_by_rating(weights, stars, mask, max_rating):
    """Per inner step and half-star rating bucket, the sum and the count of the weights of real positions:
    float64 [K, buckets, 2], to be added up over batches (and ranks) before `mean_weight_by_rating`."""
    buckets = half_star_buckets(stars[mask])
    per_step = weights.transpose(0, 1)[:, mask].double()  # [K, positions]
    sums = torch.zeros(per_step.shape[0], num_half_star_buckets(max_rating), 2, dtype=torch.float64,
                       device=per_step.device)
    sums[..., 0].index_add_(1, buckets, per_step)
    sums[..., 1].index_add_(1, buckets, torch.ones_like(per_step))
    return sums.cpu()


def mean_weight_by_rating(sums):
    """({rating: mean weight over the inner steps}, [{rating: mean weight} per step]) from
    `weight_sums_by_rating`; ratings named as in the reports' per_rating ('4', '3.5')."""
    def means(table):
        return {half_star_name(bucket): (row[0] / row[1]).item() for bucket, row in enumerate(table) if row[1] > 0}

    return means(sums.sum(0)), [means(step) for step in sums]
