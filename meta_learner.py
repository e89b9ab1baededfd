"""The MELO / MAML++ meta-learner: inner-loop adaptation per task and the outer (query) loss.

`adapt` is the inner loop: gradient steps on a parameter dict with `torch.func.grad` + `functional_call`.
One pure task function, `MetaLearner.adapt_task`, adapts on one task's support set with it and scores
the query set (`query_loss`) after the inner steps. Two drivers run it:

* the fast path (default): `torch.func.vmap` over the tasks of a meta-batch, with each task adapting a
  small item table that holds only the rows of its own items (ids remapped). A task's loss never touches
  the other rows, so their gradient, and with it their inner update, is exactly zero: adapting the small
  table gives the same numbers as adapting the whole table, at a cost independent of the catalog size.
* the reference path (`fast=False`): a Python loop over tasks that adapts the whole item table.

Both give the same losses and gradients (tests/test_meta_learner.py checks it in float64).

Derivative order: by default the inner gradients keep their graph (second order). With
`first_order=True` the inner gradient is taken at a detached copy of the parameters: the backbone and the
learning rates then get first-order meta-gradients, while the learned loss, whose parameters enter the
inner gradient directly, still gets its (second-order, mixed) meta-gradient d²L_inner/dθdφ.
"""
import math

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from evaluation.metrics import balanced_rating_weights, half_star_buckets, num_half_star_buckets
from inner_loop_optimizers import LSLRGradientDescent
from models import model_factory
from models.heads import USER_BIAS
from models.loss_networks import build_inner_loss, query_loss

EMBEDDING = "item_embedding.weight"  # indexed by item id: each task adapts a small table of its items' rows
SUPPORT_AGE = "support_age"  # the context entry of each support position's recency (TaskBatch.support_age)
# the context entry of what the rating head's start needs per support position beyond its item id (its
# `start_offset`, looked up by item id before the ids are remapped into a task's small item table)
START_OFFSET = "start_offset"
QUERY_TARGET_WEIGHTS = "query_target_weights"  # the context entry of each query target's outer-loss weight
# --inner_params=head adapts these (with the rating head's own parameters): the output layer, ANIL-style.
HEAD_PREFIX = "head."


def adapted_parameter_names(backbone, inner_params="all", adapt_user_bias=True, adapt_item_bias=True):
    """The backbone parameters that the inner loop adapts, in the backbone's order: all of them, or only
    the output layer (`inner_params="head"`), plus the rating head's per-user parameters (b_user, p_user)
    and item tables (b_item, q_item) unless frozen."""
    names = []
    head = backbone.rating_head
    for name, _ in backbone.named_parameters():
        if name in head.user_parameters:
            keep = adapt_user_bias
        elif name in head.item_tables:
            keep = adapt_item_bias
        else:
            keep = inner_params == "all" or name.startswith(HEAD_PREFIX)
        if keep:
            names.append(name)
    return names


def multi_step_loss_weights(iteration, num_steps, msl_iterations):
    """MAML++'s importance vector over inner steps at `iteration`.

    Starts uniform (1/K); the non-final weights decay linearly to a floor of 0.03/K over
    `msl_iterations` while the last one grows, so the vector always sums to one.
    """
    weights = torch.full((num_steps,), 1.0 / num_steps, dtype=torch.float64)
    decay = 1.0 / num_steps / max(msl_iterations, 1)
    floor = 0.03 / num_steps
    weights[:-1] = torch.clamp(weights[:-1] - iteration * decay, min=floor)
    weights[-1] = min(1.0 / num_steps + iteration * (num_steps - 1) * decay, 1.0 - (num_steps - 1) * floor)
    return weights


def last_step_weights(num_steps):
    weights = torch.zeros(num_steps, dtype=torch.float64)
    weights[-1] = 1.0
    return weights


def adapt(params, loss_of_step, update, num_steps, first_order=False, after_step=None):
    """The inner loop, its one implementation. For k = 0 … num_steps − 1: the gradient of
    `loss_of_step(params_k, k)` → (loss, aux: tensors, or () for none), taken at a detached copy of
    params_k with `first_order`;
    params_k+1 = update(params_k, gradient, k); then `after_step(k, params_k+1, aux)`. The last params."""
    for step in range(num_steps):
        at = {n: p.detach() for n, p in params.items()} if first_order else params
        grads, aux = grad(loss_of_step, has_aux=True)(at, step)
        params = update(params, grads, step)
        if after_step is not None:
            after_step(step, params, aux)
    return params


