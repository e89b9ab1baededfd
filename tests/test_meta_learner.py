"""The meta-learning pieces: LSLR, the multi-step loss vector, the learned losses' meta-gradients, and
the equivalence of the fast (vmap, per-task item table) path with the simple per-task loop."""
import os
import types

import pytest
import torch

from inner_loop_optimizers import LSLRGradientDescent
import meta_learner
from meta_learner import build_meta_learner, last_step_weights, local_item_tables, multi_step_loss_weights
from evaluation.metrics import balanced_rating_weights
from models.loss_networks import AdaptiveInnerLoss, MSEInnerLoss, masked_mean
import options
from training.analysis import (POSITION_FACTOR, SHARE_NAMES, WithPositionFactor, query_gradient_by_rating,
                               query_gradient_by_share, query_gradient_of_weights, summarise_query_gradients,
                               support_weights)

NUM_ITEMS = 40
BACKBONES = ["bert4rec", "sasrec", "gru4rec", "narm"]
# MELO_TEST_DEVICE=cuda runs the float64 checks of the second-order meta-gradient on a GPU
# (docs/reproducibility.md, Checking a GPU machine).
DEVICE = torch.device(os.environ.get("MELO_TEST_DEVICE", "cpu"))


def on_device(batch):
    return types.SimpleNamespace(**{name: value.to(DEVICE) for name, value in vars(batch).items()})


def random_batch(num_tasks=3, num_support=4, num_query=2, length=8, seed=0):
    """A TaskBatch-like set of random left-padded windows with half-star ratings."""
    generator = torch.Generator().manual_seed(seed)

    def windows(count):
        items = torch.randint(1, NUM_ITEMS + 1, (num_tasks, count, length), generator=generator)
        lengths = torch.randint(2, length, (num_tasks, count, 1), generator=generator)
        items = torch.where(torch.arange(length) >= length - lengths, items, 0)
        stars = torch.randint(1, 11, items.shape, generator=generator).float() / 2
        return items, torch.where(items > 0, stars, torch.zeros_like(stars))

    support_items, support_ratings = windows(num_support)
    support_items[0, -1] = 0  # a missing support window, as for users with a short history
    support_ratings[0, -1] = 0
    query_items, query_ratings = windows(num_query)
    return types.SimpleNamespace(
        support_items=support_items, support_ratings=support_ratings,
        support_mask=support_items.ne(0).any(-1), query_items=query_items, query_ratings=query_ratings,
        support_age=torch.where(support_items > 0, torch.arange(length).flip(0).expand_as(support_items), 0),
        query_mask=torch.ones(num_tasks, num_query, dtype=torch.bool))


def make_learner(model, *flags):
    args = options.parse_args([f"--model={model}", "--max_seq_len=8", "--bert_dropout=0", "--bert_hidden_units=8",
                               "--bert_num_heads=2", "--gru4rec_hidden_size=8", "--gru4rec_embedding_dim=8",
                               "--narm_hidden_size=8", "--narm_embedding_dim=8", "--lstm_hidden=8",
                               "--lstm_input_size=4", "--inner_lr=0.5", *flags])
    return build_meta_learner(args, NUM_ITEMS, 5.0)


def gradients(learner):
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


