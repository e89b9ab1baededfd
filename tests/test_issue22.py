"""Stale results never pass as fresh (issue 22): the data cache and every reused report are keyed on the
ratings file's content; signals, full disks, truncated reports and bad rates end in one line."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import ablation
import baselines
import checkpointing
import compare
import dataloader as dl
import options
import study

import synthetic as sy
from test_ablation import argv as ablation_argv
from test_compare import argv as compare_argv, in_process, keep_thread_count, no_runs  # noqa: F401
from test_main import REPO


def same_size_edit(path):
    """Change ratings without changing the file's size, then restore its mtime (`touch -r`)."""
    before = os.stat(path)
    lines = open(path).read().splitlines(keepends=True)
    for number in range(0, len(lines), 3):   # every third rating: 5 <-> 1, other values kept
        user, item, rating, timestamp = lines[number].split("\t")
        lines[number] = "\t".join((user, item, {"5": "1", "1": "5"}.get(rating, rating), timestamp))
    with open(path, "w") as handle:
        handle.write("".join(lines))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_the_data_cache_sees_a_same_size_edit_with_its_mtime_restored(tmp_path):
    path = str(tmp_path / "u.data")
    sy.write_movielens(path, fmt="ml-100k", num_users=60, num_items=40, seed=4)
    args = sy.make_args("ml-100k", path, tmp_path, num_test_data=10)
    before = dl.load_data(args)
    same_size_edit(path)
    after = dl.load_data(args)
    assert not np.array_equal(before.ratings, after.ratings)
    assert after.fingerprint() != before.fingerprint()   # what checkpoints and reports carry
    np.testing.assert_array_equal(after.ratings, dl.load_data(sy.make_args("ml-100k", path, tmp_path / "fresh",
                                                                            num_test_data=10)).ratings)


