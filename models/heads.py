"""Rating heads: how a backbone's output layer becomes a normalised rating (stars / max rating), what the
head holds, where it starts, and which of its parameters a task's inner loop adapts.

`HEADS` maps --rating_head to a class; `models.model_factory` builds `HEADS[args.rating_head].attach(...)`
on every backbone, as `backbone.rating_head`. A head is one class:

- `attach(backbone, user_factors)`: adds the head's parameters to the backbone under the fixed names
  below (checkpoints and the inner loop's parameter dicts know them by these names) and returns the head;
- `output(backbone, logits, item_ids)`: the rating [B, L] at every position from the logits [B, L];
- `user_parameters` / `item_tables`: the names of its per-user parameters (adapted per task unless
  --adapt_user_bias=False) and of its tables indexed by item id (each task adapts the rows of its own
  items unless --adapt_item_bias=False); `parameters_of(backbone)` gives both, by name;
- `fits_start`: whether the trainers fit its start on the training data (`baselines.cached_bias_start`),
  which `set_start(backbone, mean, ...)` puts in, with the per-task start's settings (`START_SETTINGS`,
  kept in checkpoints);
- `task_start(backbone, params, items, labels, mask, weights_of, age, offset)`: a task's parameters where
  its inner loop (or fine-tuning) starts, from its support set; `start_offset(item_ids)`: what it needs
  per support position beyond the item ids a task's small item table remaps (None: nothing).

A new head is one class and one `register_head` line.
"""
import torch
from torch import nn
from torch.func import functional_call

from common.errors import MeloError

from .layers import rating_head_output

ITEM_BIAS = "item_bias.weight"
ITEM_FACTOR = "item_factor.weight"
USER_BIAS = "user_bias"
USER_FACTOR = "user_factor"
# the per-task start's settings, chosen on validation users when a run starts and kept in its checkpoints
START_SETTINGS = ("user_bias_reg", "user_factor_reg", "user_decay", "blend_weight", "blend_item_offset",
                  "blend_bias_reg", "blend_bias_decay")
# those a test report records: where its tasks' inner loop (or fine-tuning) started
REPORTED_START = ("user_bias_reg", "user_factor_reg", "blend_weight")

HEADS = {}


def register_head(head):
    """Add a head class to `HEADS` under its `name` (--rating_head accepts it); a taken or missing name is
    refused with one line."""
    if not isinstance(head, type) or not issubclass(head, RatingHead) or not head.name:
        raise MeloError(f"cannot register {head!r}: a rating head is a named subclass of models.heads.RatingHead")
    if head.name in HEADS:
        raise MeloError(f"cannot register {head.__name__} as {head.name!r}: {HEADS[head.name].__name__} already "
                        f"has that name; choose another name")
    HEADS[head.name] = head
    return head


class RatingHead:
    """The base: no parameters of its own, no start, nothing per task (the plain head's behaviour but its
    output). The per-task start's settings are None: no start."""

    name = None
    user_parameters = ()
    item_tables = ()
    fits_start = False

    def __init__(self):
        self.user_bias_reg = None  # λ of each task's fold-in start of b_user; None: b_user's meta-learned value
        self.user_factor_reg = None  # λ of the joint start of p_user (--user_factors); None: no solve
        self.user_decay = None  # γ of that start's recency weights γ^age; None: every support rating alike
        # --bias_start=blend: s, the MF minus the bias fold-in's item biases [num_items + 1], and the bias
        # fold-in's λ_user and γ (None: no blend)
        self.blend_weight = self.blend_item_offset = self.blend_bias_reg = self.blend_bias_decay = None

    @classmethod
    def attach(cls, backbone, user_factors=0):
        return cls()

    @classmethod
    def describe(cls, args):
        """What a comparison's header says of the head under `args` beyond its name ("" or " (...)")."""
        return ""

    def output(self, backbone, logits, item_ids):
        raise NotImplementedError

    def parameters_of(self, backbone):
        """{name: parameter} of the head's own tables and per-user parameters, in the backbone's order."""
        own = (*self.item_tables, *self.user_parameters)
        return {name: p for name, p in backbone.named_parameters() if name in own}

    def set_start(self, backbone, mean, item_biases=None, user_bias_reg=None, item_factors=None,
                  user_factor_reg=None, user_decay=None, **blend):
        """Nothing to start for a head without parameters of its own."""

    def start_settings(self):
        return {name: getattr(self, name) for name in START_SETTINGS}

    def reported_start(self):
        return {name: getattr(self, name) for name in REPORTED_START}

    def load_start_settings(self, saved):
        """The per-task start's settings a checkpoint kept (those it has)."""
        for name in START_SETTINGS:
            if name in saved:
                setattr(self, name, saved[name])

    def task_start(self, backbone, params, items, labels, mask, weights_of=None, age=None, offset=None):
        return params

    def start_offset(self, item_ids):
        return None


