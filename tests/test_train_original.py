"""train_original.py on a generated MovieLens-100K file: training, checkpoints, resume, the test report on
main.py's targets, fine-tuning, the learned-loss variant and the pretrained hand-off into main.py."""
import copy
import glob
import json
import os

import pytest
import torch

from common.runtime import Distributed
from evaluation import metrics
import main
import options
from ratings.preprocess import load_data
from ratings.tasks import MetaDataset
import train_original
from training import runs

from ratings.synthetic import write_movielens


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "u.data"
    write_movielens(str(path), fmt="ml-100k", num_users=120, num_items=80, seed=3)
    return str(path)


@pytest.fixture(autouse=True)
def keep_thread_count():
    """The runs here use --num_threads=1 (tiny tensors; on a shared machine two spinning threads per
    process make them many times slower); the rest of the suite gets its thread count back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def flags(ratings_file, tmp_path, *extra):
    return ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--batch_size=4", "--num_samples=5", "--num_query_set=2",
            "--max_seq_len=10", "--bert_hidden_units=16", "--gru4rec_hidden_size=16", "--narm_hidden_size=16",
            "--pretraining_batch_size=64", "--pretrain_epochs=2", f"--pretrain_log_dir={tmp_path}/pre",
            f"--checkpoint_dir={tmp_path}/ckpt", f"--log_dir={tmp_path}/runs", "--log_interval=2",
            "--num_train_iterations=2", "--num_threads=1", *extra]


def run(argv):
    return train_original.main(options.parse_args(argv))


def fixed_loss(trainer):
    """Plain MSE of a fixed set of training windows (an epoch number never trained on)."""
    items, ratings = trainer.dataset.window_dataset(10_000)
    trainer.model.eval()
    with torch.no_grad():
        mask = items != 0
        errors = (trainer.model(items) - ratings / trainer.max_rating) ** 2
        loss = (errors * mask).sum() / mask.sum()
    trainer.model.train()
    return loss.item()


@pytest.mark.parametrize("learned_loss", ["False", "True"])
def test_training_lowers_the_loss_and_keeps_best_and_latest(ratings_file, tmp_path, learned_loss, capsys):
    # the training loop's mechanics, at the plain head (the bias head starts at the fold-in: little to gain)
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--pretrain_epochs=4", "--pretraining_lr=0.01",
                 f"--use_learned_loss_baseline={learned_loss}", "--rating_head=plain")
    before = fixed_loss(train_original.BaselineTrainer(options.parse_args(argv)))
    trainer = run(argv)
    assert trainer.epoch == 4
    assert fixed_loss(trainer) < 0.7 * before
    prefix = runs.basic_prefix(trainer.args)
    assert prefix.endswith("basic-learned-loss" if learned_loss == "True" else "basic")
    kept = {0, 4, trainer.best["step"]}  # the start, the latest and the best
    assert sorted(os.listdir(tmp_path / "pre")) == sorted(f"{prefix}_step{s}.pt" for s in kept)
    assert glob.glob(str(tmp_path / "runs" / f"{prefix}_*" / "events.out.tfevents.*"))
    printed = capsys.readouterr().out
    assert printed.count("val RMSE") == 5 and "epoch 0: train loss - | val RMSE" in printed  # the start too


def test_learned_loss_weights_have_mean_one_and_train(ratings_file, tmp_path):
    trainer = train_original.BaselineTrainer(options.parse_args(
        flags(ratings_file, tmp_path, "--model=gru4rec", "--use_learned_loss_baseline=True")))
    items, ratings = next(trainer.epoch_batches(0))
    with torch.no_grad():
        head = trainer.encoder.head[-1]
        head.weight.normal_(0, 1.0)
        head.bias.fill_(-3.0)  # every raw weight small: normalised, the loss keeps the scale of the MSE
        labels, mask = ratings / trainer.max_rating, items != 0
        weighted = trainer.loss(items, ratings)
        plain = ((trainer.model(items) - labels) ** 2 * mask).sum() / mask.sum()
    assert 0.3 * plain < weighted < 3 * plain
    head.weight.data.zero_()
    head.bias.data.fill_(-30.0)  # shrinking every raw weight alike no longer shrinks the loss
    assert trainer.loss(items, ratings).item() == pytest.approx(plain.item(), rel=1e-4)
    trainer.loss(items, ratings).backward()
    assert all(p.grad is not None for p in trainer.encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("model", ["bert4rec", "sasrec", "gru4rec", "narm"])
def test_an_empty_shard_gives_zero_loss_and_a_gradient_for_every_parameter(ratings_file, tmp_path, model):
    """Under torchrun a rank's last batch can be empty; DDP still needs a gradient for every parameter."""
    trainer = train_original.BaselineTrainer(options.parse_args(
        flags(ratings_file, tmp_path, f"--model={model}", "--use_learned_loss_baseline=True")))
    error_sum, positions = trainer.window_loss(torch.zeros(0, 10, dtype=torch.long), torch.zeros(0, 10))
    assert error_sum.item() == 0 and positions.item() == 0
    error_sum.backward()
    assert all(p.grad is not None and not p.grad.any() for p in trainer.window_loss.parameters())