# ============================================================================ reused reports (items 1, 7)
@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A finished gru4rec comparison on its own ratings file. The tests below damage it and check that the
    next compare.py makes again exactly what was damaged, which leaves it finished; the data-edit test
    comes last in this file."""
    folder = tmp_path_factory.mktemp("compared")
    path = str(folder / "u.data")
    sy.write_movielens(path, fmt="ml-100k", num_users=120, num_items=80, seed=3)
    command = compare_argv(path, folder, "--models=gru4rec", "--finetune_steps_grid=")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "run_script", in_process([]))
        text, _ = compare.main(command)
    return command, path, folder / "results" / "ml-100k" / "seed222", text


def rerun(command, monkeypatch):
    """compare.main(command) with the runs in this process; returns (table, [(script, argv)])."""
    calls = []
    monkeypatch.setattr(study, "run_script", in_process(calls))
    text, _ = compare.main(command)
    return text, calls


@pytest.mark.parametrize("name, kept, message", [
    ("gru4rec_ml-100k_maml_step2.test_best.json", 1 / 2, "cannot be read (truncated"),
    ("gru4rec_ml-100k_melo_step2.test_best.csv", 1 / 3, "is not the one written with")])
def test_a_truncated_report_or_per_target_csv_is_named_and_made_again(compared, monkeypatch, capsys, name, kept,
                                                                       message):
    command, _, seed, text = compared
    written = seed / "checkpoints" / name
    content = written.read_text()
    written.write_text(content[:int(len(content) * kept)])
    capsys.readouterr()
    again, calls = rerun(command, monkeypatch)
    assert f"{written} {message}" in capsys.readouterr().out
    # only that method's test runs again, no training
    assert [(script, "--test" in argv, f"--use_adaptive_loss={'_melo_' in name}" in argv)
            for script, argv in calls] == [("main.py", True, True)]
    read = json.loads if name.endswith(".json") else str
    assert read(written.read_text()) == read(content) and again == text


@pytest.mark.parametrize("name, damage, message", [
    ("user-item-bias_ml-100k.test.csv", "truncate", "is not the one written with"),
    ("user-mean_ml-100k.test.csv", "truncate", "is not the one written with"),
    ("mf-fold-in_ml-100k.test.csv", "remove", "is missing"),
    ("shrunk-user-mean_ml-100k.test.validation.csv", "truncate", "is not the one written with"),
])
def test_a_baselines_damaged_csv_is_named_and_made_again(compared, monkeypatch, capsys, name, damage, message):
    """A truncated user-item-bias CSV made compare.py loop ('remove it, and run the same command again', then
    '... is missing'), and a truncated user-mean CSV was never noticed (issue 35, item 8): a baseline's
    CSVs are checked like every other report's, and a damaged one is tested again."""
    command, _, seed, text = compared
    written = seed / "checkpoints" / name
    content = written.read_text()
    if damage == "remove":
        written.unlink()
    else:
        written.write_text(content[:len(content) // 3])
    capsys.readouterr()
    again, calls = rerun(command, monkeypatch)
    baseline = name.split("_")[0]
    assert f"{baselines.BASELINES[baseline].label.lower()}: {written} {message}" in capsys.readouterr().out
    assert [(script, argv[-1]) for script, argv in calls] == [("main.py", f"--baseline={baseline}")]
    assert written.read_text() == content and again == text


def test_a_report_without_a_data_fingerprint_is_tested_again(compared, monkeypatch):
    command, _, seed, text = compared
    report = seed / "pretrained" / "gru4rec_ml-100k_basic_step2.test_best.json"
    old = json.loads(report.read_text())
    del old["data_fingerprint"]   # as written before reports recorded it
    report.write_text(json.dumps(old))
    again, calls = rerun(command, monkeypatch)
    assert [(script, "--test" in argv) for script, argv in calls] == [("train_original.py", True)]
    assert again == text


# ============================================================================ a stopped compare.py (item 4)
def copied(compared, tmp_path, iterations):
    """compare.py's command on a copy of the finished comparison (same ratings file) whose MAML and MELO are
    still to train for `iterations` (their runs removed, the folder's settings saying that length): its
    first step is MAML's training."""
    command, _, seed, _ = compared
    root = tmp_path / "results" / "ml-100k"
    shutil.copytree(seed.parents[1], tmp_path / "results")
    for path in (root / "seed222" / "checkpoints").glob("gru4rec_ml-100k_m*"):  # maml_ and melo_
        path.unlink()
    settings = json.loads((root / "settings.json").read_text())
    (root / "settings.json").write_text(json.dumps({**settings, "num_train_iterations": iterations}))
    return [f"--results_dir={tmp_path}/results" if flag.startswith("--results_dir=") else flag
            for flag in command] + [f"--num_train_iterations={iterations}"]


def start_compare(command, until_in_log):
    """A real `python compare.py` whose first step (MAML's training) has started: returns it once that
    child's log shows `until_in_log` (the child prints unbuffered)."""
    log = os.path.join(command_folder(command), "seed222", "logs", "gru4rec_maml_train.log")
    process = subprocess.Popen([sys.executable, "compare.py", *command], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (os.path.exists(log) and until_in_log in open(log).read()):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    return process, log


def command_folder(command):
    return os.path.join(next(f for f in command if f.startswith("--results_dir="))[len("--results_dir="):], "ml-100k")


def processes_naming(text):
    """Pids of the live processes whose command line holds `text` (this test's folder)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if text.encode() in handle.read() and int(pid) != os.getpid():
                    found.append(int(pid))
        except OSError:  # it ended meanwhile
            pass
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_compare_stops_its_child_which_saves_and_the_line_says_how_to_resume(compared, tmp_path, capsys):
    """It used to leave the child training on as an orphan (issue 22, item 4)."""
    command = copied(compared, tmp_path, 400)
    process, log = start_compare(command, "training, ")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=240)
    assert process.returncode == 143, err
    assert err.strip().splitlines()[-1] == ("terminated (SIGTERM): the running step saved what it had, finished runs "
                                            f"are kept; resume with: python compare.py {shlex.join(command)}")
    child = open(log).read()
    assert "Traceback" not in child and "Traceback" not in err
    step = int(child.split("terminated (SIGTERM): saved step ")[1].split()[0])   # forwarded, and saved
    assert not processes_naming(str(tmp_path))
    assert not os.path.exists(os.path.join(command_folder(command), ".compare.lock"))
    compare.main(command + ["--dry_run"])   # the same command resumes that training
    assert f"--checkpoint_step={step}" in capsys.readouterr().out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_a_child_does_not_outlive_a_sigkilled_compare(compared, tmp_path):
    command = copied(compared, tmp_path, 400)
    process, log = start_compare(command, "training, ")
    children = [pid for pid in processes_naming(str(tmp_path)) if pid != process.pid]
    assert children
    process.kill()
    process.communicate(timeout=60)
    deadline = time.time() + 120
    while processes_naming(str(tmp_path)):
        assert time.time() < deadline, "the child outlived its SIGKILLed parent"
        time.sleep(0.2)
    assert "terminated (SIGTERM): saved step" in open(log).read()   # and it saved on its way out


def test_a_second_compare_on_one_results_folder_is_refused_up_front(compared):
    command, _, seed, _ = compared
    def files():
        return {path: os.stat(path).st_mtime_ns for path in seed.parent.rglob("*") if path.is_file()}

    before = files()
    with study.lock_results(str(seed.parent), "compare"):   # what a running compare.py holds
        done = subprocess.run([sys.executable, "compare.py", *command], cwd=REPO, capture_output=True, text=True,
                              timeout=240)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"error: another compare run is writing to {seed.parent}")
    assert files() == before   # nothing written or truncated there


def test_a_childs_lock_refusal_is_reported_as_a_lock_refusal(compared, tmp_path):
    """Not the last line of its log, which was an orphan's progress bar."""
    command = copied(compared, tmp_path, 4)
    checkpoints = os.path.join(command_folder(command), "seed222", "checkpoints")
    with checkpointing.RunLock(checkpoints, "gru4rec_ml-100k_maml", "--checkpoint_dir") as lock:
        lock.acquire()   # another MAML run of this name, writing there
        done = subprocess.run([sys.executable, "compare.py", *command], cwd=REPO, capture_output=True, text=True,
                              timeout=240)
    assert done.returncode == 2, done.stderr
    assert ("failed with exit status 2: error: another gru4rec_ml-100k_maml run is writing to "
            f"{checkpoints}") in done.stderr
    log = tmp_path / "child.log"
    log.write_text("python main.py\nerror: another x run is writing to y\n 37%|###7      | 11/30\r 40%|####  | 12/30\n")
    assert study.failure_line(str(log)) == "error: another x run is writing to y"


def test_compare_remakes_every_result_of_an_edited_ratings_file(compared, monkeypatch):
    command, path, seed, text = compared
    before = json.loads((seed / "checkpoints" / "gru4rec_ml-100k_melo_step2.test_best.json").read_text())
    same_size_edit(path)
    again, calls = rerun(command, monkeypatch)
    trainings = [(script, argv) for script, argv in calls if not ({"--test", "--test_baseline"} & set(argv))]
    assert [script for script, _ in trainings] == ["train_original.py", "main.py", "main.py"]
    assert all("--overwrite=True" in argv for _, argv in trainings)   # over the runs of the old data
    assert len(calls) == len(baselines.BASELINES) + 2 * 3   # every baseline tested, Basic, MAML, MELO trained and tested
    after = json.loads((seed / "checkpoints" / "gru4rec_ml-100k_melo_step2.test_best.json").read_text())
    assert after["data_fingerprint"] != before["data_fingerprint"] and again != text
    monkeypatch.setattr(study, "run_script", no_runs)   # and now all of it is fresh
    assert compare.main(command)[0] == again


def test_ablation_remakes_a_variant_of_an_edited_ratings_file(tmp_path, monkeypatch):
    path = str(tmp_path / "u.data")
    sy.write_movielens(path, fmt="ml-100k", num_users=120, num_items=80, seed=3)
    command = ablation_argv(path, tmp_path, "--variants=maml")
    monkeypatch.setattr(study, "run_script", in_process([]))
    _, first = ablation.main(command)
    same_size_edit(path)
    calls = []
    monkeypatch.setattr(study, "run_script", in_process(calls))
    _, second = ablation.main(command)
    assert [("--test" in argv, "--overwrite=True" in argv) for _, argv in calls] == [(False, True), (True, False)]
    assert second != first


# ============================================================================ learning rates (item 6)
def test_every_learning_rate_flag_is_bounded_to_what_adam_can_use(capsys):
    parser = options.build_parser()
    rate_actions = [action for action in parser._actions
                    if action.type is options.learning_rate or action.dest == "finetune_lr_grid"]
    rate_flags = [action.option_strings[0] for action in rate_actions]
    assert len(rate_flags) == 13 and {"--user_bias_lr", "--outer_lr", "--bias_outer_lr", "--finetune_lr_grid"} <= set(rate_flags)
    for flag in rate_flags:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            options.parse_args([f"{flag}=2e38"])   # passed the float32 check, then overflowed Adam
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag}: must be a learning rate from 0 to 10000, got 2e38" in err[0], err
    assert all(action.help.endswith("(0 to 10000)") for action in rate_actions)  # what --help shows
    # the bound itself trains: Adam's first steps at LR_MAX stay finite in float32
    weight = torch.nn.Parameter(torch.ones(4))
    adam = torch.optim.Adam([weight], lr=options.LR_MAX)
    for _ in range(3):
        adam.zero_grad()
        (weight ** 2).sum().backward()
        adam.step()
    assert torch.isfinite(weight).all()