class PlainHead(RatingHead):
    """The original: 0.1 + sigmoid(logits), a normalised rating in (0.1, 1.1)."""

    name = "plain"

    def output(self, backbone, logits, item_ids):
        return rating_head_output(logits)


class BiasHead(RatingHead):
    """ŷ = μ + b_user + b_item [+ p_user · q_item] + f(window),    f = sigmoid(logits) − ½

    μ is the training users' mean rating (a buffer), b_item a table indexed by item id like the embedding
    (`item_bias.weight`, so the inner loop's small per-task item table covers it), b_user one scalar that
    the inner loop adapts per task with its own learned rate (one inner step on it alone is the user-bias
    fold-in), and f the network's residual on top. With `user_bias_reg` set (--user_bias_start=fold-in),
    each task's b_user first moves to the fold-in's shrunk estimate from its support set (`task_start`):
    with f ≡ 0 the head is then the fold-in. With `user_factors` K > 0 (--user_factors), an item-factor
    table q (`item_factor.weight`, K columns) and a user factor p that the inner loop adapts like b_user;
    with `user_factor_reg` set, each task's (p_user, b_user) first move jointly to the ridge estimate from
    its support set's residuals, so that with f ≡ 0 and q from ALS the head is the MF fold-in. f keeps the
    plain head's slope and bound, so the step sizes that suit one suit the other (a linear f made
    BERT4Rec's fine-tuning and inner loop diverge at the plain head's rates, 0.1 and above).
    """

    name = "bias"
    user_parameters = (USER_BIAS, USER_FACTOR)
    item_tables = (ITEM_BIAS, ITEM_FACTOR)
    fits_start = True

    @classmethod
    def attach(cls, backbone, user_factors=0):
        """Its tables start at zero and the backbone's output layer too (f ≡ 0), so an untrained model
        predicts μ; nothing random is drawn, so the other weights are unchanged."""
        num_items = backbone.num_items
        backbone.item_bias = nn.Embedding.from_pretrained(torch.zeros(num_items + 1, 1), freeze=False, padding_idx=0)
        backbone.user_bias = nn.Parameter(torch.zeros(()))
        if user_factors:
            backbone.item_factor = nn.Embedding.from_pretrained(torch.zeros(num_items + 1, user_factors),
                                                                freeze=False, padding_idx=0)
            backbone.user_factor = nn.Parameter(torch.zeros(user_factors))
        backbone.register_buffer("global_mean", torch.zeros(()))
        with torch.no_grad():
            backbone.head.weight.zero_()
            backbone.head.bias.zero_()
        return cls()

    @classmethod
    def describe(cls, args):
        start = "the fold-in blend" if args.bias_start == "blend" else args.bias_start
        return (f" (item biases starting at {start}"
                + (f", a {args.user_factors}-column user x item factor term" if args.user_factors else "")
                + (", its tables held at their start" if args.bias_outer_lr == 0 else "") + ")")

    def output(self, backbone, logits, item_ids):
        rating = backbone.global_mean + backbone.user_bias + backbone.item_bias(item_ids).squeeze(-1)
        if hasattr(backbone, "item_factor"):
            rating = rating + backbone.item_factor(item_ids) @ backbone.user_factor
        return rating + torch.sigmoid(logits) - 0.5

    def set_start(self, backbone, mean, item_biases=None, user_bias_reg=None, item_factors=None,
                  user_factor_reg=None, user_decay=None, blend_weight=None, blend_item_offset=None,
                  blend_bias_reg=None, blend_bias_decay=None):
        """μ and (optionally) the item-bias table [num_items + 1], normalised ratings (stars / max rating),
        and `user_bias_reg`, the shrinkage λ (in items) of each task's fold-in start of b_user (None: no
        such start); with a factor term, the item factors [num_items + 1, ≤ K] (the columns beyond theirs
        stay 0) and `user_factor_reg`, the ridge λ of p_user's fold-in start (solved jointly with b_user's),
        and `user_decay`, the γ of that start's recency weights (None or 1: none).
        The fold-in blend's start (--bias_start=blend; `blend_weight` s, with a factor term): `item_biases`
        are the blend's, `blend_item_offset` [num_items + 1] the MF fold-in's item biases minus the user +
        item bias fold-in's, and the MF fold-in's λs and γ are the ones above; `blend_bias_reg` and
        `blend_bias_decay` are the user + item bias fold-in's λ_user and γ (`task_start`)."""
        self.user_bias_reg = None if user_bias_reg is None else float(user_bias_reg)
        self.user_decay = decay_setting(user_decay)
        has_factors = hasattr(backbone, "item_factor")
        self.user_factor_reg = None if user_factor_reg is None or not has_factors else float(user_factor_reg)
        blended = blend_weight is not None
        if blended and not has_factors:
            raise MeloError("the fold-in blend's start needs the factor term: add --user_factors=K (K > 0)")
        self.blend_weight = float(blend_weight) if blended else None
        self.blend_item_offset = (torch.as_tensor(blend_item_offset, dtype=torch.float64)
                                  if blended and blend_item_offset is not None else None)
        self.blend_bias_reg = None if not blended or blend_bias_reg is None else float(blend_bias_reg)
        self.blend_bias_decay = decay_setting(blend_bias_decay) if blended else None
        with torch.no_grad():
            backbone.global_mean.fill_(float(mean))
            if item_biases is not None:
                backbone.item_bias.weight.copy_(
                    torch.as_tensor(item_biases, dtype=backbone.item_bias.weight.dtype)[:, None])
            if item_factors is not None and has_factors:
                factors = torch.as_tensor(item_factors, dtype=backbone.item_factor.weight.dtype)
                backbone.item_factor.weight.zero_()
                backbone.item_factor.weight[:, :factors.shape[1]] = factors

    def task_start(self, backbone, params, items, labels, mask, weights_of=None, age=None, offset=None):
        """`params` with b_user moved, for this task, to the fold-in's shrunk estimate from its support set
        (items, labels, mask): b_user + fold_in_shift of the residuals at b_user, with `user_bias_reg` as
        λ. With f ≡ 0 and b_user = 0 that is the user + item bias fold-in exactly: the inner loop (or
        fine-tuning) starts where the fold-in ends. With a factor term and `user_factor_reg` set, (p_user,
        b_user) move jointly by `fold_in_solve`: with f ≡ 0 the MF fold-in exactly.
        `weights_of(predictions) -> [..., L]`: per-position weights of the fit (MELO's learned weights, with
        --weighted_start), so the start minimises the weighted inner loss over the user's parameters; with
        `user_decay` γ and the positions' recency `age` [..., L], the fit weighs each rating by γ^age too
        (`recency_weights`), as the fold-in it starts from. `params` unchanged without that start.
        Under the fold-in blend's start (s = `blend_weight`) both fold-ins are solved on the residuals their
        own item biases leave, b − s·d and b + (1 − s)·d for the blend's b and `offset` d [..., L] (the
        positions' `start_offset`; None: looked up by `items`, which must then be item ids, not a small
        table's), each with its own λs and γ: b_user moves by (1 − s) · the bias fold-in's shift + s · the
        MF fold-in's, p_user by s · the MF fold-in's; with f ≡ 0 the head is then the fold-in blend."""
        if self.user_bias_reg is None:
            return params
        predictions = functional_call(backbone, params, (items,))
        residuals = labels - predictions
        learned = None if weights_of is None else weights_of(predictions)
        if self.blend_weight is not None:
            return self.blend_task_start(params, residuals, items, mask, learned, age, offset)
        weights = with_recency(learned, age, items, mask, self.user_decay, residuals.dtype)
        if self.user_factor_reg is None:
            shift = fold_in_shift(residuals, items, mask, self.user_bias_reg, weights)
            return {**params, USER_BIAS: params[USER_BIAS] + shift}
        shift = fold_in_solve(residuals, params[ITEM_FACTOR][items], items, mask, self.user_factor_reg,
                              self.user_bias_reg, weights)
        return {**params, USER_FACTOR: params[USER_FACTOR] + shift[:-1], USER_BIAS: params[USER_BIAS] + shift[-1]}

    def blend_task_start(self, params, residuals, items, mask, learned, age, offset):
        """`task_start` under the fold-in blend's start: `learned` the positions' learned weights (or None),
        each fold-in's fit weighted by them and its own recency weights."""
        s = self.blend_weight
        offset = (self.start_offset(items) if offset is None else offset).to(residuals)
        bias_weights = with_recency(learned, age, items, mask, self.blend_bias_decay, residuals.dtype)
        mf_weights = with_recency(learned, age, items, mask, self.user_decay, residuals.dtype)
        shift = fold_in_shift(residuals + s * offset, items, mask, self.blend_bias_reg, bias_weights)
        solved = fold_in_solve(residuals - (1 - s) * offset, params[ITEM_FACTOR][items], items, mask,
                               self.user_factor_reg, self.user_bias_reg, mf_weights)
        return {**params, USER_FACTOR: params[USER_FACTOR] + s * solved[:-1],
                USER_BIAS: params[USER_BIAS] + (1 - s) * shift + s * solved[-1]}

    def start_offset(self, item_ids):
        """Per position of `item_ids` (item ids), the fold-in blend's item offset d (None: no blend)."""
        if self.blend_weight is None:
            return None
        if self.blend_item_offset.device != item_ids.device:  # once, not every batch: kept where it is used
            self.blend_item_offset = self.blend_item_offset.to(item_ids.device)
        return self.blend_item_offset[item_ids]