def test_lslr_with_fixed_rates_is_a_hand_computed_sgd_step():
    params = {"a.weight": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    grads = {"a.weight": torch.tensor([0.5, -1.0]), "b": torch.tensor([[2.0]])}
    lslr = LSLRGradientDescent(params, num_inner_steps=3, init_lr=0.1, learnable=False)
    with torch.no_grad():
        lslr.lrs["b"][2] = 0.25
    step0 = lslr.update(params, grads, 0)
    assert torch.allclose(step0["a.weight"], torch.tensor([0.95, 2.1]))
    assert torch.allclose(step0["b"], torch.tensor([[2.8]]))
    assert torch.allclose(lslr.update(params, grads, 2)["b"], torch.tensor([[2.5]]))
    assert all(len(rates) == 3 for rates in lslr.rates_by_parameter().values())
    assert not any(p.requires_grad for p in lslr.parameters())


def test_multi_step_loss_vector_sums_to_one_and_anneals_towards_the_last_step():
    steps, epochs = 4, 100
    start = multi_step_loss_weights(0, steps, epochs)
    assert torch.allclose(start, torch.full((steps,), 0.25, dtype=torch.float64))
    previous = start
    for iteration in range(1, 2 * epochs):
        weights = multi_step_loss_weights(iteration, steps, epochs)
        assert weights.sum().item() == pytest.approx(1.0)
        assert (weights[:-1] <= previous[:-1] + 1e-12).all() and weights[-1] >= previous[-1] - 1e-12
        previous = weights
    floor = 0.03 / steps
    assert torch.allclose(previous[:-1], torch.full((steps - 1,), floor, dtype=torch.float64))
    assert previous[-1].item() == pytest.approx(1 - (steps - 1) * floor)
    assert last_step_weights(steps).tolist() == [0, 0, 0, 1]


def test_each_outer_iteration_gets_its_step_weights_and_derivative_order(monkeypatch):
    """MAML++'s schedule, chosen by the iteration in one place: the multi-step loss for
    --multi_step_loss_num_epochs iterations (none with --use_multi_step=False), first-order derivatives for
    --first_order_iterations, then the last step's loss at second order."""
    args = options.parse_args(["--num_inner_steps=3", "--multi_step_loss_num_epochs=4", "--first_order_iterations=2",
                               "--task_chunk=5", "--grad_clip=7"])
    calls = []
    monkeypatch.setattr(meta_learner, "outer_step", lambda *a: calls.append(a) or 0.0)
    for iteration in (0, 1, 2, 3, 4, 9):
        meta_learner.meta_train_step("learner", "optimizer", "scheduler", "batch", args, iteration, 16, "dist")
    weights = [call[4] for call in calls]
    assert [call[7] for call in calls] == [True, True, False, False, False, False]
    assert all(call[5:7] == (16, "dist") and call[8:] == (5, 7.0) for call in calls)
    for iteration, got in zip((0, 1, 2, 3), weights):
        assert torch.equal(got, multi_step_loss_weights(iteration, 3, 4))
    assert all(got.tolist() == [0, 0, 1] for got in weights[4:])
    args.use_multi_step = False
    assert meta_learner.step_weights(args, 0).tolist() == [0, 0, 1]


def test_local_item_tables_hold_exactly_each_tasks_items():
    windows = torch.tensor([[0, 7, 3, 7, 3], [5, 5, 5, 5, 5], [0, 0, 9, 1, 2]])
    local_ids, remapped = local_item_tables(windows)
    assert torch.equal(local_ids.gather(1, remapped), windows)
    assert (local_ids[:, 0] == 0).all()
    for task, row in enumerate(windows):
        used = set(local_ids[task].tolist())
        assert used == set(row.tolist()) | {0}
        assert torch.equal(local_ids[task], local_ids[task].sort().values)


@pytest.mark.parametrize("model", BACKBONES)
@pytest.mark.parametrize("adaptive", ["True", "False"])
def test_fast_path_equals_the_per_task_path_in_float64(float64, model, adaptive):
    learner = make_learner(model, f"--use_adaptive_loss={adaptive}")
    # Move the adaptive loss off its neutral start so its own path matters in the comparison.
    for p in learner.inner_loss.parameters():
        torch.nn.init.normal_(p, std=0.3)
    learner.to(DEVICE)
    ref_grads = assert_fast_path_equals_the_per_task_path(learner, on_device(random_batch()))
    assert any(g.abs().sum() > 0 for n, g in ref_grads.items() if n.startswith("lslr."))


def assert_fast_path_equals_the_per_task_path(learner, batch):
    """The outer losses, their gradients and the predictions of both paths agree (float64); returns the
    reference path's gradients."""
    results = []
    for fast in (True, False):
        learner.zero_grad()
        losses = learner.task_losses(batch, multi_step_loss_weights(10, 3, 100), fast=fast)
        losses.sum().backward()
        results.append((losses.detach(), gradients(learner), learner.predict(batch, fast=fast)))
    (fast_loss, fast_grads, fast_pred), (ref_loss, ref_grads, ref_pred) = results
    assert torch.allclose(fast_loss, ref_loss, rtol=1e-10, atol=1e-12)
    assert fast_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.allclose(fast_grads[name], ref_grads[name], rtol=1e-8, atol=1e-12), name
    assert torch.allclose(fast_pred, ref_pred, rtol=1e-10, atol=1e-12)
    return ref_grads


def central_difference(learner, batch, weights, parameter, eps=1e-6):
    """d(sum of the outer losses) / d(parameter's first entry), by a central finite difference."""
    with torch.no_grad():
        parameter.view(-1)[0] += eps
        plus = learner.task_losses(batch, weights).sum().item()
        parameter.view(-1)[0] -= 2 * eps
        minus = learner.task_losses(batch, weights).sum().item()
        parameter.view(-1)[0] += eps
    return (plus - minus) / (2 * eps)


def test_second_order_meta_gradient_matches_finite_differences(float64):
    learner = make_learner("sasrec", "--use_adaptive_loss=False", "--num_inner_steps=2").to(DEVICE)
    batch = on_device(random_batch(num_tasks=2))
    weights = last_step_weights(2)
    learner.zero_grad()
    learner.task_losses(batch, weights).sum().backward()
    for parameter in (learner.backbone.head.weight, next(iter(learner.lslr.parameters()))):
        assert parameter.grad.view(-1)[0].item() == pytest.approx(
            central_difference(learner, batch, weights, parameter), rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("flags", [[], ["--use_mlp=True"], ["--use_mlp_mean=True", "--use_step_loss=True"],
                                   ["--use_softmax=True"], ["--use_focal_loss=True"]])
def test_learned_losses_get_meta_gradients_in_both_orders(flags):
    learner = make_learner("gru4rec", *flags)
    assert isinstance(learner.inner_loss, AdaptiveInnerLoss)
    for p in learner.inner_loss.parameters():  # leave the neutral start, as after a few outer steps
        torch.nn.init.normal_(p, std=0.3)
    batch = random_batch()
    weights = multi_step_loss_weights(0, 3, 10)
    per_order = {}
    for first_order in (False, True):
        learner.zero_grad()
        learner.task_losses(batch, weights, first_order=first_order).sum().backward()
        grads = gradients(learner)
        loss_grads = [g for n, g in grads.items() if n.startswith("inner_loss.")]
        assert loss_grads and all(torch.isfinite(g).all() for g in loss_grads)
        assert sum(g.abs().sum() for g in loss_grads) > 0, f"first_order={first_order}"
        per_order[first_order] = grads
    # First order drops the backbone's second-order terms, so its meta-gradient changes.
    backbone_name = next(n for n in per_order[True] if n.startswith("backbone."))
    assert not torch.allclose(per_order[True][backbone_name], per_order[False][backbone_name])


def test_melo_starts_as_plain_maml():
    """Zero-initialised last layers make every adaptive weight 1: MELO's first step is MAML++'s."""
    batch = random_batch()
    weights = multi_step_loss_weights(0, 3, 10)
    melo = make_learner("narm", "--use_adaptive_loss=True")
    maml = make_learner("narm", "--use_adaptive_loss=False")
    assert isinstance(maml.inner_loss, MSEInnerLoss)
    assert torch.allclose(melo.task_losses(batch, weights), maml.task_losses(batch, weights))
    found = support_weights(melo, batch)
    assert found is not None and torch.allclose(found[0], torch.ones_like(found[0]))



def test_building_a_learner_depends_only_on_the_init_seed_and_leaves_the_random_state_alone():
    def build(seed):
        return make_learner("sasrec", "--use_adaptive_loss=True", f"--model_init_seed={seed}").state_dict()

    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    first = build(5)
    assert torch.equal(torch.rand(3), expected)  # the caller's stream goes on as if nothing was drawn
    torch.manual_seed(2)
    assert all(torch.equal(first[k], v) for k, v in build(5).items())
    other = build(6)
    for part in ("backbone.", "inner_loss."):
        assert any(not torch.equal(first[k], other[k]) for k in first if k.startswith(part))


# ---------------------------------------------------------------------------- MELO's weights (issue 13)
def perturbed(learner, seed=0):
    """The learner with its loss network moved off the neutral start, as after some outer steps."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learner.inner_loss.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return learner


@pytest.mark.parametrize("flags", [[], ["--task_state=per_step"], ["--use_mlp=True"], ["--adaptive_weights=centred"]])
def test_normalised_weights_have_mean_one_over_each_tasks_real_positions(flags):
    learner = perturbed(make_learner("gru4rec", "--adaptive_weights=normalised", *flags))
    batch = random_batch(num_tasks=4)
    weights, _, mask = support_weights(learner, batch)  # [T, K, S, L]
    assert weights.shape[:2] == (4, learner.num_inner_steps)
    real = mask[:, None].expand_as(weights).to(weights.dtype)
    means = (weights * real).sum((2, 3)) / real.sum((2, 3))
    assert torch.allclose(means, torch.ones_like(means), atol=1e-5)
    assert weights[mask[:, None].expand_as(weights)].std() > 0.01  # they redistribute, not all 1
    if "--task_state=per_step" in flags:  # recomputed from the current predictions at every step
        assert not torch.allclose(weights[:, 0], weights[:, -1])


def test_weight_forms_at_the_neutral_start_and_off_it():
    batch = random_batch()
    logits = torch.tensor([[-3.0, 0.0, 3.0]])
    mask = torch.tensor([[True, True, False]])
    bounded = make_learner("gru4rec", "--adaptive_weights=bounded").inner_loss
    unbounded = make_learner("gru4rec", "--adaptive_weights=unbounded").inner_loss
    normalised = make_learner("gru4rec", "--adaptive_weights=normalised").inner_loss
    assert torch.allclose(bounded._weights(logits, mask), 2 * torch.sigmoid(logits))
    assert torch.allclose(unbounded._weights(logits, mask), torch.tensor([[2.0, 1.0, 4.0]]))
    raw = 0.1 + 2 * torch.sigmoid(logits)
    expected = raw / raw[:, :2].mean()
    assert torch.allclose(normalised._weights(logits, mask), expected)
    # centred: only differences between a task's logits count, so a common shift (even one that saturates
    # every sigmoid, where normalised weights all become 1) changes nothing
    centred = make_learner("gru4rec", "--adaptive_weights=centred").inner_loss
    raw = 0.1 + 2 * torch.sigmoid(torch.tensor([[-1.5, 1.5]]))  # -3 and 0, centred on the real positions
    for shift in (0.0, -30.0, 30.0):
        found = centred._weights(logits + shift, mask)
        assert torch.allclose(found[:, :2], raw / raw.mean(), atol=1e-6), shift
    assert torch.allclose(normalised._weights(logits - 30.0, mask)[:, :2], torch.ones(1, 2))  # saturated
    assert not torch.allclose(centred._weights(logits - 1.5, mask), normalised._weights(logits - 1.5, mask))
    for form in ("bounded", "unbounded", "normalised", "centred"):  # every form starts with every weight 1
        weights, _, _ = support_weights(make_learner("sasrec", f"--adaptive_weights={form}"), batch)
        assert torch.equal(weights, torch.ones_like(weights)), form


@pytest.mark.parametrize("task_state", ["static", "per_step"])
def test_weight_network_meta_gradient_matches_finite_differences(float64, task_state):
    learner = perturbed(make_learner("gru4rec", "--num_inner_steps=2", f"--task_state={task_state}")).to(DEVICE)
    batch = on_device(random_batch(num_tasks=2))
    weights = last_step_weights(2)
    learner.zero_grad()
    learner.task_losses(batch, weights).sum().backward()
    head = learner.inner_loss.encoder.head
    for parameter in (head[0].weight, head[-1].weight, learner.inner_loss.encoder.lstm.weight_hh_l0):
        analytic = parameter.grad.view(-1)[0].item()
        assert analytic != 0.0
        assert analytic == pytest.approx(central_difference(learner, batch, weights, parameter), rel=1e-5, abs=1e-10)


def test_query_loss_target_scores_only_the_last_position():
    batch = random_batch()
    weights = last_step_weights(3)
    changed = types.SimpleNamespace(**vars(batch))
    changed.query_ratings = batch.query_ratings.clone()
    changed.query_ratings[..., :-1] = torch.where(batch.query_items[..., :-1] > 0, 0.5, 0.0)  # not the target
    target = make_learner("bert4rec", "--query_loss=target")
    every = make_learner("bert4rec", "--query_loss=all")
    assert torch.equal(target.task_losses(batch, weights), target.task_losses(changed, weights))
    assert not torch.allclose(every.task_losses(batch, weights), every.task_losses(changed, weights))
    # by hand: after adaptation, the squared error of each window's last prediction, in rating units / 5
    _, predictions = target.run_tasks(batch, (2,))
    expected = ((predictions - batch.query_ratings[..., -1] / 5) ** 2).mean(1)
    assert torch.allclose(target.task_losses(batch, weights), expected, atol=1e-6)


def test_balanced_rating_weights_average_one_and_equalise_the_ratings():
    ratings = torch.tensor([4.0] * 6 + [5.0] * 3 + [1.0] + [3.5] * 2)
    weights = balanced_rating_weights(ratings, 5.0)
    assert weights.shape == (11,)
    assert torch.isclose(weights[(ratings * 2).long()].mean(), torch.tensor(1.0, dtype=torch.float64))
    counts = torch.bincount((ratings * 2).long(), minlength=11).double()
    shares = weights * counts  # each rating present carries the same total weight
    assert torch.allclose(shares[counts > 0], shares[counts > 0][0].expand(4))
    assert torch.all(weights[counts == 0] == 0)


def test_query_loss_balanced_weights_each_target_by_its_rating():
    batch = random_batch()
    weights = last_step_weights(3)
    balanced = make_learner("bert4rec", "--query_loss=balanced")
    target = make_learner("bert4rec", "--query_loss=target")
    # before the training users' ratings are given, every weight is 1: the target loss
    assert torch.equal(balanced.task_losses(batch, weights), target.task_losses(batch, weights))
    training_ratings = torch.tensor([1.0, 2.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.5, 5.0, 0.5])
    balanced.balance_query_ratings(training_ratings)
    rating_weights = balanced_rating_weights(training_ratings, 5.0).float()
    _, predictions = target.run_tasks(batch, (2,))
    targets = batch.query_ratings[..., -1]
    expected = (rating_weights[(targets * 2).long()] * (predictions - targets / 5) ** 2).mean(1)
    assert torch.allclose(balanced.task_losses(batch, weights), expected, atol=1e-6)
    assert not torch.allclose(balanced.task_losses(batch, weights), target.task_losses(batch, weights))


class ReweightedLoss(torch.nn.Module):
    """An independent re-weighting of a learner's plain inner loss (MSE, or MELO's weights times the squared
    error): each position's term times `factor` [S, L] at every inner step, for a batch of one task."""

    def __init__(self, loss, factor):
        super().__init__()
        self.loss, self.factor = loss, factor
        self.has_weights = loss.has_weights

    def prepare(self, labels, mask, age=None):
        return self.loss.prepare(labels, mask, age)

    def forward(self, predictions, labels, mask, context, step):
        weights = self.loss.position_weights(predictions, labels, mask, context, step) if self.has_weights else 1.0
        return masked_mean(weights * self.factor * (predictions - labels) ** 2, mask)


@pytest.mark.parametrize("adaptive", ["False", "True"])
def test_query_gradient_of_weights_matches_finite_differences(float64, adaptive):
    """The report's query_gradient_by_rating: the derivative of a task's query loss (stars²) when its
    positions of one rating gain weight and all lose it evenly, second order through the inner loop;
    checked against a plain per-task run with independently re-weighted inner losses."""
    learner = make_learner("gru4rec", "--num_inner_steps=2", f"--use_adaptive_loss={adaptive}").to(DEVICE)
    if adaptive == "True":
        perturbed(learner)
    batch = on_device(random_batch(num_tasks=3))
    mask = batch.support_items != 0
    batch.support_ratings = torch.where(mask, batch.support_ratings, -1.0)  # padding: --default_rating=-1
    batch.support_ratings[2] = torch.where(mask[2], 3.0, -1.0)  # task 2 rates everything 3 stars
    plain_losses, _ = learner.run_tasks(batch, (1,))
    gradients = query_gradient_of_weights(learner, batch)
    assert torch.all(gradients[~mask] == 0)
    assert torch.allclose(gradients.sum((1, 2)), torch.zeros(3, dtype=gradients.dtype, device=DEVICE), atol=1e-12)
    found = query_gradient_by_rating(gradients, batch.support_ratings, mask, 5.0)
    assert found[2, :, 1].sum() == 0 and found[:, 0, 1].sum() == 0  # one rating only; padding never counts
    # a factor of ones changes nothing
    ones, _ = learner.vmap_tasks(batch, lambda params, support, context, query: learner.adapt_task(
        params, support, context, query, (1,), first_order=False, inner_loss=WithPositionFactor(learner.inner_loss)),
        {POSITION_FACTOR: torch.ones_like(gradients)})
    assert torch.equal(ones, plain_losses)

    stars = batch.support_ratings[0][mask[0]]
    rating = stars.mode().values.item()  # task 0's most common rating
    on_rating = mask[0] & (batch.support_ratings[0] == rating)
    direction = on_rating.double() - mask[0].double() * on_rating.sum() / mask[0].sum()
    first = types.SimpleNamespace(**{name: value[:1] for name, value in vars(batch).items()})
    plain_loss = learner.inner_loss

    def query_loss(factor):
        learner.inner_loss = ReweightedLoss(plain_loss, factor)
        try:
            losses, _ = learner.run_tasks(first, (1,), fast=False)
        finally:
            learner.inner_loss = plain_loss
        return losses[0, 0].item() * 25.0

    eps = 1e-5
    with torch.no_grad():
        changed = (query_loss(1 + eps * direction) - query_loss(1 - eps * direction)) / (2 * eps)
    bucket = int(round(rating * 2))
    assert found[0, bucket, 0].item() != 0.0 and found[0, bucket, 1].item() == 1.0
    assert found[0, bucket, 0].item() == pytest.approx(changed, rel=1e-5, abs=1e-10)


def test_query_gradient_summary_per_rating():
    found = torch.zeros(5, 11, 2, dtype=torch.float64)
    found[:, 2] = torch.tensor([[-1.0, 1], [-3.0, 1], [2.0, 1], [0.0, 0], [float("nan"), 1]])  # 1★
    found[0, 10] = torch.tensor([0.5, 1])  # 5★: one user
    summary = summarise_query_gradients(found)
    assert set(summary) == {"1", "5"}
    assert summary["1"]["mean"] == pytest.approx(-2 / 3) and summary["1"]["users"] == 3
    assert summary["1"]["non_finite"] == 1  # left out, not a nan report
    assert summary["1"]["t"] == pytest.approx((-2 / 3) / (torch.tensor([-1.0, -3, 2]).std().item() / 3 ** 0.5))
    assert summary["1"]["helped"] == pytest.approx(2 / 3)
    assert summary["5"]["t"] is None and summary["5"]["helped"] == 0.0  # one user: no spread


def test_query_gradient_by_share_groups_positions_by_how_common_their_rating_is_for_the_user():
    # task 0: nine 4★, one 1★, one 2★ (each 1/11 < 10 %), one padding position; task 1: only 3★
    stars = torch.tensor([[4.0] * 9 + [1.0, 2.0, 0.0], [3.0] * 11 + [0.0]])
    mask = stars > 0
    gradients = torch.arange(24, dtype=torch.float64).view(2, 12) * mask
    found = query_gradient_by_share(gradients, stars, mask, 5.0)
    assert found.shape == (2, len(SHARE_NAMES), 2)
    rare, common = SHARE_NAMES.index("<10%"), SHARE_NAMES.index(">=50%")
    assert found[0, rare].tolist() == [9.0 + 10.0, 1.0] and found[0, common].tolist() == [sum(range(9)), 1.0]
    assert found[0, 1:3, 1].sum() == 0  # no rating with a 10-50 % share
    assert found[1, :, 1].sum() == 0  # one rating only: nothing can move
    summary = summarise_query_gradients(found, SHARE_NAMES)
    assert set(summary) == {"<10%", ">=50%"} and summary["<10%"]["users"] == 1
