"""torchrun with two gloo processes on the CPU: the same update and the same test report as one process,
and one set of logs and checkpoints."""
import json
import os
import subprocess
import sys

import pytest
import torch

from synthetic import write_movielens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_flags(tmp_path, ratings):
    return ["--mode=ml-100k", f"--data_path={ratings}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=21", "--val_size=9", "--batch_size=5", "--num_samples=5", "--num_query_set=2",
            "--max_seq_len=10", "--model=gru4rec", "--gru4rec_hidden_size=16", "--inner_lr=0.05",
            "--num_train_iterations=1", "--log_interval=1"]


def launch(processes, argv):
    if processes == 1:
        command = [sys.executable, "main.py", *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={processes}", "main.py", *argv]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("distributed")
    ratings = tmp_path / "u.data"
    write_movielens(str(ratings), fmt="ml-100k", num_users=100, num_items=60, seed=5)
    flags = data_flags(tmp_path, ratings)
    for processes in (1, 2):
        launch(processes, flags + [f"--checkpoint_dir={tmp_path}/ckpt{processes}",
                                   f"--log_dir={tmp_path}/runs{processes}"])
    return tmp_path, flags


def test_two_processes_make_the_same_update_as_one(runs):
    tmp_path, _ = runs
    states = [torch.load(tmp_path / f"ckpt{n}" / "gru4rec_ml-100k_melo_step1.pt", weights_only=True)["meta_state"]
              for n in (1, 2)]
    for name, single in states[0].items():
        assert torch.allclose(single, states[1][name], rtol=1e-4, atol=1e-6), name


def test_only_rank_zero_writes_logs_and_checkpoints(runs):
    tmp_path, _ = runs
    assert os.listdir(tmp_path / "ckpt2") == ["gru4rec_ml-100k_melo_step1.pt"]
    assert len(os.listdir(tmp_path / "runs2")) == 1


def test_test_report_under_two_processes_equals_one(runs):
    tmp_path, flags = runs
    reports = []
    for processes in (1, 2):
        launch(processes, flags + [f"--checkpoint_dir={tmp_path}/ckpt2", "--checkpoint_step=1", "--test"])
        path = tmp_path / "ckpt2" / "gru4rec_ml-100k_melo_step1.test_best.json"
        reports.append(json.loads(path.read_text()))
    single, double = reports
    assert single["count"] == double["count"] == 21 * 2
    assert single["per_rating"].keys() == double["per_rating"].keys()
    for key in ("rmse", "mae", "mean_per_rating_rmse"):
        assert single[key] == pytest.approx(double[key], rel=1e-6)
