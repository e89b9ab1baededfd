"""main.py end to end on a generated MovieLens-100K file: training, checkpoints, TensorBoard, resume,
--test, --test_baseline and the failures a user can run into."""
import glob
import json
import os
import subprocess
import sys

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from common import errors, runtime
from common.runtime import Distributed, write_atomic
from evaluation import metrics
import main
from meta_learner import MetaLearner, last_step_weights
from models import model_factory
from evaluation.metrics import balanced_rating_weights
import options
from training import checkpointing, runs


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(ratings_file, tmp_path, *extra):
    return ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--batch_size=4", "--num_samples=5", "--num_query_set=2",
            "--max_seq_len=10", "--bert_hidden_units=16", "--gru4rec_hidden_size=16", "--narm_hidden_size=16",
            "--log_interval=2", "--num_train_iterations=4", f"--checkpoint_dir={tmp_path}/ckpt",
            f"--log_dir={tmp_path}/runs", "--inner_lr=0.05", *extra]


def run(argv):
    return main.main(options.parse_args(argv))


def fixed_batch_loss(trainer):
    """Mean outer loss over five meta-batches of training tasks that training never draws."""
    weights = last_step_weights(trainer.args.num_inner_steps)
    with torch.no_grad():
        return sum(trainer.learner.task_losses(trainer.dataset.train_batch(10_000 + k), weights).mean().item()
                   for k in range(5)) / 5


@pytest.mark.parametrize("model", ["bert4rec", "sasrec", "gru4rec", "narm"])
@pytest.mark.parametrize("adaptive", ["True", "False"])
def test_training_writes_checkpoints_and_logs_and_test_reports(ratings_file, tmp_path, model, adaptive, capsys):
    argv = flags(ratings_file, tmp_path, f"--model={model}", f"--use_adaptive_loss={adaptive}")
    trainer = run(argv)
    assert trainer.iteration == 4
    prefix = runs.meta_prefix(trainer.args)
    # step 0, the untrained start, is validated and saved too
    assert sorted(os.listdir(tmp_path / "ckpt")) == [f"{prefix}_step{k}.pt" for k in (0, 2, 4)]
    assert glob.glob(str(tmp_path / "runs" / "*" / "events.out.tfevents.*"))
    dataset = trainer.dataset
    assert (f"{len(dataset.train_users)} training, {len(dataset.val_users)} validation and 20 test users"
            in capsys.readouterr().out)
    report = run(argv + ["--checkpoint_step=4", "--test"])
    printed = capsys.readouterr().out
    assert "RMSE" in printed and "mean pred" in printed
    saved = json.loads((tmp_path / "ckpt" / f"{prefix}_step4.test_best.json").read_text())
    assert saved["rmse"] == pytest.approx(report["rmse"]) and saved["count"] == 20 * 2
    assert 0 < report["rmse"] < 4 and report["mae"] <= report["rmse"]
    assert sum(row["count"] for row in report["per_rating"].values()) == report["count"]


@pytest.mark.parametrize("model", ["bert4rec", "sasrec", "gru4rec", "narm"])
def test_a_short_run_lowers_the_training_loss(ratings_file, tmp_path, model):
    # the training loop's mechanics, at the plain head (the bias head starts at the fold-in: little to gain)
    argv = flags(ratings_file, tmp_path, f"--model={model}", "--num_train_iterations=12", "--log_interval=12",
                 "--outer_lr=0.01", "--rating_head=plain")
    args = options.parse_args(argv)
    before = fixed_batch_loss(main.MetaTrainer(args, Distributed("cpu")))
    after = fixed_batch_loss(run(argv))
    assert after < 0.8 * before


def test_test_is_repeatable_and_test_best_chooses_the_weights(ratings_file, tmp_path, capsys):
    argv = flags(ratings_file, tmp_path, "--model=narm")
    run(argv)
    first = run(argv + ["--checkpoint_step=4", "--test"])
    second = run(argv + ["--checkpoint_step=4", "--test"])
    assert first == second
    exact = run(argv + ["--checkpoint_step=4", "--test", "--test_best=False"])
    assert exact["weights"].startswith("weights of step 4")
    assert os.path.exists(tmp_path / "ckpt" / "narm_ml-100k_melo_step4.test_step.json")


