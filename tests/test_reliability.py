"""Nothing lost, nothing silently wrong (issue 16): resume with changed flags, the run lock, duplicate
ratings, non-finite scores, Ctrl-C and SIGTERM, data fingerprints, and the faults that must end in one line."""
import errno
import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from common import errors
from common.runtime import Distributed, Terminated
import dataloader
from evaluation import metrics
import main
import options
from ratings import preprocess
from ratings.tasks import MetaDataset
import train_original
from training import checkpointing, runs

from helpers import make_args
from ratings import synthetic as sy
from test_main import REPO, flags, run

PREFIX = "gru4rec_ml-100k_melo"


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "u.data"
    sy.write_movielens(str(path), fmt="ml-100k", num_users=120, num_items=80, seed=3)
    return str(path)


@pytest.fixture(scope="module")
def trained(ratings_file, tmp_path_factory):
    """A finished 4-step gru4rec run (checkpoints of steps 2 and 4) to copy from."""
    folder = tmp_path_factory.mktemp("trained")
    trainer = run(flags(ratings_file, folder, "--model=gru4rec", "--num_threads=1"))
    return folder, trainer


def gru4rec(ratings_file, tmp_path, *extra):
    return flags(ratings_file, tmp_path, "--model=gru4rec", "--num_threads=1", *extra)


def copy_checkpoints(trained, tmp_path, *steps):
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    for step in steps:
        name = f"{PREFIX}_step{step}.pt"
        shutil.copy(trained[0] / "ckpt" / name, tmp_path / "ckpt" / name)
    return tmp_path / "ckpt"