def local_item_tables(item_windows):
    """Per task, the sorted distinct item ids it uses, and its windows re-indexed into that list.

    item_windows: [T, N] ids. Returns local_ids [T, K] (row 0 is always id 0, the padding item; short
    lists are padded by repeating their last id, whose duplicate rows are never indexed) and
    remapped [T, N] with local_ids.gather(1, remapped) == item_windows.
    """
    with_padding = torch.cat([torch.zeros_like(item_windows[:, :1]), item_windows], dim=1)
    ordered, _ = with_padding.sort(dim=1)
    is_first = torch.ones_like(ordered, dtype=torch.bool)
    is_first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = is_first.long().cumsum(1) - 1
    counts = slot[:, -1] + 1
    width = int(counts.max())
    local_ids = torch.zeros(ordered.shape[0], width, dtype=ordered.dtype, device=ordered.device)
    local_ids.scatter_(1, slot, ordered)  # duplicates write the same id to the same slot
    last = local_ids.gather(1, (counts - 1)[:, None])
    local_ids = torch.where(torch.arange(width, device=ordered.device)[None] < counts[:, None], local_ids, last)
    remapped = torch.searchsorted(local_ids, item_windows)
    return local_ids, remapped


class MetaLearner(nn.Module):
    """Everything that is meta-learned: the backbone θ, the inner learning rates α, the inner loss φ."""

    def __init__(self, backbone, inner_loss, num_inner_steps, inner_lr, learnable_lrs, max_rating,
                 query_loss="all", adapted=None, init_lrs=None, weighted_start=False):
        super().__init__()
        self.weighted_start = weighted_start  # the fold-in start weighted by the inner loss's step-0 weights
        self.backbone = backbone
        self.inner_loss = inner_loss
        self.num_inner_steps = num_inner_steps
        self.query_loss = query_loss
        self.max_rating = float(max_rating)
        names = [name for name, _ in backbone.named_parameters()]
        if EMBEDDING not in names:
            raise ValueError(f"backbone {type(backbone).__name__} has no {EMBEDDING}")
        self.adapted = tuple(names if adapted is None else adapted)  # what the inner loop adapts
        self.lslr = LSLRGradientDescent(self.adapted, num_inner_steps, inner_lr, learnable_lrs, init_lrs)
        # --query_loss=balanced: each half-star rating's weight in the outer loss, set from the training
        # users' ratings by `balance_query_ratings` (not saved: the data gives it again)
        self.register_buffer("query_rating_weights", torch.ones(num_half_star_buckets(max_rating)),
                             persistent=False)

    def balance_query_ratings(self, training_ratings):
        """Weight each query target in the outer loss by `balanced_rating_weights` of the training users'
        ratings (stars), so the outer loss is the squared-error counterpart of the mean per-rating RMSE."""
        self.query_rating_weights.copy_(balanced_rating_weights(training_ratings, self.max_rating))

    def split_adapted(self, params):
        """(the parameters the inner loop adapts, the rest, which it holds fixed) of a parameter dict."""
        adapted = {n: p for n, p in params.items() if n in self.adapted}
        return adapted, {n: p for n, p in params.items() if n not in adapted}

    def task_start(self, params, support, context=None, inner_loss=None):
        """Where a task's inner loop starts: `params` with b_user (and p_user) at their fold-in start on
        `support` (items, labels, mask; the rating head's `task_start`), weighted with --weighted_start by the inner
        loss's (default the learner's) step-0 weights of the task (`context`); split into (adapted, fixed)."""
        inner_loss = self.inner_loss if inner_loss is None else inner_loss
        weights_of = None
        if self.weighted_start and inner_loss.has_weights:
            items, labels, mask = support
            weights_of = lambda predictions: inner_loss.position_weights(  # noqa: E731
                predictions, labels, mask, context, 0)
        age, offset = (None, None) if context is None else (context.get(SUPPORT_AGE), context.get(START_OFFSET))
        return self.split_adapted(self.backbone.rating_head.task_start(self.backbone, params, *support,
                                                                       weights_of=weights_of, age=age, offset=offset))

    # ------------------------------------------------------------------ one task
    def adapt_task(self, params, support, context, query, scored_steps, first_order, merge_query=True,
                   inner_loss=None):
        """Adapt `params` on one task's support set; return (query losses [len(scored_steps)],
        query predictions at the last position [Q]). `support`/`query` are (items, labels, mask).

        With `merge_query` (second order only), the query scored after step k − 1 goes through the
        backbone together with the support set of step k, which uses the same parameters θ_k: one forward
        (and its backward) fewer per scored step. Without it, the plain order: a separate query forward.
        `inner_loss`: another inner loss than the learner's (the analysis' re-weighted one)."""
        inner_loss = self.inner_loss if inner_loss is None else inner_loss
        support_items, support_labels, support_mask = support
        query_items, query_labels, query_mask = query
        num_support = support_items.shape[0]
        params, fixed = self.task_start(params, support, context, inner_loss)
        # first order: the support gradient is taken at detached copies of every parameter, fixed ones too
        support_fixed = {n: p.detach() for n, p in fixed.items()} if first_order else fixed

        def support_loss(current, step):
            predictions = functional_call(self.backbone, {**support_fixed, **current}, (support_items,))
            return inner_loss(predictions, support_labels, support_mask, context, step), ()

        def support_loss_and_query(current, step):
            # θ_k scores the query of step k − 1 and gives the support loss of step k: one forward over
            # the support and query windows together (windows never interact), the query part as aux.
            predictions = functional_call(self.backbone, {**fixed, **current},
                                          (torch.cat([support_items, query_items]),))
            support_predictions, query_predictions = predictions.split(
                [num_support, predictions.shape[0] - num_support])
            loss = inner_loss(support_predictions, support_labels, support_mask, context, step)
            return loss, query_predictions

        merge = merge_query and not first_order  # first order: the support gradient is at a detached copy
        query_losses, query_predictions = [], None

        def score(predictions):
            query_losses.append(query_loss(predictions, query_labels, query_mask, self.query_loss,
                                           context.get(QUERY_TARGET_WEIGHTS)))
            return predictions

        def loss_of_step(current, step):
            return (support_loss_and_query if merge and step - 1 in scored_steps else support_loss)(current, step)

        def after_step(step, params, merged_query):
            nonlocal query_predictions
            if isinstance(merged_query, torch.Tensor):  # the query of step − 1, scored in this step's forward
                query_predictions = score(merged_query)
            if step in scored_steps and not (merge and step + 1 < self.num_inner_steps):
                query_predictions = score(functional_call(self.backbone, {**fixed, **params}, (query_items,)))

        adapt(params, loss_of_step, self.lslr.update, self.num_inner_steps, first_order, after_step)
        return torch.stack(query_losses), query_predictions[:, -1]

    # ------------------------------------------------------------------ a batch of tasks
    def _prepare(self, batch):
        support_labels = batch.support_ratings / self.max_rating
        support_mask = batch.support_items != 0
        query = (batch.query_items, batch.query_ratings / self.max_rating, batch.query_items != 0)
        context = self.inner_loss.prepare(support_labels, support_mask, batch.support_age)
        context[SUPPORT_AGE] = batch.support_age  # each position's recency, for the fold-in start's decay weights
        offset = self.backbone.rating_head.start_offset(batch.support_items)
        if offset is not None:
            context[START_OFFSET] = offset
        if self.query_loss == "balanced":
            context[QUERY_TARGET_WEIGHTS] = self.query_rating_weights[
                half_star_buckets(batch.query_ratings[:, :, -1]).clamp(0, len(self.query_rating_weights) - 1)]
        return (batch.support_items, support_labels, support_mask), context, query

    def run_tasks(self, batch, scored_steps, first_order=False, fast=True):
        """Query losses [T, len(scored_steps)] and last-position predictions [T, Q] (normalised)."""
        if not fast:
            return self._run_tasks_one_by_one(*self._prepare(batch), scored_steps, first_order)
        return self.vmap_tasks(batch, lambda params, support, context, query: self.adapt_task(
            params, support, context, query, scored_steps, first_order))

    def vmap_tasks(self, batch, task_function, extra_context=None):
        """`task_function(params, support, context, query)` of every task of `batch`, vmapped, each task
        on a small item table that holds only its own items (ids remapped into it); `extra_context`:
        more per-task tensors [T, ...] for the inner loss."""
        support, context, query = self._prepare(batch)
        context = {**context, **(extra_context or {})}
        windows = torch.cat([support[0].flatten(1), query[0].flatten(1)], dim=1)
        local_ids, remapped = local_item_tables(windows)
        split = support[0][0].numel()
        support = (remapped[:, :split].view_as(support[0]),) + support[1:]
        query = (remapped[:, split:].view_as(query[0]),) + query[1:]
        params = dict(self.backbone.named_parameters())
        item_tables = (EMBEDDING, *self.backbone.rating_head.item_tables)
        shared = {n: p for n, p in params.items() if n not in item_tables}
        # [T, K, ...] rows of each task's items; the gradient flows back to the whole tables
        tables = {n: params[n][local_ids] for n in item_tables if n in params}

        def one_task(task_tables, task_support, task_context, task_query):
            return task_function({**shared, **task_tables}, task_support, task_context, task_query)

        return vmap(one_task, randomness="different")(tables, support, context, query)

    def _run_tasks_one_by_one(self, support, context, query, scored_steps, first_order):
        params = dict(self.backbone.named_parameters())
        losses, predictions = [], []
        for t in range(support[0].shape[0]):
            pick = lambda tensors: tuple(x[t] for x in tensors)  # noqa: E731
            task_losses, task_predictions = self.adapt_task(
                params, pick(support), {k: v[t] for k, v in context.items()}, pick(query),
                scored_steps, first_order, merge_query=False)
            losses.append(task_losses)
            predictions.append(task_predictions)
        return torch.stack(losses), torch.stack(predictions)

    def task_losses(self, batch, loss_weights, first_order=False, fast=True):
        """The outer loss of each task: Σ_k v_k L_query(θ_k+1) over the steps with a weight v_k
        (`loss_weights`, step_weights' vector)."""
        scored = tuple(k for k in range(self.num_inner_steps) if loss_weights[k] > 0)
        losses, _ = self.run_tasks(batch, scored, first_order, fast)
        weights = loss_weights[list(scored)].to(losses)
        return (losses * weights).sum(dim=1)

    def predict(self, batch, fast=True):
        """Adapt on each task's support set without keeping a graph; predicted stars [T, Q]."""
        with torch.no_grad():
            _, predictions = self.run_tasks(batch, (self.num_inner_steps - 1,), first_order=True, fast=fast)
        return predictions * self.max_rating