def test_resume_continues_exactly_like_an_uninterrupted_run(ratings_file, tmp_path, capsys):
    argv = flags(ratings_file, tmp_path, "--model=bert4rec", "--bert_dropout=0.3")
    uninterrupted = run(argv)
    events = str(tmp_path / "runs" / uninterrupted.log_folder / "events.out.tfevents.*")
    first_attempt = len(glob.glob(events))
    # A second run that only has the checkpoint of step 2 resumes from it.
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    step2 = tmp_path / "ckpt" / "bert4rec_ml-100k_melo_step2.pt"
    (resumed_dir / step2.name).write_bytes(step2.read_bytes())
    capsys.readouterr()
    resumed = run(argv + [f"--checkpoint_dir={resumed_dir}", "--checkpoint_step=2"])
    assert resumed.iteration == 4
    for (name, a), (_, b) in zip(uninterrupted.learner.state_dict().items(), resumed.learner.state_dict().items()):
        assert torch.equal(a, b), name
    assert resumed.best["rmse"] == uninterrupted.best["rmse"]
    assert "warning" not in capsys.readouterr().err
    # its TensorBoard curves go on in the run's folder, beside the first attempt's events
    assert resumed.log_folder == uninterrupted.log_folder
    assert sorted(os.listdir(tmp_path / "runs")) == [uninterrupted.log_folder]
    assert len(glob.glob(events)) > first_attempt
    # Other training options still resume, with a warning that names them.
    extended = run(argv + [f"--checkpoint_dir={resumed_dir}", "--checkpoint_step=2", "--num_train_iterations=6"])
    assert extended.iteration == 6
    assert "num_train_iterations=4 (now 6)" in capsys.readouterr().err
    run(argv + [f"--checkpoint_dir={resumed_dir}", "--checkpoint_step=4", "--val_size=5", "--num_train_iterations=6"])
    printed = capsys.readouterr()
    assert "val_size=" in printed.err and "chosen on other validation tasks" in printed.err
    assert "validating on 5 users at step 0 and every 2 iterations" in printed.out
    run(argv + [f"--checkpoint_dir={resumed_dir}", "--checkpoint_step=6", "--val_size=500", "--num_train_iterations=7"])
    assert "(--val_size=500 capped)" in capsys.readouterr().out
    # a run that has nothing left to train says so instead of doing nothing
    with pytest.raises(SystemExit):
        options.run_cli(main.main, argv + [f"--checkpoint_dir={resumed_dir}", "--checkpoint_step=4"])
    assert "step 4 already reaches --num_train_iterations=4" in capsys.readouterr().err


def test_a_fresh_run_does_not_overwrite_an_earlier_runs_checkpoints(ratings_file, tmp_path, capsys):
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--num_train_iterations=2")
    run(argv)
    saved = {path.name: path.read_bytes() for path in (tmp_path / "ckpt").iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        options.run_cli(main.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resume it with --checkpoint_step=2" in err[0], err
    assert {path.name: path.read_bytes() for path in (tmp_path / "ckpt").iterdir()} == saved
    # --overwrite=True replaces that run once the new one has saved a checkpoint: a run that fails before
    # (here: no pretrained weights to load) leaves it as it was.
    (tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step2.test_best.json").write_text("{}")
    saved = {path.name: path.read_bytes() for path in (tmp_path / "ckpt").iterdir()}
    with pytest.raises(SystemExit):
        options.run_cli(main.main, argv + ["--overwrite=True", "--load_pretrained_embedding=True",
                                           f"--pretrain_log_dir={tmp_path / 'nothing'}"])
    assert "no pretrained weights" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in (tmp_path / "ckpt").iterdir()} == saved
    # then its checkpoints and reports go, and other runs' files stay
    (tmp_path / "ckpt" / "gru4rec_ml-100k_maml_step2.pt").write_bytes(b"another run")
    run(argv + ["--overwrite=True", "--num_train_iterations=1", "--log_interval=1"])
    assert sorted(path.name for path in (tmp_path / "ckpt").iterdir()) == \
        ["gru4rec_ml-100k_maml_step2.pt", "gru4rec_ml-100k_melo_step0.pt", "gru4rec_ml-100k_melo_step1.pt"]


def test_task_chunks_give_the_same_update(ratings_file, tmp_path):
    results = []
    for chunk in (0, 3):
        # bounded weights: with normalised ones at their neutral start, the last bias' meta-gradient is zero
        # but for float noise, which Adam scales to a full step that differs between chunkings
        args = options.parse_args(flags(ratings_file, tmp_path, "--model=gru4rec", f"--task_chunk={chunk}",
                                        "--adaptive_weights=bounded"))
        torch.manual_seed(0)
        trainer = main.MetaTrainer(args, Distributed("cpu"))
        trainer.train_step()
        results.append(trainer.learner.state_dict())
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], rtol=1e-5, atol=1e-7), name