def one_line_error(argv, capsys, script=main):
    """Run `script` through run_cli; return its single stderr line (asserting exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        options.run_cli(script.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ============================================================================ resume with changed flags
def test_a_resumed_run_trains_with_the_learning_rates_it_is_given(ratings_file, tmp_path, trained, capsys):
    ckpt = copy_checkpoints(trained, tmp_path, 2)
    changed = gru4rec(ratings_file, tmp_path, "--outer_lr=0.0005", "--min_outer_lr=0.0002", "--lstm_lr=0.05",
                      "--min_lstm_lr=0.02", "--checkpoint_step=2")
    # right after loading step 2 of 4: the cosine of the new flags, half way
    trainer = main.MetaTrainer(options.parse_args(changed), Distributed("cpu"))
    trainer.load(2, restore_training=True)
    groups = trainer.optimizer.param_groups
    assert groups[0]["lr"] == pytest.approx(3.5e-4) and groups[2]["lr"] == pytest.approx(0.035)
    assert trainer.scheduler.base_lrs[0] == 0.0005 and trainer.scheduler.base_lrs[2] == 0.05
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(3.5e-4)
    # Adam's moments still come from the checkpoint
    saved = torch.load(ckpt / f"{PREFIX}_step2.pt", weights_only=True)["optimizer"]
    assert torch.equal(trainer.optimizer.state_dict()["state"][0]["exp_avg"], saved["state"][0]["exp_avg"])
    capsys.readouterr()
    resumed = run(changed)
    err = capsys.readouterr().err
    assert "outer_lr=0.001 (now 0.0005)" in err and "lstm_lr=0.01 (now 0.05)" in err
    assert "will not equal one that was never stopped" in err
    # at the end of the schedule: the new floors, recorded as such
    assert [g["lr"] for g in resumed.optimizer.param_groups][0:3:2] == pytest.approx([2e-4, 0.02])
    final = torch.load(ckpt / f"{PREFIX}_step4.pt", weights_only=True)["optimizer"]["param_groups"]
    assert final[0]["initial_lr"] == 0.0005 and final[0]["lr"] == pytest.approx(2e-4)
    # the weights differ from the uninterrupted run's (the lrs were applied)
    assert not torch.equal(resumed.learner.state_dict()["backbone.item_embedding.weight"],
                           trained[1].learner.state_dict()["backbone.item_embedding.weight"])


# ============================================================================ the run lock
def test_a_second_run_of_the_same_name_is_refused_while_the_first_holds_the_lock(ratings_file, tmp_path, trained,
                                                                                  capsys):
    ckpt = copy_checkpoints(trained, tmp_path, 2)
    lock = checkpointing.RunLock(str(ckpt), PREFIX, "--checkpoint_dir").acquire()
    try:
        for extra in ([], ["--checkpoint_step=2"], ["--overwrite=True"]):
            line = one_line_error(gru4rec(ratings_file, tmp_path, *extra), capsys)
            assert f"another {PREFIX} run is writing to {ckpt}" in line and "another --checkpoint_dir" in line
        # train_original.py holds its own lock in --pretrain_log_dir
        baseline = runs.basic_prefix(options.parse_args(gru4rec(ratings_file, tmp_path)))
        with checkpointing.RunLock(str(tmp_path / "pre"), baseline, "--pretrain_log_dir").acquire():
            line = one_line_error(gru4rec(ratings_file, tmp_path, f"--pretrain_log_dir={tmp_path / 'pre'}",
                                          "--pretrain_epochs=1"), capsys, train_original)
            assert f"another {baseline} run is writing to {tmp_path / 'pre'}" in line
        # --test only reads: it runs beside a training run
        assert run(gru4rec(ratings_file, tmp_path, "--checkpoint_step=2", "--test"))["count"] == 40
    finally:
        lock.release()
    # once the lock is free, a run removes its own stale temporary files (a SIGKILL during a save), not others'
    (ckpt / f".tmp-{PREFIX}_step4.pt-k1ll3d.pt").write_bytes(b"half a checkpoint")
    (ckpt / ".tmp-sasrec_ml-100k_melo_step2.pt-x.pt").write_bytes(b"another run's")
    run(gru4rec(ratings_file, tmp_path, "--checkpoint_step=2"))
    assert sorted(os.listdir(ckpt)) == [".tmp-sasrec_ml-100k_melo_step2.pt-x.pt", f"{PREFIX}_step2.pt",
                                        f"{PREFIX}_step2.test_best.csv", f"{PREFIX}_step2.test_best.json",
                                        f"{PREFIX}_step2.test_best.validation.csv", f"{PREFIX}_step4.pt"]


# ============================================================================ duplicate ratings
def test_duplicate_ratings_keep_the_latest_and_are_counted(ratings_file, tmp_path):
    original = open(ratings_file).read()
    first = original.splitlines()[0].split("\t")  # that pair rated again, later and with another value
    again = "\t".join([first[0], first[1], "1" if first[2] != "1" else "5", str(int(first[3]) + 10 ** 9)])
    doubled = tmp_path / "dup.data"
    doubled.write_text(original + original + again + "\n")
    rows = len(original.splitlines())
    args = make_args("ml-100k", str(doubled), tmp_path, min_item=1, num_test_data=20)
    data = preprocess.load_data(args)
    reference = preprocess.load_data(make_args("ml-100k", ratings_file, tmp_path, min_item=1, num_test_data=20))
    assert data.duplicates_dropped == rows + 1 and len(data.ratings) == len(reference.ratings)
    user = int(np.flatnonzero(data.user_ids == int(first[0]))[0])
    items, ratings = data.sequence(user)
    assert items[-1] == np.flatnonzero(data.item_ids == int(first[1]))[0] + 1 and ratings[-1] == float(again.split("\t")[2])
    assert len(items) == reference.sequence_lengths()[user]
    # no test target stands in its own support windows
    tasks = MetaDataset.from_args(data, args).test_tasks()
    for k in range(len(tasks)):
        target = int(tasks.query_items[k, 0, -1])
        assert target not in tasks.support_items[k][tasks.support_mask[k]].flatten().tolist()
    summary = dataloader.format_summary(MetaDataset.from_args(data, args).summary(), args)
    assert f"{rows + 1} repeated (user, item) ratings dropped, the latest kept" in summary
    kept = preprocess.load_data(make_args("ml-100k", str(doubled), tmp_path, min_item=1, keep_duplicates=True))
    assert len(kept.ratings) > 2 * len(reference.ratings) and kept.duplicates_dropped == 0  # another cache entry
    assert kept.fingerprint() != data.fingerprint()


# ============================================================================ non-finite scores
def test_a_non_finite_validation_score_stops_without_saving(ratings_file, tmp_path, monkeypatch):
    def diverged(self, tasks):
        return {"rmse": float("nan"), "mae": float("nan"), "mean_per_rating_rmse": float("nan"), "per_rating": {}}

    monkeypatch.setattr(main.MetaTrainer, "evaluate", diverged)
    with pytest.raises(errors.MeloError, match=r"validation RMSE became nan at step 0; stopped without saving "
                                                 r"step 0 \(no checkpoint of this run was saved\)"):
        run(gru4rec(ratings_file, tmp_path))
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path / "ckpt"))
    monkeypatch.setattr(train_original.BaselineTrainer, "evaluate", diverged)
    with pytest.raises(errors.MeloError, match="validation RMSE became nan after epoch 0; stopped without saving"):
        train_original.main(options.parse_args(gru4rec(ratings_file, tmp_path, f"--pretrain_log_dir={tmp_path}/pre")))
    assert not any(name.endswith(".pt") for name in os.listdir(tmp_path / "pre"))


def test_a_report_never_holds_nan(tmp_path, capsys):
    report = {"count": 2, "rmse": float("nan"), "mae": 1.0, "mean_per_rating_rmse": float("inf"),
              "per_rating": {"4": {"count": 2, "rmse": float("nan"), "mae": 1.0, "mean_prediction": float("nan")}}}
    path = tmp_path / "report.json"
    with pytest.raises(errors.MeloError, match="non-finite numbers .*written as null"):
        metrics.publish(report, "test", str(path))
    assert "RMSE nan" in capsys.readouterr().out
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["rmse"] is None and json.loads(text)["per_rating"]["4"]["mae"] == 1.0


def test_test_into_a_folder_it_cannot_write_prints_the_numbers_first(ratings_file, tmp_path, trained, capsys,
                                                                     monkeypatch):
    copy_checkpoints(trained, tmp_path, 4)

    def read_only(data, path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(metrics, "write_json_atomic", read_only)
    with pytest.raises(SystemExit) as exit_info:
        options.run_cli(main.main, gru4rec(ratings_file, tmp_path, "--checkpoint_step=4", "--test"))
    printed = capsys.readouterr()
    assert exit_info.value.code == 2 and "RMSE" in printed.out and "mean pred" in printed.out
    assert printed.err.startswith("error: the report could not be written to") and "Permission denied" in printed.err


# ============================================================================ Ctrl-C and SIGTERM
SIGNAL_SCRIPT = """
import os, signal, sys
import main, options
sig, where, argv = getattr(signal, sys.argv[1]), sys.argv[2], sys.argv[3:]
hooked = main.MetaTrainer.train_step if where == "training" else main.MetaTrainer.evaluate
def send_then_go_on(self, *args):
    if self.iteration == (2 if where == "training" else 4):
        os.kill(os.getpid(), sig)  # acted on once this step is done (training) or between validation batches
    return hooked(self, *args)