def build_meta_learner(args, num_items, max_rating):
    """The backbone `--model`, its LSLR rates and the inner loss the flags ask for."""
    backbone = model_factory(args, num_items)
    # the loss networks' own, fixed initialisation; like model_factory, on the CPU generator only (CUDA's
    # would be reseeded and not restored: fork_rng(devices=[]) saves the CPU state alone)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.default_generator.manual_seed(args.model_init_seed + 1)
        inner_loss = build_inner_loss(args, max_rating)
    adapted = adapted_parameter_names(backbone, args.inner_params, args.adapt_user_bias, args.adapt_item_bias)
    # b_user's own starting rate: ½ makes one inner step on it alone the Newton step of the (weighted,
    # mean-one) squared loss, i.e. the support set's mean residual, the un-shrunk user-bias fold-in
    init_lrs = {USER_BIAS: args.user_bias_lr} if args.user_bias_lr is not None else None
    return MetaLearner(backbone, inner_loss, args.num_inner_steps, args.inner_lr,
                       args.use_learnable_params, max_rating, args.query_loss, adapted, init_lrs,
                       args.weighted_start)


# ------------------------------------------------------------------ the outer loop (MAML++)
def step_weights(args, iteration):
    """The weights of the query losses after each inner step at outer `iteration`: MAML++'s multi-step
    loss for the first --multi_step_loss_num_epochs iterations (--use_multi_step), then the last step's."""
    if args.use_multi_step and iteration < args.multi_step_loss_num_epochs:
        return multi_step_loss_weights(iteration, args.num_inner_steps, args.multi_step_loss_num_epochs)
    return last_step_weights(args.num_inner_steps)