def test_mean_rating_baseline_reports_on_the_same_targets(ratings_file, tmp_path):
    argv = flags(ratings_file, tmp_path)
    report = run(argv + ["--test_baseline", "--baseline=mean-rating"])["mean-rating"]
    assert report["count"] == 20 * 2
    assert all(row["mean_prediction"] == pytest.approx(report["prediction"]) for row in report["per_rating"].values())
    assert os.path.exists(tmp_path / "ckpt" / "mean-rating_ml-100k.test.json")


def test_missing_step_lists_the_saved_ones(ratings_file, tmp_path):
    argv = flags(ratings_file, tmp_path, "--model=gru4rec")
    run(argv)
    with pytest.raises(errors.MeloError, match=r"no checkpoint for step 3 .*: 0, 2, 4"):
        run(argv + ["--checkpoint_step=3", "--test"])


def test_checkpoint_of_other_settings_is_refused_by_name(ratings_file, tmp_path):
    run(flags(ratings_file, tmp_path, "--model=bert4rec"))
    with pytest.raises(errors.MeloError, match=r"bert_hidden_units=16 \(now 8\)"):
        run(flags(ratings_file, tmp_path, "--model=bert4rec", "--bert_hidden_units=8",
                  "--checkpoint_step=4", "--test"))
    # Another user split would score users the checkpoint was trained on.
    with pytest.raises(errors.MeloError, match=r"random_seed=222 \(now 7\)"):
        run(flags(ratings_file, tmp_path, "--model=bert4rec", "--random_seed=7", "--checkpoint_step=4", "--test"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(ratings_file, tmp_path, monkeypatch):
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--num_train_iterations=6")
    original = MetaLearner.task_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        losses = original(self, *args, **kwargs)
        return losses * float("nan") if calls["n"] == 3 else losses

    monkeypatch.setattr(MetaLearner, "task_losses", poisoned)
    with pytest.raises(errors.MeloError, match=r"became nan at iteration 3; stopped without saving step 3 \(the last good checkpoint is step 2\)"):
        run(argv)
    good = torch.load(tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step2.pt", weights_only=True)
    assert good["step"] == 2 and sorted(os.listdir(tmp_path / "ckpt")) == [f"gru4rec_ml-100k_melo_step{k}.pt" for k in (0, 2)]


def test_ctrl_c_saves_the_latest_state(ratings_file, tmp_path, monkeypatch):
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--num_train_iterations=6", "--log_interval=5")
    original = main.MetaTrainer.train_step

    def interrupted(self):
        if self.iteration == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(main.MetaTrainer, "train_step", interrupted)
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 130
    saved = torch.load(tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step3.pt", weights_only=True)
    assert saved["step"] == 3


def test_command_line_errors_are_one_line_without_traceback(ratings_file, tmp_path):
    cases = [
        flags(ratings_file, tmp_path, "--checkpoint_step=7", "--test"),             # nothing saved yet
        flags(str(tmp_path / "missing.data"), tmp_path),                             # explicit path missing
        flags(ratings_file, tmp_path, "--num_test_data=5000"),                       # too few users
        flags(ratings_file, tmp_path, "--device=gpu"),                               # no such device
        flags(ratings_file, tmp_path, "--device=mps"),                               # not one MELO runs on
    ]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / f"{runs.meta_prefix(options.parse_args(flags(ratings_file, tmp_path)))}_step7.pt").write_bytes(b"\x80junk")
    cases.append(flags(ratings_file, tmp_path, "--checkpoint_step=7", "--test", f"--checkpoint_dir={garbage}"))
    for argv in cases:
        done = subprocess.run([sys.executable, "main.py", *argv], cwd=REPO, capture_output=True, text=True)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr


@pytest.mark.parametrize("argv, message", [
    (["--max_seq_len=5", "--min_sub_window_size=5"], "--min_sub_window_size (5) must be smaller than --max_seq_len (5)"),
    (["--bert_dropout=1"], "--bert_dropout must be in [0, 1), got 1.0"),
    (["--model=bert"], "invalid choice: 'bert'"),
    (["--num_train_iteration=5"], "unrecognized arguments: --num_train_iteration=5"),  # no abbreviations
    # values that would fail deep inside a run, or silently do nothing
    (["--outer_lr=1e300"], "argument --outer_lr: must be a finite number"),
    (["--lstm_lr=nan"], "argument --lstm_lr: must be a finite number"),
    (["--inner_lr=inf"], "argument --inner_lr: must be a finite number"),
    (["--default_rating=-inf"], "argument --default_rating: must be a finite number"),
    (["--checkpoint_step=-5"], "--checkpoint_step must be a saved step (>= 0) or -1 (none), got -5"),
    (["--num_train_iterations=0"], "argument --num_train_iterations: must be >= 1, got 0"),
    (["--csv_columns=user,item,rating"], "--csv_columns must name user, item, rating, timestamp once each"),
])
def test_flag_errors_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        options.parse_args(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("content", [b"", b"\x80not a pickle", "list", "foreign dict"])
def test_unreadable_checkpoints_and_exports_are_one_line_errors(tmp_path, content):
    path = tmp_path / "run_step1.pt"
    if content == "list":
        torch.save([1, 2], path)
    elif content == "foreign dict":
        torch.save({"weights": torch.zeros(2)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(errors.MeloError) as checkpoint_error:
        checkpointing.load_checkpoint(str(tmp_path), "run", 1)
    assert str(path) in str(checkpoint_error.value) and len(str(checkpoint_error.value).splitlines()) == 1
    args = options.parse_args(["--mode=ml-100k", f"--pretrain_log_dir={tmp_path}", "--load_pretrained=True"])
    os.replace(path, tmp_path / f"{args.model}_{args.mode}_pretrained.pt")
    with pytest.raises(errors.MeloError) as export_error:
        main.load_pretrained(args, SimpleNamespace(backbone=model_factory(args, 10)), "0")
    assert "pretrained" in str(export_error.value) and len(str(export_error.value).splitlines()) == 1


def test_write_atomic_leaves_the_old_file_on_failure_and_makes_readable_files(tmp_path):
    path = tmp_path / "report.json"
    write_atomic(str(path), lambda out: out.write("old"), binary=False)
    assert path.read_text() == "old" and os.stat(path).st_mode & 0o777 == 0o644

    def fails(out):
        out.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(str(path), fails, binary=False)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["report.json"]





@pytest.mark.skipif(sys.platform != "linux" or not os.confstr("CS_GNU_LIBC_VERSION"), reason="mallopt is glibc's")
def test_keep_freed_memory_takes_effect_under_glibc():
    # in a fresh process: mallopt's settings are process-wide (docs/performance.md, Threads and memory)
    done = subprocess.run([sys.executable, "-c", "from common import runtime; print(runtime.keep_freed_memory())"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True"]


@pytest.mark.parametrize("keep", [True, False])
def test_keep_freed_memory_follows_the_flag(keep, monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(True))
    runtime.configure_cpu(options.parse_args([f"--keep_freed_memory={keep}"]))
    assert calls == ([True] if keep else [])



def test_a_closed_output_pipe_ends_the_run_quietly_after_the_report_is_written(tmp_path, monkeypatch):
    def reader_gone(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")  # what print raises when `| head` has exited

    report = tmp_path / "report.json"
    monkeypatch.setattr(metrics, "print", reader_gone, raising=False)
    monkeypatch.setattr(metrics, "format_report", lambda report, title: title)
    with pytest.raises(BrokenPipeError):
        metrics.publish({"rmse": 1.0}, "title", str(report))
    assert json.loads(report.read_text()) == {"rmse": 1.0}
    # run_cli then exits with status 1 and no traceback
    script = "import options\ndef main(args):\n    raise BrokenPipeError(32, 'Broken pipe')\noptions.run_cli(main, [])\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr == ""


def scalars_and_images(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder, size_guidance={"images": 0, "scalars": 0}).Reload()
    return ({tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]},
            {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]})


def test_select_by_picks_the_best_weights_and_tensorboard_gets_the_per_rating_figure(ratings_file, tmp_path):
    import train_original

    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--select_by=mean_per_rating_rmse", "--log_interval=1",
                 f"--pretrain_log_dir={tmp_path}/pre", "--pretrain_epochs=3")
    trainer = run(argv)
    scalars, images = scalars_and_images(str(tmp_path / "runs" / trainer.log_folder))
    assert images["val/per_rating"] == [0, 1, 2, 3, 4]
    chosen = scalars["val/mean_per_rating_rmse"]
    assert trainer.best["rmse"] == pytest.approx(min(chosen)) and trainer.best["step"] == chosen.index(min(chosen))
    baseline = train_original.main(options.parse_args(argv))
    chosen = scalars_and_images(str(tmp_path / "runs" / baseline.log_folder))[0]["val/mean_per_rating_rmse"]
    # (epoch 0, the untrained start, is validated and logged too)
    assert baseline.best["rmse"] == pytest.approx(min(chosen)) and baseline.best["step"] == chosen.index(min(chosen))
    # A checkpoint keeps the weights best by its --select_by: testing it under another one is refused.
    with pytest.raises(errors.MeloError, match=r"select_by='mean_per_rating_rmse' \(now 'rmse'\)"):
        run(flags(ratings_file, tmp_path, "--model=gru4rec", "--checkpoint_step=4", "--test"))


def test_normalised_melo_with_a_frozen_loss_network_trains_exactly_as_maml(ratings_file, tmp_path):
    """Every normalised weight is 1 while the loss network cannot move (--lstm_lr=0): MELO is MAML++."""
    states = {}
    for adaptive in ("True", "False"):
        argv = flags(ratings_file, tmp_path / adaptive, "--model=gru4rec", f"--use_adaptive_loss={adaptive}",
                     "--lstm_lr=0", "--min_lstm_lr=0", "--adaptive_weights=normalised", "--outer_lr=0.01")
        states[adaptive] = run(argv).learner.state_dict()
    backbone = [k for k in states["False"] if k.startswith(("backbone.", "lslr."))]
    assert backbone and all(torch.equal(states["True"][k], states["False"][k]) for k in backbone)
    moved = run(flags(ratings_file, tmp_path / "moving", "--model=gru4rec", "--outer_lr=0.01")).learner.state_dict()
    assert not all(torch.equal(moved[k], states["False"][k]) for k in backbone)


def test_melo_reports_its_weight_per_rating_and_maml_does_not(ratings_file, tmp_path, capsys):
    for adaptive in ("True", "False"):
        argv = flags(ratings_file, tmp_path, "--model=gru4rec", f"--use_adaptive_loss={adaptive}",
                     "--task_state=per_step")
        run(argv)
        report = run(argv + ["--checkpoint_step=4", "--test"])
        printed = capsys.readouterr().out
        # both meta-learners: which support ratings the query loss would weight up (t over the test users)
        gradients = report["query_gradient_by_rating"]
        assert set(gradients) <= set(report["per_rating"]) | {f"{v / 2:g}" for v in range(1, 11)}
        assert all(0 <= row["helped"] <= 1 and row["users"] >= 1 for row in gradients.values())
        assert any(row["mean"] != 0 for row in gradients.values()) and "query-loss gradient" in printed
        by_share = report["query_gradient_by_share"]  # the same, by how common the rating is for the user
        assert by_share and set(by_share) <= {"<10%", "10-25%", "25-50%", ">=50%"}
        assert "its share of the user's support set" in printed
        if adaptive == "False":
            assert "adaptive_weight_by_rating" not in report and "adaptive loss weight" not in printed
            continue
        weights = report["adaptive_weight_by_rating"]
        assert set(weights) <= set(report["per_rating"]) | {f"{v / 2:g}" for v in range(1, 11)}
        assert all(w > 0 for w in weights.values()) and "adaptive loss weight by support rating" in printed
        assert len(report["adaptive_weight_by_rating_per_step"]) == 3
        saved = json.loads((tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step4.test_best.json").read_text())
        assert saved["adaptive_weight_by_rating"] == pytest.approx(weights)


def test_step_0_and_the_early_steps_are_validated_and_the_start_can_be_chosen(ratings_file, tmp_path):
    """Step 0 (the untrained start) and every --early_log_interval up to --early_log_until are validated
    and saved; when training only makes validation worse (an outer rate far too high), the best weights
    are step 0's, i.e. the start itself, and --test scores them."""
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--num_train_iterations=5", "--log_interval=4",
                 "--early_log_interval=1", "--early_log_until=2", "--outer_lr=0.5", "--min_outer_lr=0.5")
    trainer = run(argv)
    prefix = runs.meta_prefix(trainer.args)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [f"{prefix}_step{k}.pt" for k in (0, 1, 2, 4, 5)]
    start = torch.load(tmp_path / "ckpt" / f"{prefix}_step0.pt", weights_only=True)
    assert start["best_step"] == 0 and start["pending_validation"] is False
    assert trainer.best["step"] == 0 and trainer.best["rmse"] == start["best_rmse"]
    for key, value in start["meta_state"].items():   # what step 0 saved is the untrained learner
        assert torch.equal(value, trainer.best["state"][key]), key
    report = run(argv + ["--checkpoint_step=5", "--test"])
    assert report["validation"]["step"] == 0 and report["validation"]["rmse"] == pytest.approx(start["best_rmse"])


def test_balanced_query_loss_weights_the_ratings_of_the_training_users(ratings_file, tmp_path):
    args = options.parse_args(flags(ratings_file, tmp_path, "--query_loss=balanced"))
    trainer = main.MetaTrainer(args, Distributed("cpu"))
    training = np.concatenate([trainer.data.sequence(u)[1] for u in trainer.dataset.train_users])
    expected = balanced_rating_weights(training, trainer.data.max_rating).float()
    assert torch.equal(trainer.learner.query_rating_weights, expected)
    assert len(set(expected[expected > 0].tolist())) > 1  # the generated ratings are not uniform
    assert "query_rating_weights" not in trainer.learner.state_dict()  # the data gives it again on resume


def test_step_choice_one_se_keeps_the_start_unless_the_best_steps_gain_is_resolved(ratings_file, tmp_path,
                                                                                   monkeypatch, capsys):
    argv = flags(ratings_file, tmp_path, "--model=gru4rec", "--rating_head=plain", "--outer_lr=0.01",
                 "--num_train_iterations=8", "--log_interval=4")
    trained = run(argv)
    assert trained.best["step"] in (4, 8)  # training moved the best away from the start
    test = argv + ["--checkpoint_step=8", "--test"]
    minimum = run(test)
    start = run(argv + ["--checkpoint_step=0", "--test", "--test_best=False"])
    assert start["rmse"] != minimum["rmse"]
    compared = []

    def gain(frame, start_frame, select_by):
        compared.append((frame["prediction"].to_numpy(), start_frame["prediction"].to_numpy(), select_by))
        return {"difference": -0.01, "standard_error": 0.02 if not resolved else 0.001, "resolved": resolved}

    monkeypatch.setattr(metrics, "paired_gain", gain)
    resolved = True
    kept = run(test + ["--step_choice=one-se"])
    assert kept["rmse"] == minimum["rmse"] and kept["validation"]["step"] == trained.best["step"]
    assert "against the start, one standard error 0.0010" in kept["weights"]
    resolved = False
    fell_back = run(test + ["--step_choice=one-se"])
    assert fell_back["rmse"] == start["rmse"] and fell_back["validation"]["step"] == 0
    assert fell_back["weights"].startswith("the start's weights (step 0)")
    # it compared the best step's validation predictions with the start's, on the same targets
    best_predictions, start_predictions, select_by = compared[-1]
    assert select_by == "rmse" and len(best_predictions) == len(start_predictions)
    assert not np.allclose(best_predictions, start_predictions)


def test_paired_gain_is_resolved_only_beyond_one_standard_error():
    rng = np.random.default_rng(0)
    users = 400
    rating = rng.integers(1, 6, users).astype(float)
    start = rating + np.repeat(rng.normal(0, 1.0, users // 2), 2)  # users in pairs with the same error
    frame = lambda prediction: pd.DataFrame({"user": np.arange(users), "window": 0, "item": 1,  # noqa: E731
                                             "rating": rating, "prediction": prediction})
    closer = metrics.paired_gain(frame(rating + 0.7 * (start - rating)), frame(start), "rmse")
    assert closer["difference"] < 0 and closer["resolved"] and closer["standard_error"] > 0
    # of each pair, one user's error 5 % larger, the other's 5 % smaller: a loss of 0.25 % of the MSE, well
    # within the noise
    wobble = rating + (start - rating) * (1 + 0.05 * np.tile([1.0, -1.0], users // 2))
    noise = metrics.paired_gain(frame(wobble), frame(start), "rmse")
    assert abs(noise["difference"]) < noise["standard_error"] and not noise["resolved"]
    # one standard error: about the standard deviation of the per-user difference in MSE over sqrt(users),
    # mapped to RMSE (d RMSE = d MSE / (2 RMSE))
    mse_se = np.std((wobble - rating) ** 2 - (start - rating) ** 2, ddof=1) / np.sqrt(users)
    assert noise["standard_error"] == pytest.approx(mse_se / (2 * np.sqrt(((start - rating) ** 2).mean())), rel=0.2)
    with pytest.raises(ValueError, match="same targets"):
        metrics.paired_gain(frame(start).iloc[1:], frame(start), "rmse")