setattr(main.MetaTrainer, "train_step" if where == "training" else "evaluate", send_then_go_on)
options.run_cli(main.main, argv)
"""


def test_sigterm_and_ctrl_c_save_the_latest_state_and_a_resume_equals_an_uninterrupted_run(ratings_file, tmp_path,
                                                                                         capsys):
    cases = [(name, where) for name in ("SIGTERM", "SIGINT") for where in ("training", "validation")]
    argv = gru4rec(ratings_file, tmp_path, "--num_train_iterations=6")
    started = {}
    for name, where in cases:
        folder = tmp_path / f"{name}-{where}"
        started[name, where] = subprocess.Popen(
            [sys.executable, "-c", SIGNAL_SCRIPT, name, where, *argv, f"--checkpoint_dir={folder}",
             f"--log_dir={folder}/runs"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uninterrupted = run(argv + [f"--checkpoint_dir={tmp_path}/whole"])
    printed = capsys.readouterr().out
    for (name, where), process in started.items():
        out, err = process.communicate(timeout=300)
        folder = tmp_path / f"{name}-{where}"
        step = 3 if where == "training" else 4
        assert process.returncode == (143 if name == "SIGTERM" else 130), err
        what = "terminated (SIGTERM)" if name == "SIGTERM" else "interrupted"
        assert f"{what}: saved step {step} to {folder}/{PREFIX}_step{step}.pt" in err
        assert f"resume with --checkpoint_step={step}" in err and "Traceback" not in err
        saved = torch.load(folder / f"{PREFIX}_step{step}.pt", weights_only=True)
        assert saved["step"] == step and saved["pending_validation"] == (where == "validation")
        if where == "validation":
            assert "before its validation finished" in err and saved["best_step"] in (0, 2)  # validated before 4
            run(argv + [f"--checkpoint_dir={folder}", "--checkpoint_step=4", "--test"])
            assert "saved before its own validation finished" in capsys.readouterr().err
        resumed = run(argv + [f"--checkpoint_dir={folder}", f"--log_dir={folder}/runs", f"--checkpoint_step={step}"])
        assert resumed.best["step"] == uninterrupted.best["step"] and resumed.best["rmse"] == uninterrupted.best["rmse"]
        for key, value in uninterrupted.learner.state_dict().items():
            assert torch.equal(value, resumed.learner.state_dict()[key]), key
        # the first "train loss" after the resume averages the same iterations as without the stop
        line = next(line for line in printed.splitlines() if line.startswith("step 4: train loss"))
        assert line.split(" | ")[0] in capsys.readouterr().out


INNER_LOOP_SIGNAL_SCRIPT = """
import os, signal, sys
import main, meta_learner, options
state = {"iteration": None, "calls": 0}
step, forward = main.MetaTrainer.train_step, meta_learner.functional_call
def train_step(self):
    state["iteration"], state["calls"] = self.iteration, 0
    try:
        return step(self)
    finally:
        state["iteration"] = None