def cosine(base, floor, total):
    """Multiplier for LambdaLR: cosine annealing from `base` to `floor` over `total` iterations."""
    if base == 0:
        return lambda it: 1.0
    return lambda it: (floor + (base - floor) * 0.5 * (1 + math.cos(math.pi * min(it, total) / max(total, 1)))) / base


def build_optimizer(args, learner):
    """One Adam over everything meta-learned, one parameter group per part with its own lr schedule."""
    groups, schedules = [], []

    def add(params, lr, floor=None, weight_decay=0.0):
        params = [p for p in params if p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": weight_decay})
            schedules.append(cosine(lr, floor, args.num_train_iterations) if floor is not None else (lambda it: 1.0))

    loss = learner.inner_loss
    backbone = learner.backbone
    head_tables = backbone.rating_head.parameters_of(backbone) if args.bias_outer_lr is not None else {}
    add([p for name, p in backbone.named_parameters() if name not in head_tables], args.outer_lr,
        args.min_outer_lr, args.outer_weight_decay)
    if head_tables:  # annealed in proportion to --outer_lr's schedule
        floor = args.bias_outer_lr * args.min_outer_lr / args.outer_lr if args.outer_lr else args.bias_outer_lr
        add(head_tables.values(), args.bias_outer_lr, floor)
    add(learner.lslr.parameters(), args.learn_lr)
    if getattr(loss, "encoder", None) is not None:
        add(loss.encoder.parameters(), args.lstm_lr, args.min_lstm_lr)
    if getattr(loss, "weight_net", None) is not None:
        add(loss.weight_net.parameters(), args.task_info_lr)
    if getattr(loss, "loss_mlps", None) is not None:
        add(loss.loss_mlps.parameters(), args.loss_lr, weight_decay=args.loss_weight_decay)
    optimizer = torch.optim.Adam(groups)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


def outer_step(learner, optimizer, scheduler, batch, loss_weights, batch_size, dist, first_order=False,
               task_chunk=0, grad_clip=0.0, fast=True):
    """One outer iteration (main.py's, and benchmark.py's timing of it) on this rank's tasks `batch`, of
    a meta-batch of `batch_size` tasks over all ranks: the meta-gradient of the mean outer loss, in chunks
    of `task_chunk` tasks, summed over the ranks, clipped to `grad_clip`, then one optimizer and schedule
    step. Returns the mean outer loss; a non-finite one takes no step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    chunk = task_chunk or max(len(batch), 1)
    optimizer.zero_grad(set_to_none=False)
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for start in range(0, len(batch), chunk):
        per_task = learner.task_losses(batch.select(slice(start, start + chunk)), loss_weights, first_order, fast)
        # Normalise by the whole meta-batch, so chunks and ranks add up to the mean over all tasks.
        (per_task.sum() / batch_size).backward()
        total += per_task.detach().sum().double()
    for p in params:  # a rank without tasks, or a part the loss did not reach, still all-reduces
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if dist.enabled:
        # Second-order meta-gradients are averaged explicitly, not through DDP hooks.
        flat = torch.cat([p.grad.reshape(-1) for p in params] + [total.reshape(1).to(params[0].grad)])
        dist.sum_(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        total = flat[-1].double()
    loss = (total / batch_size).item()
    if not math.isfinite(loss):
        return loss
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    return loss


def build_meta_training(args, num_items, max_rating, device, start_head=None):
    """(learner, optimizer, scheduler) as main.py trains them and benchmark.py times them: the learner the
    flags ask for, on `device`; `start_head(backbone)`, the rating head's start fitted on the data (None: a
    checkpoint brings it); then one Adam over everything meta-learned, with its schedules."""
    learner = build_meta_learner(args, num_items, max_rating).to(device)
    if start_head is not None:
        start_head(learner.backbone)
    return (learner, *build_optimizer(args, learner))


def meta_train_step(learner, optimizer, scheduler, batch, args, iteration, batch_size, dist):
    """MAML++'s outer iteration number `iteration` (main.py's): its multi-step loss weights, first-order
    derivatives for the first --first_order_iterations, then `outer_step`. Returns the mean outer loss."""
    return outer_step(learner, optimizer, scheduler, batch, step_weights(args, iteration), batch_size, dist,
                      iteration < args.first_order_iterations, args.task_chunk, args.grad_clip)