def test_resume_is_identical_to_an_uninterrupted_run(ratings_file, tmp_path, capsys):
    argv = flags(ratings_file, tmp_path, "--model=sasrec", "--bert_dropout=0.3", "--pretrain_epochs=3")
    uninterrupted = run(argv)
    other = tmp_path / "resumed"
    first = run(argv + [f"--pretrain_log_dir={other}", "--pretrain_epochs=1"])
    assert first.epoch == 1
    capsys.readouterr()
    resumed = run(argv + [f"--pretrain_log_dir={other}", "--checkpoint_step=1"])
    assert "other training options" not in capsys.readouterr().err  # more epochs change nothing before them
    assert resumed.epoch == 3
    for (name, a), (_, b) in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.best["rmse"] == uninterrupted.best["rmse"]
    # other training options are pointed out, and a start option is said to be kept as saved
    again = tmp_path / "again"
    run(argv + [f"--pretrain_log_dir={again}", "--pretrain_epochs=1"])
    capsys.readouterr()
    changed = run(argv + [f"--pretrain_log_dir={again}", "--checkpoint_step=1", "--pretraining_lr=0.01",
                          "--grid_choice=minimum"])
    err = capsys.readouterr().err
    assert "pretraining_lr=0.001 (now 0.01)" in err and "grid_choice='auto' (now 'minimum')" in err
    assert "the rating head keeps the start it began with (grid_choice as saved)" in err
    # and the run trains with the rate given now, not the checkpoint's (Adam's load_state_dict restores it)
    assert changed.optimizer.param_groups[0]["lr"] == 0.01


def capture_targets(monkeypatch):
    """Record the targets and masks every metrics.error_sums call scores."""
    seen = []
    original = metrics.error_sums

    def recording(predicted, target, mask, max_rating):
        seen.append((target.detach().cpu().clone(), mask.cpu().clone()))
        return original(predicted, target, mask, max_rating)

    monkeypatch.setattr(metrics, "error_sums", recording)
    return seen


