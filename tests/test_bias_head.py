"""The bias rating head (--rating_head=bias): ŷ = μ + b_user + b_item + f(window) on every backbone, its
place in the inner loop (b_user with its own learned rate, b_item through the per-task item table), what
--inner_params / --adapt_*_bias adapt, and the Basic -> MAML hand-off with it."""
import math
import os
import types

import numpy as np
import pytest
import torch
from torch.func import functional_call

from common import errors
from common.runtime import Distributed
from evaluation import baselines
import main
from meta_learner import last_step_weights, local_item_tables
from models import heads, model_factory
from models.heads import ITEM_BIAS, USER_BIAS
import options
from ratings.preprocess import load_data
from ratings.tasks import MetaDataset
import train_original
from training.analysis import support_weights

from test_meta_learner import (BACKBONES, NUM_ITEMS, assert_fast_path_equals_the_per_task_path, make_learner,
                               random_batch)

MU = 0.7


def bias_learner(model, *flags):
    learner = make_learner(model, "--rating_head=bias", *flags)
    backbone = learner.backbone
    backbone.rating_head.set_start(backbone, MU, user_bias_reg=3.0 if "--user_bias_start=fold-in" in flags else None)
    return learner


def leave_the_start(backbone, seed=0):
    """Random biases and a non-zero output layer, as after some training (at the start f ≡ 0 and b = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if name.startswith("head.") or name in (ITEM_BIAS, USER_BIAS):
                p.copy_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
        backbone.item_bias.weight[0] = 0


@pytest.mark.parametrize("model", BACKBONES)
def test_an_untrained_bias_head_predicts_mu_plus_the_biases_and_the_plain_head_has_none(model):
    learner = bias_learner(model)
    backbone = learner.backbone.eval()
    with torch.no_grad():
        backbone.item_bias.weight.copy_(torch.linspace(-0.2, 0.2, NUM_ITEMS + 1)[:, None])
        backbone.user_bias.fill_(0.05)
    items = random_batch().support_items[0]
    expected = MU + 0.05 + backbone.item_bias.weight[items, 0]
    real = items > 0
    torch.testing.assert_close(backbone(items)[real], expected[real], rtol=0, atol=1e-6)
    plain = dict(make_learner(model, "--rating_head=plain").backbone.named_parameters())
    assert ITEM_BIAS not in plain and USER_BIAS not in plain
    # the bias head draws nothing at random: every weight but the (zeroed) output layer is the plain model's
    for name, value in backbone.named_parameters():
        if name in plain and not name.startswith("head."):
            assert torch.equal(value, plain[name]), name


@pytest.mark.parametrize("model", BACKBONES)
def test_the_bias_head_on_a_small_item_table_gives_the_same_output(model):
    # What the inner loop does (the cost stays independent of the catalog): only the rows a task uses, of
    # the embedding and the item biases alike, with the ids remapped.
    backbone = bias_learner(model).backbone.eval()
    leave_the_start(backbone)
    items = random_batch().support_items[0]
    local_ids, remapped = local_item_tables(items.flatten()[None])
    params = dict(backbone.named_parameters())
    for name in ("item_embedding.weight", ITEM_BIAS):
        params[name] = params[name][local_ids[0]]
        assert params[name].shape[0] < NUM_ITEMS + 1
    torch.testing.assert_close(functional_call(backbone, params, (remapped[0].view_as(items),)), backbone(items),
                               rtol=0, atol=1e-6)


def test_one_inner_step_on_the_user_bias_is_the_closed_form_fold_in(float64):
    # f ≡ 0 (the untrained output layer, kept there by a zero rate), fixed item biases, equal weights (MSE),
    # b_user stepped with --user_bias_lr=0.5: the step b_u − ½ · 2 · mean(ŷ − y) lands on
    # mean(y − μ − b_item), the least-squares user bias.
    learner = bias_learner("gru4rec", "--use_adaptive_loss=False", "--num_inner_steps=1", "--inner_params=head",
                           "--adapt_item_bias=False", "--inner_lr=0", "--user_bias_lr=0.5").eval()
    assert learner.lslr.rates_by_parameter()[USER_BIAS] == [0.5]
    assert {rates[0] for name, rates in learner.lslr.rates_by_parameter().items() if name != USER_BIAS} == {0.0}
    backbone = learner.backbone
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        backbone.item_bias.weight.copy_(0.2 * torch.randn(NUM_ITEMS + 1, 1, generator=generator))
        backbone.user_bias.fill_(-0.3)  # the meta-learned start does not matter for one exact step
    batch = random_batch()
    predicted = learner.predict(batch) / 5.0  # normalised, after the inner step
    for task in range(3):
        items, stars = batch.support_items[task], batch.support_ratings[task]
        real = items > 0
        residual = stars[real] / 5.0 - MU - backbone.item_bias.weight[items[real], 0]
        fold_in = residual.sum() / real.sum()
        targets = batch.query_items[task, :, -1]
        user_bias = predicted[task] - MU - backbone.item_bias.weight[targets, 0]
        torch.testing.assert_close(user_bias, fold_in.expand_as(user_bias), rtol=0, atol=1e-6)


@pytest.mark.parametrize("model", ["gru4rec", "bert4rec"])
def test_the_fold_in_start_of_the_user_bias_is_the_closed_form_fold_in(float64, model):
    # --user_bias_start=fold-in: f ≡ 0 (untrained), every inner rate 0, b_user's meta-learned value 0: each
    # task's prediction is the user + item bias fold-in of baselines.py, shrinkage and repeated items alike
    learner = bias_learner(model, "--use_adaptive_loss=False", "--num_inner_steps=1", "--inner_lr=0",
                           "--user_bias_lr=0", "--user_bias_start=fold-in").eval()
    backbone = learner.backbone
    biases = 0.2 * torch.randn(NUM_ITEMS + 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    biases[0] = 0
    backbone.rating_head.set_start(backbone, MU, biases, user_bias_reg=2.5)
    batch = random_batch()
    batch.support_items[1, 1, -3:] = batch.support_items[1, 0, -3:]  # items in two windows, other ratings
    predicted = learner.predict(batch)
    sets = baselines.support_sets(batch.support_items.numpy(), batch.support_ratings.numpy(),
                                  batch.support_mask.numpy())
    assert any(len(items) < (batch.support_items[task] > 0).sum() for task, (items, _) in enumerate(sets))
    expected = baselines.user_item_bias(sets, batch.query_items[:, :, -1].numpy(), MU * 5, biases.numpy() * 5,
                                        2.5, -math.inf, math.inf)
    torch.testing.assert_close(predicted, torch.from_numpy(expected), rtol=0, atol=1e-6)
    # the meta-learned b_user is the prior the shift shrinks towards: b + Σ(r − ŷ(b)) / (n + λ)
    with torch.no_grad():
        backbone.user_bias.fill_(0.1)
    shrunk_towards = learner.predict(batch) - predicted
    counts = torch.tensor([float(len(items)) for items, _ in sets])
    torch.testing.assert_close(shrunk_towards, (0.5 * 2.5 / (counts + 2.5))[:, None].expand_as(predicted),
                               rtol=0, atol=1e-6)
    # the start keeps its graph: the meta-gradient of b_user's meta-learned value is λ / (n + λ) per task
    learner.zero_grad()
    learner.run_tasks(batch, (0,))[1].sum().backward()
    torch.testing.assert_close(backbone.user_bias.grad, (2.5 / (counts + 2.5)).sum() * batch.query_items.shape[1],
                               rtol=0, atol=1e-6)


def test_the_reported_weights_are_the_inner_loops_from_the_fold_in_start(float64):
    # weights that read the predictions (METAL-style per-step state): the report's step-0 weights are those
    # of the started parameters, as in the inner loop
    learner = bias_learner("gru4rec", "--use_adaptive_loss=True", "--task_state=per_step",
                           "--user_bias_start=fold-in")
    leave_the_start(learner.backbone)
    for p in learner.inner_loss.parameters():
        torch.nn.init.normal_(p, std=0.3)
    batch = random_batch()
    weights, _, _ = support_weights(learner, batch)
    support, context, _ = learner._prepare(batch)
    for task in range(3):
        items, labels, mask = (x[task] for x in support)
        backbone = learner.backbone
        params = backbone.rating_head.task_start(backbone, dict(backbone.named_parameters()), items, labels, mask)
        with torch.no_grad():
            predictions = functional_call(learner.backbone, params, (items,))
            expected = learner.inner_loss.position_weights(predictions, labels, mask,
                                                           {k: v[task] for k, v in context.items()}, 0)
        torch.testing.assert_close(weights[task, 0], expected)


def test_the_user_bias_has_its_own_learned_rate_and_second_order_meta_gradients(float64):
    learner = bias_learner("sasrec", "--use_adaptive_loss=False", "--num_inner_steps=2")
    leave_the_start(learner.backbone)
    rates = learner.lslr.rates_by_parameter()
    assert USER_BIAS in rates and ITEM_BIAS in rates
    learner.zero_grad()
    learner.task_losses(random_batch(), last_step_weights(2)).sum().backward()
    rate = learner.lslr.lrs[USER_BIAS]
    assert rate.grad is not None and rate.grad.abs().sum() > 0
    assert learner.backbone.user_bias.grad.abs() > 0
    # second order: the meta-gradient of b_user's rate through both steps matches a finite difference
    eps = 1e-6
    with torch.no_grad():
        losses = []
        for sign in (1, -1):
            rate[0] += sign * eps
            losses.append(learner.task_losses(random_batch(), last_step_weights(2)).sum().item())
            rate[0] -= sign * eps
    assert rate.grad[0].item() == pytest.approx((losses[0] - losses[1]) / (2 * eps), rel=1e-5, abs=1e-10)


@pytest.mark.parametrize("model", ["bert4rec", "gru4rec"])
@pytest.mark.parametrize("flags", [[], ["--inner_params=head"], ["--adapt_user_bias=False", "--adapt_item_bias=False"],
                                   ["--user_bias_start=fold-in"], ["--user_bias_start=fold-in", "--adapt_user_bias=False"]])
def test_fast_path_equals_the_per_task_path_with_the_bias_head(float64, model, flags):
    learner = bias_learner(model, "--use_adaptive_loss=True", *flags)
    leave_the_start(learner.backbone)
    for p in learner.inner_loss.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ref_grads = assert_fast_path_equals_the_per_task_path(learner, random_batch())
    # what is not adapted still learns in the outer loop
    assert ref_grads["backbone.item_embedding.weight"].abs().sum() > 0


def test_what_the_inner_loop_adapts():
    names = lambda *flags: set(bias_learner("gru4rec", *flags).adapted)  # noqa: E731
    everything = {name for name, _ in bias_learner("gru4rec").backbone.named_parameters()}
    assert names() == everything
    assert names("--inner_params=head") == {"head.weight", "head.bias", ITEM_BIAS, USER_BIAS}
    assert names("--inner_params=head", "--adapt_item_bias=False") == {"head.weight", "head.bias", USER_BIAS}
    assert names("--adapt_user_bias=False") == everything - {USER_BIAS}
    learner = bias_learner("gru4rec", "--inner_params=head", "--adapt_user_bias=False")
    assert set(learner.lslr.rates_by_parameter()) == {"head.weight", "head.bias", ITEM_BIAS}
    # a frozen b_user does not move in the inner loop: with f ≡ 0 and b_item frozen too, nothing adapts
    # that could change the prediction of an item the support set does not hold
    learner = bias_learner("gru4rec", "--inner_params=head", "--adapt_user_bias=False", "--adapt_item_bias=False")
    batch = random_batch()
    unseen = torch.tensor(NUM_ITEMS)
    batch.support_items = torch.where(batch.support_items == unseen, 1, batch.support_items)
    with torch.no_grad():
        learner.backbone.head.weight.zero_()
        learner.backbone.head.bias.zero_()
    learner.lslr.lrs["head-weight"].data.zero_()
    learner.lslr.lrs["head-bias"].data.zero_()
    predicted = learner.predict(batch)
    torch.testing.assert_close(predicted, torch.full_like(predicted, MU * 5.0), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- end to end

def run_flags(ratings_file, tmp_path, *extra):
    return ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--batch_size=4", "--num_samples=5", "--num_query_set=2",
            "--max_seq_len=10", "--gru4rec_hidden_size=16", "--log_interval=2", "--num_train_iterations=2",
            "--pretrain_epochs=2", f"--checkpoint_dir={tmp_path}/ckpt", f"--log_dir={tmp_path}/runs",
            f"--pretrain_log_dir={tmp_path}/pre", "--model=gru4rec", "--rating_head=bias", "--num_threads=1",
            *extra]


def test_the_bias_head_starts_at_the_fold_in_and_basic_hands_it_to_maml(ratings_file, tmp_path):
    args = options.parse_args(run_flags(ratings_file, tmp_path, "--save_pretrained=True"))
    start = train_original.BaselineTrainer(args, Distributed("cpu")).model
    data = load_data(args)
    dataset = MetaDataset.from_args(data, args)
    fitted = baselines.Fitted(data, dataset.train_users)
    (item_reg, _, _), _ = baselines.choose("user-item-bias", dataset.val_tasks(), fitted, 5.0, "rmse", "auto")
    expected = baselines.item_biases(fitted.items, fitted.ratings, fitted.mean, item_reg, fitted.num_items) / 5.0
    assert start.global_mean.item() == pytest.approx(fitted.mean / 5.0)
    torch.testing.assert_close(start.item_bias.weight[:, 0].double(), torch.from_numpy(expected), rtol=0, atol=1e-6)
    assert start.item_bias.weight.abs().sum() > 0
    zero = train_original.BaselineTrainer(options.parse_args(run_flags(ratings_file, tmp_path, "--bias_start=zero")),
                                          Distributed("cpu")).model
    assert zero.item_bias.weight.abs().sum() == 0 and zero.global_mean.item() == pytest.approx(fitted.mean / 5.0)

    basic = train_original.main(args)
    meta = main.main(options.parse_args(run_flags(ratings_file, tmp_path, "--load_pretrained=True",
                                                  "--use_adaptive_loss=False", "--num_train_iterations=1",
                                                  "--log_interval=1", "--outer_lr=0")))
    assert meta.learner.backbone.rating_head.name == "bias"
    # the whole Basic model, biases and μ included, is where MAML++ starts (no outer step moves it: lr 0)
    for name, value in basic.best_weights().items():
        torch.testing.assert_close(meta.learner.backbone.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # a plain model cannot start from a bias-head export: one line, not a partial load
    plain = run_flags(ratings_file, tmp_path, "--load_pretrained=True", "--checkpoint_dir=" + str(tmp_path / "c2"))
    plain[plain.index("--rating_head=bias")] = "--rating_head=plain"
    with pytest.raises(errors.MeloError, match="have the bias rating head and this run the plain one"):
        main.main(options.parse_args(plain))


def test_basic_and_fine_tuning_start_the_user_bias_at_the_fold_in(ratings_file, tmp_path):
    # an untrained Basic model (f ≡ 0, item biases from the fold-in) tested without steps is the fold-in
    # baseline before its clipping; with --user_bias_start=learned it ignores the user: μ + b_item
    trainer = train_original.BaselineTrainer(
        options.parse_args(run_flags(ratings_file, tmp_path, "--user_bias_start=fold-in")), Distributed("cpu"))
    tasks = trainer.dataset.test_tasks()
    fitted = baselines.Fitted(trainer.data, trainer.dataset.train_users)
    (item_reg, user_reg, decay), _ = baselines.choose("user-item-bias", trainer.dataset.val_tasks(), fitted, 5.0,
                                                      "rmse", "auto")
    head = trainer.model.rating_head
    assert head.user_bias_reg == user_reg and head.user_decay == (None if decay == 1 else decay)
    biases = baselines.item_biases(fitted.items, fitted.ratings, fitted.mean, item_reg, fitted.num_items)
    sets = baselines.sets_of(tasks)
    expected = torch.from_numpy(baselines.user_item_bias(sets, tasks.query_items[:, :, -1].numpy(), fitted.mean,
                                                         biases, user_reg, -math.inf, math.inf,
                                                         sets.decay_weights(decay)))
    zero_and_two_steps = trainer.predictions(tasks, lr=0.0, record=(0, 2))
    for predicted in zero_and_two_steps:  # at lr 0, fine-tuning stays at the start
        torch.testing.assert_close(predicted, expected, rtol=0, atol=1e-4)
    learned = train_original.BaselineTrainer(
        options.parse_args(run_flags(ratings_file, tmp_path, "--user_bias_start=learned")), Distributed("cpu"))
    assert learned.model.rating_head.user_bias_reg is None
    torch.testing.assert_close(learned.predictions(tasks, record=(0,))[0],
                               torch.from_numpy(fitted.mean + biases[tasks.query_items[:, :, -1].numpy()]),
                               rtol=0, atol=1e-4)


def test_basic_and_fine_tuning_start_at_the_fold_in_blend(ratings_file, tmp_path, monkeypatch):
    # --bias_start=blend: an untrained Basic model (f ≡ 0) tested without steps is the fold-in blend, its
    # parts at the choices the start made (the MF fold-in's ranks capped at --user_factors), the head
    # looking its item offsets up by item id; s = 0.5, the grid's only value, so both parts count
    monkeypatch.setattr(baselines, "BLEND_GRID", (0.5,))
    trainer = train_original.BaselineTrainer(
        options.parse_args(run_flags(ratings_file, tmp_path, "--bias_start=blend", "--user_factors=8")),
        Distributed("cpu"))
    tasks = trainer.dataset.test_tasks()
    fitted = baselines.Fitted(trainer.data, trainer.dataset.train_users, trainer.args.random_seed)
    values, s, _, _ = baselines.blend_choice(trainer.dataset.val_tasks(), fitted, 5.0, "rmse", "auto",
                                             baselines.factor_axes(8))
    (item_reg, user_reg, decay), (rank, reg, factor_reg, bias_reg, mf_decay) = (values[part] for part in
                                                                                baselines.BLEND_PARTS)
    sets, targets = baselines.sets_of(tasks), tasks.query_items[:, :, -1].numpy()
    bias = baselines.user_item_bias(sets, targets, fitted.mean, baselines.item_biases(
        fitted.items, fitted.ratings, fitted.mean, item_reg, fitted.num_items), user_reg, -math.inf, math.inf,
        sets.decay_weights(decay))
    mf = baselines.mf_fold_in(sets, targets, fitted.mean, *fitted.factorisation(rank, reg), factor_reg, -math.inf,
                              math.inf, bias_reg, sets.decay_weights(mf_decay))
    expected = torch.from_numpy(np.clip(s * mf + (1 - s) * bias, fitted.low, fitted.high))
    assert s == 0.5
    for predicted in trainer.predictions(tasks, lr=0.0, record=(0, 2)):  # at lr 0, fine-tuning stays there
        torch.testing.assert_close(predicted, expected, rtol=0, atol=1e-4)


def test_a_checkpoint_keeps_the_shrinkage_of_the_user_bias_start_it_trained_with(ratings_file, tmp_path):
    # λ_user is chosen on the validation tasks when a run starts; its checkpoints keep it, so a test (or a
    # resume) under other validation flags starts b_user as the run trained it, and the report says which
    argv = run_flags(ratings_file, tmp_path, "--use_adaptive_loss=False")
    chosen = main.main(options.parse_args(argv)).learner.backbone.rating_head.user_bias_reg
    path = tmp_path / "ckpt" / "gru4rec_ml-100k_maml_step2.pt"
    checkpoint = torch.load(path, weights_only=True)
    assert chosen is not None and checkpoint["user_bias_reg"] == chosen
    tested = main.main(options.parse_args(argv + ["--test", "--checkpoint_step=2"]))
    assert tested["user_bias_reg"] == chosen
    checkpoint["user_bias_reg"] = chosen + 7.0  # as if chosen on other validation tasks
    torch.save(checkpoint, path)
    retested = main.main(options.parse_args(argv + ["--test", "--checkpoint_step=2", "--val_size=5"]))
    assert retested["user_bias_reg"] == chosen + 7.0 and retested["rmse"] != tested["rmse"]


def test_a_checkpoint_of_the_other_head_is_refused_by_name(ratings_file, tmp_path):
    main.main(options.parse_args(run_flags(ratings_file, tmp_path, "--use_adaptive_loss=False")))
    argv = run_flags(ratings_file, tmp_path, "--use_adaptive_loss=False", "--test", "--checkpoint_step=2")
    argv[argv.index("--rating_head=bias")] = "--rating_head=plain"
    with pytest.raises(errors.MeloError, match="rating_head"):
        main.main(options.parse_args(argv))


def test_model_factory_needs_no_data_for_the_bias_head():
    args = types.SimpleNamespace(**vars(options.parse_args(["--model=narm", "--rating_head=bias"])))
    backbone = model_factory(args, 7)
    assert backbone.item_bias.weight.shape == (8, 1) and backbone.global_mean.item() == 0.0


def test_a_checkpoint_from_before_the_rating_head_flag_is_read_as_plain(ratings_file, tmp_path):
    """Checkpoints made before --rating_head existed do not record it: they are the plain head's, refused
    by name under the bias head (today's default) and tested as before under the plain one."""
    argv = run_flags(ratings_file, tmp_path, "--use_adaptive_loss=False")
    argv[argv.index("--rating_head=bias")] = "--rating_head=plain"
    main.main(options.parse_args(argv))
    path = tmp_path / "ckpt" / "gru4rec_ml-100k_maml_step2.pt"
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["shape_options"]["rating_head"]
    torch.save(checkpoint, path)
    test = ["--checkpoint_step=2", "--test"]
    assert math.isfinite(main.main(options.parse_args(argv + test))["rmse"])
    argv[argv.index("--rating_head=plain")] = "--rating_head=bias"
    with pytest.raises(errors.MeloError, match=r"rating_head='plain' \(now 'bias'\)"):
        main.main(options.parse_args(argv + test))


@pytest.mark.parametrize("model", ["gru4rec", "sasrec"])
def test_the_fold_in_start_with_user_factors_is_the_closed_form_mf_fold_in(float64, model):
    # --user_factors=K with the factor start: f ≡ 0, every inner rate 0, (p_user, b_user) meta-learned at 0:
    # each task's prediction is baselines.mf_fold_in's, with its ridge penalties and repeated items alike,
    # on the vmapped fast path (small per-task item tables) and the per-task path over the whole tables
    learner = bias_learner(model, "--use_adaptive_loss=False", "--num_inner_steps=1", "--inner_lr=0",
                           "--user_factors=4").eval()
    backbone = learner.backbone
    generator = torch.Generator().manual_seed(5)
    biases = 0.2 * torch.randn(NUM_ITEMS + 1, generator=generator, dtype=torch.float64)
    factors = 0.5 * torch.randn(NUM_ITEMS + 1, 3, generator=generator, dtype=torch.float64)  # rank 3 of 4 columns
    biases[0], factors[0] = 0, 0
    backbone.rating_head.set_start(backbone, MU, biases, user_bias_reg=2.5, item_factors=factors, user_factor_reg=1.5)
    assert torch.equal(backbone.item_factor.weight[:, 3], torch.zeros(NUM_ITEMS + 1))
    batch = random_batch()
    batch.support_items[1, 1, -3:] = batch.support_items[1, 0, -3:]  # items in two windows, other ratings
    sets = baselines.support_sets(batch.support_items.numpy(), batch.support_ratings.numpy(),
                                  batch.support_mask.numpy())
    expected = torch.from_numpy(baselines.mf_fold_in(sets, batch.query_items[:, :, -1].numpy(), MU * 5,
                                                     biases.numpy() * 5, factors.numpy(), 1.5, -math.inf,
                                                     math.inf, 2.5))
    torch.testing.assert_close(learner.predict(batch), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(learner.predict(batch, fast=False), expected, rtol=0, atol=1e-6)
    # without the factor solve (λ_p None) the same head is the user + item bias fold-in on its biases
    backbone.rating_head.user_factor_reg = None
    plain = baselines.user_item_bias(sets, batch.query_items[:, :, -1].numpy(), MU * 5, biases.numpy() * 5, 2.5,
                                     -math.inf, math.inf)
    predicted = learner.predict(batch)
    torch.testing.assert_close(predicted, torch.from_numpy(plain), rtol=0, atol=1e-6)
    assert not torch.allclose(predicted, expected, atol=1e-3)  # (the factors do move the predictions)


def test_the_start_takes_the_fold_in_with_the_lower_cross_fitted_score_not_the_lower_minimum(ratings_file, tmp_path,
                                                                                            monkeypatch):
    args = options.parse_args(["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data",
                               "--min_item=1", "--num_test_data=20", "--val_size=10", "--max_seq_len=10",
                               "--user_factors=8"])
    data = load_data(args)
    dataset = MetaDataset.from_args(data, args)
    # the MF fold-in's grid minimum is the lower, its cross-fitted score the higher: the bias fold-in starts
    searched = {"user-item-bias": ((25.0, 10.0, 1.0), {"validation_scores": [0.90], "cross_fitted_score": 0.95}),
                "mf-fold-in": ((2, 1.0, 3.0, 1.0, 0.9), {"validation_scores": [0.80], "cross_fitted_score": 0.97})}
    monkeypatch.setattr(baselines, "choose", lambda name, *rest: searched[name])
    start = baselines.bias_start(data, dataset, args)
    assert start.item_factors is None and start.user_factor_reg is None and start.user_decay == 1.0
    searched["mf-fold-in"][1]["cross_fitted_score"] = 0.93  # now the lower: the MF fold-in starts
    start = baselines.bias_start(data, dataset, args)
    assert start.item_factors.shape[1] == 2 and (start.user_factor_reg, start.user_decay) == (3.0, 0.9)


def test_the_factor_start_is_the_better_fold_in_on_validation_and_a_checkpoint_keeps_it(ratings_file, tmp_path):
    argv = ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--batch_size=4", "--num_samples=5", "--num_query_set=2",
            "--max_seq_len=10", "--gru4rec_hidden_size=16", "--model=gru4rec", "--user_factors=8",
            "--num_train_iterations=1", "--log_interval=1", f"--checkpoint_dir={tmp_path}/ckpt",
            f"--log_dir={tmp_path}/runs", "--inner_lr=0"]
    args = options.parse_args(argv)
    data = load_data(args)
    dataset = MetaDataset.from_args(data, args)
    start = baselines.bias_start(data, dataset, args)
    user_reg, factors, factor_reg = start.user_bias_reg, start.item_factors, start.user_factor_reg
    fitted = baselines.Fitted(data, dataset.train_users, args.random_seed)
    val_tasks = dataset.val_tasks()
    bias_value, bias_search = baselines.choose("user-item-bias", val_tasks, fitted, data.max_rating, "rmse",
                                               "auto")
    value, mf_search = baselines.choose("mf-fold-in", val_tasks, fitted, data.max_rating, "rmse", "auto",
                                        baselines.factor_axes(8))
    assert all(rank <= 8 for rank in mf_search["axes"]["rank"])
    mf_wins = mf_search["cross_fitted_score"] < bias_search["cross_fitted_score"]  # not the grids' minima
    if mf_wins:
        assert factors is not None and (user_reg, factor_reg, start.user_decay) == (value[3], value[2], value[4])
        assert factors.shape[1] == value[0]
    else:
        assert factors is None and factor_reg is None
    trainer = main.main(options.parse_args(argv))
    saved = torch.load(tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step1.pt", weights_only=True)
    assert saved["user_factor_reg"] == factor_reg and saved["user_bias_reg"] == user_reg
    assert saved["meta_state"]["backbone.item_factor.weight"].shape == (data.num_items + 1, 8)
    # step 0's validation is the chosen fold-in's own (inner rates 0: the start alone)
    search, chosen = (mf_search, value) if mf_wins else (bias_search, bias_value)
    chosen = search["validation_scores"][search["grid"].index(list(chosen))]
    start = torch.load(tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step0.pt", weights_only=True)
    assert trainer.best["rmse"] <= start["best_rmse"] == pytest.approx(chosen, abs=1e-5)


def test_the_blend_start_is_chosen_on_validation_and_a_checkpoint_keeps_it(ratings_file, tmp_path):
    argv = ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--batch_size=4", "--num_samples=5", "--num_query_set=2",
            "--max_seq_len=10", "--gru4rec_hidden_size=16", "--model=gru4rec", "--user_factors=8",
            "--num_train_iterations=1", "--log_interval=1", f"--checkpoint_dir={tmp_path}/ckpt",
            f"--log_dir={tmp_path}/runs", "--inner_lr=0", "--bias_start=blend"]
    args = options.parse_args(argv)
    data = load_data(args)
    dataset = MetaDataset.from_args(data, args)
    fitted = baselines.Fitted(data, dataset.train_users, args.random_seed)
    values, s, record, _ = baselines.blend_choice(dataset.val_tasks(), fitted, data.max_rating, "rmse", "auto",
                                                  baselines.factor_axes(8))
    start = baselines.bias_start(data, dataset, args)
    (item_reg, bias_reg, bias_decay), (rank, reg, factor_reg, mf_bias_reg, mf_decay) = (
        values[part] for part in baselines.BLEND_PARTS)
    assert start.blend_weight == s and start.item_factors.shape[1] == rank <= 8
    assert (start.user_bias_reg, start.user_factor_reg, start.user_decay) == (mf_bias_reg, factor_reg, mf_decay)
    assert (start.blend_bias_reg, start.blend_bias_decay) == (bias_reg, bias_decay)
    trainer = main.main(options.parse_args(argv))
    saved = torch.load(tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step1.pt", weights_only=True)
    assert saved["blend_weight"] == s and saved["blend_bias_reg"] == bias_reg
    assert torch.equal(saved["blend_item_offset"], torch.as_tensor(start.blend_item_offset))
    # step 0's validation is the blend's own (inner rates 0: the start alone)
    step0 = torch.load(tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step0.pt", weights_only=True)
    scores = record["validation_scores"]
    assert trainer.best["rmse"] <= step0["best_rmse"] == pytest.approx(min(scores), abs=1e-5)
    # a test of the checkpoint under other validation flags starts from the blend it trained from
    tested = main.main(options.parse_args(argv + ["--test", "--checkpoint_step=1", "--val_size=5"]))
    assert tested["blend_weight"] == s and tested["validation"]["rmse"] == pytest.approx(trainer.best["rmse"])


@pytest.mark.parametrize("factors", [0, 3])
def test_the_weighted_start_fits_the_users_parameters_with_melos_weights(float64, factors):
    # --weighted_start: the fold-in start is the weighted least-squares fit with the adaptive loss's step-0
    # weights, each position weighted by its weight over its item's count of positions (an item in m windows
    # counts once, as in the fold-in); with every weight 1 it is the plain fold-in,
    # and the weight network gets a meta-gradient through the start alone (every inner rate 0)
    flags = ["--use_adaptive_loss=True", "--num_inner_steps=1", "--inner_lr=0", f"--user_factors={factors}"]
    plain = bias_learner("gru4rec", *flags).eval()
    weighted = bias_learner("gru4rec", *flags, "--weighted_start=True").eval()
    weighted.load_state_dict(plain.state_dict())
    generator = torch.Generator().manual_seed(7)
    table = 0.5 * torch.randn(NUM_ITEMS + 1, factors, generator=generator) if factors else None
    for learner in (plain, weighted):
        learner.backbone.rating_head.set_start(learner.backbone, MU, user_bias_reg=2.5, item_factors=table,
                                               user_factor_reg=1.5 if factors else None)
    batch = random_batch()
    torch.testing.assert_close(weighted.predict(batch), plain.predict(batch), rtol=0, atol=1e-12)  # weights 1
    head = weighted.inner_loss.encoder.head[-1]
    with torch.no_grad():
        head.weight.normal_(0, 1.0, generator=generator)
    support, context, _ = weighted._prepare(batch)
    predicted = weighted.predict(batch)
    for task in range(3):
        items, labels, mask = (x[task].numpy() for x in support)
        position_weight = context["weights"][task].detach().numpy()
        real_items = items[mask]
        counts = {item: (real_items == item).sum() for item in set(real_items.tolist())}
        w = position_weight[mask] / np.array([counts[item] for item in real_items.tolist()])
        y = labels[mask] - MU
        x = (np.ones((len(real_items), 1)) if not factors else
             np.hstack([table[real_items].numpy(), np.ones((len(real_items), 1))]))
        penalty = np.diag([1.5] * factors + [2.5])
        user = np.linalg.solve(x.T @ (w[:, None] * x) + penalty, x.T @ (w * y))
        targets = batch.query_items[task, :, -1].numpy()
        features = np.ones((len(targets), 1)) if not factors else np.hstack([table[targets].numpy(),
                                                                             np.ones((len(targets), 1))])
        expected = (MU + features @ user) * 5
        np.testing.assert_allclose(predicted[task].numpy(), expected, rtol=0, atol=1e-6)
    weighted.zero_grad()
    weighted.run_tasks(batch, (0,))[0].sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    plain.zero_grad()
    plain.run_tasks(batch, (0,))[0].sum().backward()
    assert plain.inner_loss.encoder.head[-1].weight.grad.abs().sum() == 0  # unweighted start: lr 0 leaves it out


def test_the_start_is_cached_per_data_tasks_and_flags(ratings_file, tmp_path, monkeypatch):
    # a study's runs share the fold-in searches: the second start reads the first's file, bit for bit; other
    # flags or tasks get another file; an unreadable file is computed anew
    argv = ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--num_samples=5", "--max_seq_len=10", "--user_factors=4"]
    args = options.parse_args(argv)
    data = load_data(args)
    dataset = MetaDataset.from_args(data, args)
    first = baselines.cached_bias_start(data, dataset, args)
    path = baselines.bias_start_cache_path(data, dataset, args)
    assert os.path.exists(path)
    monkeypatch.setattr(baselines, "bias_start", lambda *a: pytest.fail("recomputed a cached start"))
    second = baselines.cached_bias_start(data, dataset, args)
    for name in ("mean", "item_biases", "user_bias_reg", "item_factors", "user_factor_reg", "user_decay"):
        mine, theirs = getattr(first, name), getattr(second, name)
        assert (mine is None and theirs is None) or np.array_equal(np.asarray(mine), np.asarray(theirs)), name
    for flag in ("--user_factors=8", "--grid_choice=minimum"):
        other = options.parse_args(argv + [flag])
        assert baselines.bias_start_cache_path(data, dataset, other) != path
    other = options.parse_args(argv + ["--val_size=9"])
    assert baselines.bias_start_cache_path(data, MetaDataset.from_args(data, other), other) != path
    for flags in (["--train_windows=held-out"], ["--train_windows=held-out", "--train_query_targets=2"]):
        other = options.parse_args(argv + flags)
        assert baselines.bias_start_cache_path(data, MetaDataset.from_args(data, other), other) != path
    monkeypatch.undo()
    with open(path, "wb") as file:
        file.write(b"not an npz")
    again = baselines.cached_bias_start(data, dataset, args)
    assert again.mean == first.mean


@pytest.mark.parametrize("factors", [0, 3])
def test_the_fold_in_start_with_recency_decay_is_the_decayed_fold_in(float64, factors):
    # the chosen γ of the fold-in (user_decay) weighs each support rating by γ^age, mean 1 per user: the
    # untrained network is baselines' decayed fold-in (user + item bias, or MF), on both paths
    learner = bias_learner("gru4rec", "--use_adaptive_loss=False", "--num_inner_steps=1", "--inner_lr=0",
                           f"--user_factors={factors}").eval()
    generator = torch.Generator().manual_seed(11)
    biases = 0.2 * torch.randn(NUM_ITEMS + 1, generator=generator, dtype=torch.float64)
    table = 0.5 * torch.randn(NUM_ITEMS + 1, max(factors, 1), generator=generator, dtype=torch.float64)[:, :factors]
    biases[0], table[0] = 0, 0
    backbone = learner.backbone
    backbone.rating_head.set_start(backbone, MU, biases, user_bias_reg=2.5, item_factors=table if factors else None,
                                   user_factor_reg=1.5 if factors else None, user_decay=0.8)
    batch = random_batch()
    batch.support_age = torch.where(batch.support_items > 0, batch.support_items % 7, 0)  # one age per item
    sets = baselines.support_sets(batch.support_items.numpy(), batch.support_ratings.numpy(),
                                  batch.support_mask.numpy(), batch.support_age.numpy())
    targets = batch.query_items[:, :, -1].numpy()
    if factors:
        expected = baselines.mf_fold_in(sets, targets, MU * 5, biases.numpy() * 5, table.numpy(), 1.5, -math.inf,
                                        math.inf, 2.5, sets.decay_weights(0.8))
    else:
        expected = baselines.user_item_bias(sets, targets, MU * 5, biases.numpy() * 5, 2.5, -math.inf, math.inf,
                                            sets.decay_weights(0.8))
    torch.testing.assert_close(learner.predict(batch), torch.from_numpy(expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(learner.predict(batch, fast=False), torch.from_numpy(expected), rtol=0, atol=1e-6)
    undecayed = baselines.user_item_bias(sets, targets, MU * 5, biases.numpy() * 5, 2.5, -math.inf, math.inf)
    if not factors:
        assert not np.allclose(expected, undecayed, atol=1e-3)  # (the decay does move the predictions)


@pytest.mark.parametrize("s", [0.0, 0.35, 1.0])
def test_the_blend_start_is_the_fold_in_blend(float64, s):
    # --bias_start=blend: item biases (1 − s)·b_bias + s·b_mf, the MF fold-in's factors, and per task both
    # fold-ins solved on their own items' residuals with their own λs and γs, mixed by s: with f ≡ 0 the
    # untrained network is s · baselines' MF fold-in + (1 − s) · their user + item bias fold-in, on the
    # vmapped fast path (small per-task item tables, the offsets looked up before the ids are remapped) and
    # the per-task path
    learner = bias_learner("gru4rec", "--use_adaptive_loss=False", "--num_inner_steps=1", "--inner_lr=0",
                           "--user_factors=4").eval()
    generator = torch.Generator().manual_seed(13)
    bias_items, mf_items = (0.2 * torch.randn(NUM_ITEMS + 1, generator=generator, dtype=torch.float64)
                            for _ in range(2))
    factors = 0.5 * torch.randn(NUM_ITEMS + 1, 3, generator=generator, dtype=torch.float64)
    bias_items[0], mf_items[0], factors[0] = 0, 0, 0
    backbone = learner.backbone
    backbone.rating_head.set_start(backbone, MU, (1 - s) * bias_items + s * mf_items, user_bias_reg=2.5,
                                   item_factors=factors, user_factor_reg=1.5, user_decay=0.9, blend_weight=s,
                                   blend_item_offset=mf_items - bias_items, blend_bias_reg=4.0, blend_bias_decay=0.8)
    batch = random_batch()
    batch.support_items[1, 1, -3:] = batch.support_items[1, 0, -3:]  # items in two windows, other ratings
    batch.support_age = torch.where(batch.support_items > 0, batch.support_items % 7, 0)  # one age per item
    sets = baselines.support_sets(batch.support_items.numpy(), batch.support_ratings.numpy(),
                                  batch.support_mask.numpy(), batch.support_age.numpy())
    targets = batch.query_items[:, :, -1].numpy()
    mf = baselines.mf_fold_in(sets, targets, MU * 5, mf_items.numpy() * 5, factors.numpy(), 1.5, -math.inf, math.inf,
                              2.5, sets.decay_weights(0.9))
    bias = baselines.user_item_bias(sets, targets, MU * 5, bias_items.numpy() * 5, 4.0, -math.inf, math.inf,
                                    sets.decay_weights(0.8))
    expected = torch.from_numpy(s * mf + (1 - s) * bias)
    torch.testing.assert_close(learner.predict(batch), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(learner.predict(batch, fast=False), expected, rtol=0, atol=1e-6)
    # on item ids (Basic's fine-tuning) the head looks the offsets up itself
    params = dict(backbone.named_parameters())
    task = (batch.support_items[1], batch.support_ratings[1] / 5, batch.support_items[1] != 0)
    found = backbone.rating_head.task_start(backbone, params, *task, age=batch.support_age[1])
    given = backbone.rating_head.task_start(backbone, params, *task, age=batch.support_age[1],
                                            offset=backbone.rating_head.start_offset(task[0]))
    assert all(torch.equal(found[name], given[name]) for name in (USER_BIAS, "user_factor"))
    if 0 < s < 1:  # the mix is neither fold-in
        assert not np.allclose(expected.numpy(), mf, atol=1e-3) and not np.allclose(expected.numpy(), bias, atol=1e-3)


def test_the_blend_start_needs_the_factor_term(ratings_file, tmp_path):
    with pytest.raises(SystemExit):
        options.parse_args(["--bias_start=blend"])
    learner = bias_learner("gru4rec")
    with pytest.raises(errors.MeloError, match="needs the factor term: add --user_factors"):
        learner.backbone.rating_head.set_start(learner.backbone, MU, blend_weight=0.5)


class ItemBiasOnlyHead(heads.RatingHead):
    """A throwaway third head: μ + b_item + f, no per-user parameters (so the inner loop adapts the network
    and the item table only)."""

    name = "item-bias-only"
    item_tables = (ITEM_BIAS,)

    @classmethod
    def attach(cls, backbone, user_factors=0):
        backbone.item_bias = torch.nn.Embedding.from_pretrained(torch.full((backbone.num_items + 1, 1), 0.25),
                                                                freeze=False, padding_idx=0)
        return cls()

    def output(self, backbone, logits, item_ids):
        return 0.5 + backbone.item_bias(item_ids).squeeze(-1) + torch.sigmoid(logits) - 0.5


@pytest.fixture
def head_registry():
    saved = dict(heads.HEADS)
    yield heads.HEADS
    heads.HEADS.clear()
    heads.HEADS.update(saved)


def test_a_new_rating_head_is_one_class_and_one_line(head_registry):
    """Registered, a head is a --rating_head choice; model_factory attaches it, its output is the model's,
    and the inner loop adapts its item table with --inner_params=head and leaves it with
    --adapt_item_bias=False. A taken name or a class that is not a head is refused with one line."""
    heads.register_head(ItemBiasOnlyHead)
    learner = make_learner("gru4rec", "--rating_head=item-bias-only", "--inner_params=head")
    backbone = learner.backbone
    assert isinstance(backbone.rating_head, ItemBiasOnlyHead)
    items = torch.tensor([[0, 3, 5]])
    with torch.no_grad():
        expected = 0.25 + torch.sigmoid(backbone.head(backbone.gru(backbone.item_embedding(items), items > 0)))
    assert torch.allclose(backbone(items)[0, 1:], expected.squeeze(-1)[0, 1:])
    assert set(learner.adapted) == {"head.weight", "head.bias", ITEM_BIAS}
    frozen = make_learner("gru4rec", "--rating_head=item-bias-only", "--inner_params=head", "--adapt_item_bias=False")
    assert set(frozen.adapted) == {"head.weight", "head.bias"}
    assert backbone.rating_head.parameters_of(backbone).keys() == {ITEM_BIAS}
    for head, message in ((heads.BiasHead, "already has that name"), (torch.nn.Linear, "a named subclass")):
        with pytest.raises(errors.MeloError, match=message):
            heads.register_head(head)


@pytest.mark.parametrize("targets", [1, 2])
def test_a_held_out_start_is_fitted_without_the_training_targets(ratings_file, tmp_path, targets):
    """--train_windows=held-out: the fitted start (μ, item biases) leaves out each training user's latest
    --train_query_targets ratings, the targets of its training tasks; --train_windows=latest keeps them."""
    argv = ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--num_samples=5", "--max_seq_len=10",
            f"--train_query_targets={targets}"]
    args = options.parse_args(argv + ["--train_windows=held-out"])
    data = load_data(args)
    dataset = MetaDataset.from_args(data, args)
    kept = np.concatenate([data.sequence(u)[1][:-targets] for u in dataset.train_users])
    everything = np.concatenate([data.sequence(u)[1] for u in dataset.train_users])
    assert len(kept) == len(everything) - targets * len(dataset.train_users)
    start = baselines.bias_start(data, dataset, args)
    assert start.mean == pytest.approx(kept.mean() / data.max_rating)
    # the item biases are those of the kept ratings, at the item regularisation chosen on validation
    fitted = baselines.Fitted(data, dataset.train_users, args.random_seed, hold_out=targets)
    (item_reg, _, _), _ = baselines.choose("user-item-bias", dataset.val_tasks(), fitted, data.max_rating, "rmse",
                                           "auto")
    np.testing.assert_allclose(start.item_biases, baselines.item_biases(
        fitted.items, fitted.ratings, fitted.mean, item_reg, fitted.num_items) / data.max_rating)
    latest = baselines.bias_start(data, dataset, options.parse_args(argv + ["--train_windows=latest"]))
    assert latest.mean == pytest.approx(everything.mean() / data.max_rating) != start.mean
