"""The bias rating head (--rating_head=bias): ŷ = μ + b_user + b_item + f(window) on every backbone, its
place in the inner loop (b_user with its own learned rate, b_item through the per-task item table), what
--inner_params / --adapt_*_bias adapt, and the Basic -> MAML hand-off with it."""
import math
import types

import pytest
import torch
from torch.func import functional_call

import baselines
import main
import options
import train_original
from dataloader import MetaDataset, load_data
from runtime import Distributed
from analysis import support_weights
from meta_learner import ITEM_BIAS, USER_BIAS, last_step_weights, local_item_tables, start_user_bias
from models import model_factory

from test_main import ratings_file  # noqa: F401  (the same generated file)
from test_meta_learner import (BACKBONES, NUM_ITEMS, assert_fast_path_equals_the_per_task_path, float64,  # noqa: F401
                               make_learner, random_batch)

MU = 0.7


def bias_learner(model, *flags):
    learner = make_learner(model, "--rating_head=bias", *flags)
    learner.backbone.set_bias_start(MU, user_bias_reg=3.0 if "--user_bias_start=fold-in" in flags else None)
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
    backbone.set_bias_start(MU, biases, user_bias_reg=2.5)
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
        params = start_user_bias(learner.backbone, dict(learner.backbone.named_parameters()), items, labels, mask)
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
    (item_reg, _), _ = baselines.choose("user-item-bias", dataset.val_tasks(), fitted, 5.0, "rmse")
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
    assert meta.learner.backbone.rating_head == "bias"
    # the whole Basic model, biases and μ included, is where MAML++ starts (no outer step moves it: lr 0)
    for name, value in basic.best_weights().items():
        torch.testing.assert_close(meta.learner.backbone.state_dict()[name], value, rtol=0, atol=0, msg=name)
    # a plain model cannot start from a bias-head export: one line, not a partial load
    plain = run_flags(ratings_file, tmp_path, "--load_pretrained=True", "--checkpoint_dir=" + str(tmp_path / "c2"))
    plain[plain.index("--rating_head=bias")] = "--rating_head=plain"
    with pytest.raises(options.MeloError, match="have the bias rating head and this run the plain one"):
        main.main(options.parse_args(plain))


def test_basic_and_fine_tuning_start_the_user_bias_at_the_fold_in(ratings_file, tmp_path):
    # an untrained Basic model (f ≡ 0, item biases from the fold-in) tested without steps is the fold-in
    # baseline before its clipping; with --user_bias_start=learned it ignores the user: μ + b_item
    trainer = train_original.BaselineTrainer(
        options.parse_args(run_flags(ratings_file, tmp_path, "--user_bias_start=fold-in")), Distributed("cpu"))
    tasks = trainer.dataset.test_tasks()
    fitted = baselines.Fitted(trainer.data, trainer.dataset.train_users)
    (item_reg, user_reg), _ = baselines.choose("user-item-bias", trainer.dataset.val_tasks(), fitted, 5.0, "rmse")
    assert trainer.model.user_bias_reg == user_reg
    biases = baselines.item_biases(fitted.items, fitted.ratings, fitted.mean, item_reg, fitted.num_items)
    expected = torch.from_numpy(baselines.user_item_bias(baselines.sets_of(tasks), tasks.query_items[:, :, -1].numpy(),
                                                         fitted.mean, biases, user_reg, -math.inf, math.inf))
    zero_and_two_steps = trainer.predictions(tasks, lr=0.0, record=(0, 2))
    for predicted in zero_and_two_steps:  # at lr 0, fine-tuning stays at the start
        torch.testing.assert_close(predicted, expected, rtol=0, atol=1e-4)
    learned = train_original.BaselineTrainer(
        options.parse_args(run_flags(ratings_file, tmp_path, "--user_bias_start=learned")), Distributed("cpu"))
    assert learned.model.user_bias_reg is None
    torch.testing.assert_close(learned.predictions(tasks, record=(0,))[0],
                               torch.from_numpy(fitted.mean + biases[tasks.query_items[:, :, -1].numpy()]),
                               rtol=0, atol=1e-4)


def test_a_checkpoint_keeps_the_shrinkage_of_the_user_bias_start_it_trained_with(ratings_file, tmp_path):
    # λ_user is chosen on the validation tasks when a run starts; its checkpoints keep it, so a test (or a
    # resume) under other validation flags starts b_user as the run trained it, and the report says which
    argv = run_flags(ratings_file, tmp_path, "--use_adaptive_loss=False")
    chosen = main.main(options.parse_args(argv)).learner.backbone.user_bias_reg
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
    with pytest.raises(options.MeloError, match="rating_head"):
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
    with pytest.raises(options.MeloError, match=r"rating_head='plain' \(now 'bias'\)"):
        main.main(options.parse_args(argv + test))