def test_test_report_scores_exactly_main_test_targets(ratings_file, tmp_path, monkeypatch, capsys):
    # the plain head: the bias head's start scores the validation users too, which the capture would count
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--rating_head=plain")
    run(argv)
    main.main(options.parse_args(argv))                  # 2 meta-training iterations: a checkpoint to test
    seen = capture_targets(monkeypatch)
    baseline = run(argv + ["--checkpoint_step=2", "--test"])
    baseline_targets = torch.cat([t for t, _ in seen]), torch.cat([m for _, m in seen])
    seen.clear()
    meta = main.main(options.parse_args(argv + ["--checkpoint_step=2", "--test"]))
    meta_targets = torch.cat([t for t, _ in seen]), torch.cat([m for _, m in seen])
    assert torch.equal(baseline_targets[0], meta_targets[0]) and torch.equal(baseline_targets[1], meta_targets[1])
    args = options.parse_args(argv)
    tasks = MetaDataset.from_args(load_data(args), args).test_tasks()
    assert torch.equal(baseline_targets[0], tasks.query_ratings[:, :, -1])
    assert baseline["count"] == meta["count"] == 20 * 2
    assert {k: r["count"] for k, r in baseline["per_rating"].items()} == \
           {k: r["count"] for k, r in meta["per_rating"].items()}
    # The same report as main.py --test: printed table, JSON beside the checkpoint.
    printed = capsys.readouterr().out
    assert "test gru4rec_ml-100k_basic, best weights up to step 2" in printed and "mean pred" in printed
    saved = json.loads((tmp_path / "pre" / "gru4rec_ml-100k_basic_step2.test_best.json").read_text())
    assert saved == json.loads(json.dumps(baseline))
    assert saved["method"] == "basic" and saved["model"] == "gru4rec"
    meta_saved = json.loads((tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step2.test_best.json").read_text())
    # what only a meta-learner's report holds: MELO's weights per rating, the validation of the tested step,
    # the query loss's gradient per support rating
    meta_only = {"adaptive_weight_by_rating", "adaptive_weight_by_rating_per_step", "validation",
                 "query_gradient_by_rating", "query_gradient_by_share"}
    assert set(saved) >= set(meta_saved) - meta_only
    # Deterministic: the same command gives the same numbers.
    assert run(argv + ["--checkpoint_step=2", "--test"]) == baseline


def test_finetuning_adapts_each_user_on_its_support_set(ratings_file, tmp_path):
    argv = flags(ratings_file, tmp_path, "--model=narm", "--pretrain_epochs=1")
    run(argv)
    plain = run(argv + ["--checkpoint_step=1", "--test"])
    zero_lr = run(argv + ["--checkpoint_step=1", "--test", "--finetune_steps=2", "--finetune_lr=0"])
    assert zero_lr["rmse"] == pytest.approx(plain["rmse"], rel=1e-5)
    tuned = run(argv + ["--checkpoint_step=1", "--test", "--finetune_steps=2", "--finetune_lr=0.5"])
    assert tuned["rmse"] != pytest.approx(plain["rmse"], rel=1e-4) and tuned["method"] == "finetune"
    assert os.path.exists(tmp_path / "pre" / "narm_ml-100k_basic_step1.finetune2_lr0.5.test_best.json")

    # The vmapped fine-tuning equals plain SGD on a copy of the model, one task at a time.
    args = options.parse_args(argv + ["--finetune_steps=2", "--finetune_lr=0.5"])
    trainer = train_original.BaselineTrainer(args)
    trainer.load(1, restore_training=False)
    tasks = trainer.dataset.test_tasks().select(slice(0, 3))
    trainer.model.eval()
    batched = trainer.finetuned_predictions(tasks)[0]
    for t in range(3):
        model = copy.deepcopy(trainer.model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        items, labels = tasks.support_items[t], tasks.support_ratings[t] / trainer.max_rating
        # b_user's fold-in start (the default): each distinct support item's mean residual, shrunk by λ
        with torch.no_grad():
            residuals = labels - model(items) + model.user_bias
            by_item = {}
            for item, residual in zip(items[items != 0].tolist(), residuals[items != 0].tolist()):
                by_item.setdefault(item, []).append(residual)
            total = sum(sum(r) / len(r) for r in by_item.values()) + model.rating_head.user_bias_reg * model.user_bias
            model.user_bias.copy_(total / (len(by_item) + model.rating_head.user_bias_reg))
        for _ in range(2):
            optimizer.zero_grad()
            mask = items != 0
            (((model(items) - labels) ** 2 * mask).sum() / mask.sum()).backward()
            optimizer.step()
        with torch.no_grad():
            expected = model(tasks.query_items[t])[:, -1] * trainer.max_rating
        assert torch.allclose(batched[t], expected, atol=1e-5)


def test_pretrained_hand_off_into_main(ratings_file, tmp_path, capsys):
    argv = flags(ratings_file, tmp_path, "--model=bert4rec", "--pretrain_epochs=1")
    trainer = run(argv + ["--save_pretrained=True"])
    path = tmp_path / "pre" / "bert4rec_ml-100k_pretrained.pt"
    assert path.exists()
    # the advice names the non-default folder that main.py must look in
    assert f"python main.py --model=bert4rec --mode=ml-100k --pretrain_log_dir={tmp_path}/pre " in capsys.readouterr().out
    exported = torch.load(path, weights_only=True)
    assert torch.equal(exported["item_embedding"], trainer.best["state"]["item_embedding.weight"])

    # main.py starts from it and trains.
    meta_args = options.parse_args(argv + ["--load_pretrained_embedding=True", "--num_train_iterations=1",
                                           "--log_interval=1"])
    meta = main.MetaTrainer(meta_args, Distributed("cpu"))
    main.load_pretrained(meta_args, meta.learner, meta.fingerprint)
    assert torch.equal(meta.learner.backbone.item_embedding.weight, exported["item_embedding"])
    assert main.main(meta_args).iteration == 1
    whole = options.parse_args(argv + ["--load_pretrained=True"])
    meta = main.MetaTrainer(whole, Distributed("cpu"))
    main.load_pretrained(whole, meta.learner, meta.fingerprint)
    for name, value in meta.learner.backbone.state_dict().items():
        assert torch.equal(value, trainer.best["state"][name]), name

    # Other sizes, another data set: one line, no traceback.
    other_data = tmp_path / "other.data"
    write_movielens(str(other_data), fmt="ml-100k", num_users=120, num_items=60, seed=4)
    capsys.readouterr()
    argv = argv + [f"--checkpoint_dir={tmp_path}/fresh"]  # the runs above left checkpoints in ckpt/
    for mismatch, message in ((["--bert_hidden_units=8", "--bert_num_heads=2"], "error: pretrained item embedding in "),
                              ([f"--data_path={other_data}"], f"error: pretrained export {path} was trained on other data")):
        with pytest.raises(SystemExit) as exit_info:
            options.run_cli(main.main, argv + ["--load_pretrained_embedding=True", *mismatch])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(message), err
    # Pretrained under another user split: its training users may be main.py's test users.
    with pytest.raises(SystemExit):
        options.run_cli(main.main, argv + ["--load_pretrained_embedding=True", "--num_test_data=19"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another user split (num_test_data=20 (now 19))" in err[0], err


def test_errors_are_one_line(ratings_file, tmp_path, capsys):
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--pretrain_epochs=1")
    cases = [
        (argv + ["--checkpoint_step=3", "--test"], "no checkpoint for step 3"),
        (argv + ["--test_baseline"], "belongs to main.py"),
    ]
    run(argv)
    cases += [
        (argv + ["--checkpoint_step=1", "--test", "--gru4rec_hidden_size=8"], r"gru4rec_hidden_size=16 (now 8)"),
        (argv + ["--checkpoint_step=1", "--test", "--random_seed=1"], "random_seed=222 (now 1)"),
        (argv + ["--checkpoint_step=1"], "epoch 1 already reaches --pretrain_epochs=1"),
    ]
    for case, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            options.run_cli(train_original.main, case)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_a_fresh_run_replaces_an_earlier_one_only_with_overwrite(ratings_file, tmp_path, capsys):
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--pretrain_epochs=3")
    prefix = runs.basic_prefix(run(argv).args)
    earlier = {name: (tmp_path / "pre" / name).read_bytes() for name in os.listdir(tmp_path / "pre")}
    with pytest.raises(SystemExit):
        options.run_cli(train_original.main, argv[:-1] + ["--pretrain_epochs=1"])
    assert "resume it with --checkpoint_step=3" in capsys.readouterr().err
    assert {name: (tmp_path / "pre" / name).read_bytes() for name in os.listdir(tmp_path / "pre")} == earlier
    run(argv + ["--pretrain_epochs=1", "--overwrite=True"])
    assert sorted(os.listdir(tmp_path / "pre")) == [f"{prefix}_step0.pt", f"{prefix}_step1.pt"]


def test_step_choice_one_se_gives_basic_the_start_unless_its_best_epoch_gains_beyond_the_noise(
        ratings_file, tmp_path, monkeypatch):
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--rating_head=plain", "--pretraining_lr=0.01",
                 "--pretrain_epochs=3")
    trained = run(argv)
    assert trained.best["step"] in (1, 2, 3)  # training moved the best away from epoch 0
    minimum = run(argv + ["--checkpoint_step=3", "--test"])
    start = run(argv + ["--checkpoint_step=0", "--test", "--test_best=False"])
    assert start["rmse"] != minimum["rmse"]
    gains = []
    monkeypatch.setattr(metrics, "paired_gain",
                        lambda *_: gains.pop(0) and {"difference": -0.01, "standard_error": 0.02, "resolved": False})
    gains.append(True)
    fell_back = run(argv + ["--checkpoint_step=3", "--test", "--step_choice=one-se"])
    assert fell_back["rmse"] == start["rmse"] and fell_back["weights"].startswith("the start's weights (step 0)")