for _head in (PlainHead, BiasHead):
    register_head(_head)


# ------------------------------------------------------------------ the fold-in start's arithmetic
def distinct_item_share(items, mask, dtype, weights=None):
    """Per position of `items` [..., L] (flattened), 1/m at each of an item's m real positions (`mask`) and 0
    at padding: an item in several (overlapping) windows counts once, as in the baselines' support sets.
    With `weights` [..., L], each position's share is scaled by its weight (an item's weight is then the
    mean of its positions')."""
    items, real = items.flatten(), mask.flatten()
    multiplicity = ((items[:, None] == items[None, :]) & real[None, :]).sum(1).clamp_min(1)
    share = real.to(dtype) / multiplicity
    return share if weights is None else share * weights.flatten()


def fold_in_shift(residuals, items, mask, reg, weights=None):
    """The fold-in's user bias from a support set's residuals y − ŷ [..., L] at item ids `items` and real
    positions `mask`: Σ over its distinct items of their mean residual, / (number of distinct items + reg).
    An item in several (overlapping) windows counts once, as in baselines.user_item_bias; 0 if nothing
    is real and reg = 0; with `weights`, the weighted mean. Pure tensor code (no data-dependent shapes),
    so it runs under vmap."""
    share = distinct_item_share(items, mask, residuals.dtype, weights)
    total, count = (residuals.flatten() * share).sum(), share.sum() + reg
    return torch.where(count > 0, total / count.clamp_min(1e-12), torch.zeros_like(total))


