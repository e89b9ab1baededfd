"""compare.py and ablation.py never pass a stale result as fresh, and stop cleanly: every reused report is
keyed on the ratings file's content and checked whole (report, per-target CSVs), a damaged one is named
and made again, SIGTERM reaches the child that saves, a second run on one results folder is refused."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

import ablation
import compare
from evaluation import baselines
from studies import study
from training import checkpointing

from helpers import same_size_edit
from ratings import synthetic as sy
from test_ablation import argv as ablation_argv
from test_compare import argv as compare_argv, in_process, no_runs
from test_main import REPO


# ============================================================================ reused reports
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
    '... is missing'), and a truncated user-mean CSV was never noticed: a baseline's
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


# ============================================================================ a stopped compare.py
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
    """It used to leave the child training on as an orphan."""
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