def functional_call(*args, **kwargs):  # the backbone's forward inside vmap and grad
    if state["iteration"] == 2:
        state["calls"] += 1
        if state["calls"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, inside torch.func
    return forward(*args, **kwargs)
main.MetaTrainer.train_step, meta_learner.functional_call = train_step, functional_call
options.run_cli(main.main, sys.argv[1:])
"""


def test_sigterm_inside_the_vmapped_inner_loop_saves_the_step_and_resumes_exactly(ratings_file, tmp_path, trained):
    """A signal handler that raised there gave 'tensor may have escaped from inside a function being
    vmapped', exit 1, and lost the step (issue 22): it only sets a flag, acted on after the step."""
    argv = gru4rec(ratings_file, tmp_path)
    process = subprocess.run([sys.executable, "-c", INNER_LOOP_SIGNAL_SCRIPT, *argv], cwd=REPO,
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 143, process.stderr
    assert "Traceback" not in process.stderr and "escaped" not in process.stderr
    assert f"terminated (SIGTERM): saved step 3 to {tmp_path}/ckpt/{PREFIX}_step3.pt" in process.stderr
    assert "resume with --checkpoint_step=3" in process.stderr
    resumed = run(argv + ["--checkpoint_step=3"])
    for key, value in trained[1].learner.state_dict().items():
        assert torch.equal(value, resumed.learner.state_dict()[key]), key


def test_sigterm_stops_train_original_at_the_last_finished_epoch(ratings_file, tmp_path, monkeypatch, capsys):
    original = train_original.BaselineTrainer.train_epoch

    def terminated_in_epoch_2(self, bar):
        if self.epoch == 1:
            raise Terminated()  # what runtime.sigterm_as_interrupt raises on SIGTERM
        return original(self, bar)

    monkeypatch.setattr(train_original.BaselineTrainer, "train_epoch", terminated_in_epoch_2)
    with pytest.raises(SystemExit) as exit_info:
        train_original.main(options.parse_args(gru4rec(ratings_file, tmp_path, f"--pretrain_log_dir={tmp_path}/pre")))
    assert exit_info.value.code == 143
    assert "terminated (SIGTERM) in epoch 2; resume with --checkpoint_step=1" in capsys.readouterr().err
    saved = sorted(os.listdir(tmp_path / "pre"))  # epoch 1 and epoch 0 (the start)
    assert saved == ["gru4rec_ml-100k_basic_step0.pt", "gru4rec_ml-100k_basic_step1.pt"]


TRAIN_ORIGINAL_SIGNAL_SCRIPT = """
import os, signal, sys
import torch
import options, train_original
state = {"epoch": None, "sent": False}
epoch, backward = train_original.BaselineTrainer.train_epoch, torch.Tensor.backward
def train_epoch(self, bar):
    state["epoch"] = self.epoch
    return epoch(self, bar)
def send_in_backward(self, *args, **kwargs):  # the handler runs inside autograd, mid-epoch 2
    if state["epoch"] == 1 and not state["sent"]:
        state["sent"] = True
        os.kill(os.getpid(), signal.SIGTERM)
    return backward(self, *args, **kwargs)
train_original.BaselineTrainer.train_epoch, torch.Tensor.backward = train_epoch, send_in_backward
options.run_cli(train_original.main, sys.argv[1:])
"""


def test_sigterm_inside_a_train_original_batch_stops_at_the_last_finished_epoch(ratings_file, tmp_path):
    """Raised from the handler, SIGTERM could land anywhere (inside autograd, under DDP's hooks): it only
    sets a flag now, acted on between batches and epochs, as in main.py."""
    argv = gru4rec(ratings_file, tmp_path, f"--pretrain_log_dir={tmp_path}/pre", "--pretrain_epochs=3",
                   "--pretraining_batch_size=16")
    done = subprocess.run([sys.executable, "-c", TRAIN_ORIGINAL_SIGNAL_SCRIPT, *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 143, done.stderr
    assert "Traceback" not in done.stderr
    assert "terminated (SIGTERM) in epoch 2; resume with --checkpoint_step=1" in done.stderr
    assert sorted(os.listdir(tmp_path / "pre")) == ["gru4rec_ml-100k_basic_step0.pt", "gru4rec_ml-100k_basic_step1.pt"]


def test_progress_in_a_log_is_plain_lines_not_carriage_returns(ratings_file, tmp_path, capsys):
    """compare.py's logs held ~300 kB of tqdm redraws for one run; a file gets a line every 10 percent."""
    with open(tmp_path / "main.log", "w") as log:   # as compare.py runs main.py
        done = subprocess.run([sys.executable, "main.py", *gru4rec(ratings_file, tmp_path, "--num_train_iterations=10")],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=300)
    text = (tmp_path / "main.log").read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    assert [line.split(" ")[0] for line in text.splitlines() if "%)" in line] == [f"{k}/10" for k in range(1, 11)]
    train_original.main(options.parse_args(gru4rec(ratings_file, tmp_path, f"--pretrain_log_dir={tmp_path}/pre",
                                                   "--pretrain_epochs=2")))
    err = capsys.readouterr().err
    assert "\r" not in err and "gru4rec_ml-100k_basic epochs: 2/2 (100%) loss=" in err


def test_a_nan_validation_of_a_resumed_step_names_the_step_before_as_last_good(ratings_file, tmp_path, trained,
                                                                                 monkeypatch):
    """Resumed at a step saved before its validation (a stop during validation), a NaN validation called
    that very step the last good checkpoint."""
    ckpt = copy_checkpoints(trained, tmp_path, 2, 4)
    state = torch.load(ckpt / f"{PREFIX}_step4.pt", weights_only=True)
    state["pending_validation"] = True
    torch.save(state, ckpt / f"{PREFIX}_step4.pt")

    def diverged(self, tasks):
        return {"rmse": float("nan"), "mae": float("nan"), "mean_per_rating_rmse": float("nan"), "per_rating": {}}

    monkeypatch.setattr(main.MetaTrainer, "evaluate", diverged)
    with pytest.raises(errors.MeloError, match=r"validation RMSE became nan at step 4; stopped without saving step 4 "
                                                 r"\(the last good checkpoint is step 2\)"):
        run(gru4rec(ratings_file, tmp_path, "--checkpoint_step=4", "--num_train_iterations=6"))


# ============================================================================ data fingerprints
def test_a_checkpoint_trained_on_other_data_is_refused(ratings_file, tmp_path, trained, capsys):
    ckpt = copy_checkpoints(trained, tmp_path, 4)
    lines = open(ratings_file).read().splitlines()
    fields = lines[0].split("\t")
    fields[2] = "1" if fields[2] != "1" else "5"  # one rating changed: the same users and items
    other = tmp_path / "other.data"
    other.write_text("\n".join(["\t".join(fields)] + lines[1:]) + "\n")
    for extra in (["--test"], ["--num_train_iterations=6"]):
        line = one_line_error(gru4rec(str(other), tmp_path, "--checkpoint_step=4", *extra), capsys)
        assert f"checkpoint {ckpt}/{PREFIX}_step4.pt was trained on other data (data fingerprint" in line
    # a checkpoint saved before fingerprints were recorded: used, with a warning
    old = torch.load(ckpt / f"{PREFIX}_step4.pt", weights_only=True)
    del old["data_fingerprint"]
    torch.save(old, ckpt / f"{PREFIX}_step4.pt")
    run(gru4rec(str(other), tmp_path, "--checkpoint_step=4", "--test"))
    assert "records no data fingerprint (saved by an older MELO)" in capsys.readouterr().err


# ============================================================================ one-line errors
@pytest.mark.parametrize("damage, message", [
    (lambda c: c.pop("best_meta_state"), "lacks best_meta_state: an incomplete or damaged file"),
    (lambda c: c["meta_state"].update({"backbone.item_embedding.weight": torch.zeros(3, 2)}),
     "the weights in .* do not fit this model \\(.*size mismatch"),
    (lambda c: c.update(log_folder="../.."), "records the log folder '../..', which is not a plain folder name"),
])
def test_damaged_checkpoints_of_the_right_format_are_one_line_errors(ratings_file, tmp_path, trained, capsys,
                                                                     damage, message):
    ckpt = copy_checkpoints(trained, tmp_path, 4)
    checkpoint = torch.load(ckpt / f"{PREFIX}_step4.pt", weights_only=True)
    damage(checkpoint)
    torch.save(checkpoint, ckpt / f"{PREFIX}_step4.pt")
    with pytest.raises(errors.MeloError, match=message):
        run(gru4rec(ratings_file, tmp_path, "--checkpoint_step=4", "--num_train_iterations=6"))


def test_test_without_the_right_model_lists_the_runs_the_folder_holds(ratings_file, tmp_path, trained, capsys):
    copy_checkpoints(trained, tmp_path, 2, 4)
    line = one_line_error(flags(ratings_file, tmp_path, "--model=bert4rec", "--checkpoint_step=4", "--test"), capsys)
    assert f"holds no bert4rec_ml-100k_melo run, but {PREFIX} (steps 2, 4): pass the --model" in line


def test_output_folders_are_checked_before_training(ratings_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(main.MetaTrainer, "train_step", lambda self: pytest.fail("trained before the check"))
    (tmp_path / "a_file").write_text("")
    for flag in ("checkpoint_dir", "log_dir"):
        line = one_line_error(gru4rec(ratings_file, tmp_path, f"--{flag}={tmp_path / 'a_file'}"), capsys)
        assert f"--{flag}={tmp_path / 'a_file'} is a file, not a folder" in line
        line = one_line_error(gru4rec(ratings_file, tmp_path, f"--{flag}={tmp_path / 'a_file' / 'below'}"), capsys)
        assert "is not a folder MELO can write to" in line


def test_a_full_disk_is_one_line_and_keeps_what_was_saved(ratings_file, tmp_path, trained):
    ckpt = copy_checkpoints(trained, tmp_path, 2)
    before = (ckpt / f"{PREFIX}_step2.pt").read_bytes()
    limit = len(before) // 2  # a file-size limit (ulimit -f) that no checkpoint fits under
    script = ("import resource, sys, options, main\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
              "options.run_cli(main.main, sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, *gru4rec(ratings_file, tmp_path, "--checkpoint_step=2")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: could not write {ckpt}/{PREFIX}_step4.pt") and "file-size limit" in last, done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(os.listdir(ckpt)) == [f"{PREFIX}_step2.pt"] and (ckpt / f"{PREFIX}_step2.pt").read_bytes() == before


ROWS = "".join(f"u{i},i{i % 3},4.0,{1400000000 + i}\n" for i in range(12))
YELP_RECORD = '{"user_id": "a", "business_id": "b", "stars": 4, "date": "2016-01-01"}\n'


@pytest.mark.parametrize("mode, content, message", [
    ("amazon", "asin,reviewer,overall,unixReviewTime\n" + ROWS,
     "line 1: header 'asin,reviewer,overall,unixReviewTime' does not name the user, item, rating and timestamp "
     "columns once each; names understood (any case): user: reviewerid"),
    ("amazon", "a,b,c,d\n" + ROWS, "or say what the columns hold with --csv_columns"),
    ("ml-100k", "1\t2\t4\t1000\n1\t3\t4\t18000000000000000000\n1\t4\t4\t1001\n",
     "line 2: timestamp 18000000000000000000 is beyond the range of unix seconds that MELO stores (int64)"),
    ("amazon", "u,i,4.0,1000\nu,j,4.0,1.8e19\nu,k,4.0,1001\n", "line 2: timestamp 1.8e19 is beyond the range"),
    ("amazon", "reviewerID,product_id,rating,date\n" + ROWS[:60] + 'u9,"i9,4.0,1400000009\n' + ROWS[60:],
     "line 4: a quoted field that starts on this line is never closed"),
    ("amazon", "reviewerID,product_id,rating,date\n" + ROWS + 'u9,"i9,4.0,1400000009\n' + ROWS * 4000,
     "line 14: a quoted field that starts here is never closed"),
    ("yelp", YELP_RECORD + "[1,2,3]\n" + YELP_RECORD, "line 2: expected one JSON object per line"),
    ("yelp", YELP_RECORD + YELP_RECORD + "42\n", "line 3: expected one JSON object per line"),
    ("yelp", YELP_RECORD + "null\n", "line 2: expected one JSON object per line"),
    ("ml-100k", gzip.compress(b"1\t2\t4\t1000\n", mtime=0), "is gzip-compressed: unpack it first (gunzip -k FILE)"),
    ("amazon", b"\xef\xbb\xbfreviewerID,product_id,rating,date\n" + ROWS.encode(),
     "line 1: starts with a UTF-8 byte-order mark (BOM), which is not part of the data: remove it"),
    ("amazon", b"u,i,4.0,1000\nu,j\xe9,4.0,1001\nu,k,4.0,1002\n",
     "line 2: holds a byte that is not UTF-8 (a latin-1 file?): convert the file, e.g. iconv -f latin1"),
    ("ml-100k", b"1\t2\t4\t1000\n1\t3\t4\t1001\n1\t4\xe9\t4\t1002\n", "line 3: holds a byte that is not UTF-8"),
    # the file's own text is quoted, however the timestamp is spelled (pandas reads a float column)
    ("ml-100k", "1\t2\t4\t881250949\n1\t3\t4\t881250950\n1\t4\t4\t8.81251e+08\n1\t5\t4\t881250952\n",
     "line 3: timestamp '8.81251e+08' is not an integer (unix seconds)"),
    ("ml-1m", "1::2::4::881250949\n1::3::4::881250950.0\n", "line 2: timestamp '881250950.0' is not an integer"),
    # a header and no ratings, not pandas' "No columns to parse from file"
    ("amazon", "reviewerID,product_id,rating,date\n\n", "holds a header line but no ratings"),
    ("yelp", "user_id,business_id,stars,timestamp\n", "holds a header line but no ratings"),
    ("yelp", "user_id,business_id,stars\nu,i,4\n",
     "expected 4 comma-separated fields user_id,business_id,stars,timestamp (with or without that header), got 3"),
])
def test_bad_ratings_files_are_one_line_errors_with_the_line(tmp_path, mode, content, message):
    path = tmp_path / "ratings.txt"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(errors.MeloError) as error:
        preprocess.load_data(make_args(mode, str(path), tmp_path, min_item=1, min_sequence=2))
    assert "\n" not in str(error.value) and str(error.value).startswith(str(path))
    assert message in str(error.value), str(error.value)


def test_csv_columns_reads_a_header_it_does_not_know(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("asin,reviewer,overall,unixReviewTime\n" + "".join(
        f"i{i},u{i % 2},{1 + i % 5}.0,{1000 + i}\n" for i in range(12)))
    data = preprocess.load_data(make_args("amazon", str(path), tmp_path, min_item=1, min_sequence=2,
                                     csv_columns="item,user,rating,timestamp"))
    assert list(data.user_ids) == ["u0", "u1"] and data.num_items == 12 and data.item_ids[0] == "i0"
    # without a header, with the rating last (dates in the third column)
    path.write_text("".join(f"i{i},u{i % 2},2014-01-{1 + i:02d},{1 + i % 5}.0\n" for i in range(12)))
    data = preprocess.load_data(make_args("amazon", str(path), tmp_path, min_item=1, min_sequence=2,
                                     csv_columns="item,user,timestamp,rating"))
    assert list(data.user_ids) == ["u0", "u1"] and sorted(set(data.ratings.tolist())) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("when", ["start", "mid-run"])
def test_a_full_log_disk_is_one_line_and_keeps_the_checkpoints(ratings_file, tmp_path, capsys, monkeypatch, when):
    """TensorBoard's writer raised OSError with a traceback (issue 22): now one line, as for checkpoints."""
    from torch.utils.tensorboard import SummaryWriter

    def full(self, *args, **kwargs):
        if when == "start" or self.step4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def add_scalar(self, tag, value, step=None, *args, **kwargs):
        self.step4 = getattr(self, "step4", False) or step == 4   # from step 4's training loss on
        return full(self)

    monkeypatch.setattr(SummaryWriter, "add_text" if when == "start" else "add_scalar",
                        full if when == "start" else add_scalar)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        options.run_cli(main.main, gru4rec(ratings_file, tmp_path))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    line = errors[0]   # (the progress bar shares stderr)
    assert "could not write the TensorBoard log" in line and "No space left on device" in line
    assert "checkpoints saved before are intact" in line
    saved = sorted(os.listdir(tmp_path / "ckpt"))
    assert saved == ([] if when == "start" else [f"{PREFIX}_step0.pt", f"{PREFIX}_step2.pt"]), saved  # no temporary files
    for name in saved:
        assert checkpointing.read_saved_dict(str(tmp_path / "ckpt" / name), "checkpoint")["step"] == int(name[-4])