def fold_in_solve(residuals, factors, items, mask, factor_reg, bias_reg, weights=None):
    """The MF fold-in's (p_user [K], b_user) from a support set's residuals y − ŷ [..., L] and the item
    factors at its positions [..., L, K]: the ridge regression of the residuals on [q_item, 1] over its
    distinct items (each counted once, as in baselines.mf_fold_in; with `weights`, weighted least
    squares), penalties λ_p on p and λ_b on b. A 1e-9 on the diagonal keeps an empty support set with
    λ_b = 0 solvable. Runs under vmap."""
    share = distinct_item_share(items, mask, residuals.dtype, weights)
    x = torch.cat([factors.flatten(0, -2), torch.ones_like(share)[:, None]], dim=1)  # [N, K + 1]
    weighted = x * share[:, None]
    penalty = torch.full((x.shape[1],), float(factor_reg), dtype=x.dtype, device=x.device)
    penalty[-1] = float(bias_reg)
    gram = weighted.T @ x + torch.diag(penalty + 1e-9)
    return torch.linalg.solve(gram, weighted.T @ residuals.flatten())


def decay_setting(decay):
    """A fold-in start's recency decay γ as the head keeps it: None for none (None or 1)."""
    return None if decay is None or float(decay) == 1.0 else float(decay)


def with_recency(weights, age, items, mask, decay, dtype):
    """`weights` [..., L] (None: every position alike) times the positions' recency weights
    (`recency_weights`); unchanged without a decay γ or the positions' `age`."""
    if decay is None or age is None:
        return weights
    decayed = recency_weights(age, items, mask, decay, dtype)
    return decayed if weights is None else weights * decayed


def recency_weights(age, items, mask, decay, dtype):
    """γ^age per support position [..., L], scaled to mean 1 over the task's distinct items (as
    baselines.SupportSets.decay_weights), so the start's shrinkage λ keeps its meaning."""
    weights = decay ** age.to(dtype)
    share = distinct_item_share(items, mask, dtype)
    return weights / ((share * weights.flatten()).sum() / share.sum().clamp_min(1e-12)).clamp_min(1e-12)
