"""Sizes past memory: what the data bounds is clamped (a meta-batch by the training users, support windows by
the windows a task can have), windows are drawn without building them all, and a failed allocation is
one `error:` line."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import main
import options
from ratings import preprocess
from ratings.tasks import MetaDataset, candidate_windows, window_count

from helpers import make_args, one_line_error, one_line_of, small
from test_main import REPO


# ============================================================================ sizes past memory
# A child whose address space is capped: an allocation past it fails with an exception (the old code's
# traceback) instead of the kernel's OOM killer taking it, or this machine, down.
CAPPED = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
import {module}, options
options.run_cli({module}.main, sys.argv[1:])
"""


def capped(module, argv, gib=3):
    limit = gib * 2 ** 30
    return subprocess.run([sys.executable, "-c", CAPPED.format(limit=limit, module=module), *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def dataset(ratings_file, tmp_path, **flags):
    args = make_args("ml-100k", ratings_file, tmp_path, min_item=1, num_test_data=20, val_size=10, **flags)
    return args, MetaDataset.from_args(preprocess.load_data(args), args)


def test_a_meta_batch_holds_each_training_user_at_most_once(ratings_file, tmp_path):
    _, data = dataset(ratings_file, tmp_path, batch_size=100000)
    users = data.train_batch(3).users.tolist()
    assert data.batch_size == len(data.train_users) == 80 and sorted(users) == sorted(data.train_users.tolist())
    _, fewer = dataset(ratings_file, tmp_path, batch_size=7)
    assert fewer.batch_size == 7 and len(set(fewer.train_batch(3).users.tolist())) == 7


def test_a_meta_batch_larger_than_the_training_users_trains_as_all_of_them(ratings_file, tmp_path):
    """--batch_size=100000 of 80 training users ran out of memory; it trains as --batch_size=80."""
    done = capped("main", small(ratings_file, tmp_path / "huge", "--batch_size=100000"))
    assert done.returncode == 0, done.stderr
    assert "every meta-batch all 80 of them (--batch_size=100000 capped)" in done.stdout
    run = main.main(options.parse_args(small(ratings_file, tmp_path / "all", "--batch_size=80")))
    saved = torch.load(tmp_path / "huge" / "ckpt" / "gru4rec_ml-100k_melo_step4.pt", weights_only=True)
    for key, value in run.learner.state_dict().items():
        assert torch.equal(value, saved["meta_state"][key]), key


def test_support_windows_are_capped_at_the_most_a_task_can_have(ratings_file, tmp_path):
    """--num_samples=100000 made arrays of 100000 windows per task, nearly all padding (the help says
    'fewer when a user's history has fewer distinct windows')."""
    args, data = dataset(ratings_file, tmp_path, num_samples=100000, max_seq_len=10)
    most = window_count(10 - 1, args.min_sub_window_size)  # every window of a full task window
    assert data.S == most == 36
    _, exact = dataset(ratings_file, tmp_path, num_samples=most, max_seq_len=10)
    for tasks, same in ((data.test_tasks(), exact.test_tasks()), (data.train_batch(5), exact.train_batch(5))):
        assert tasks.support_items.shape[1] == most and torch.equal(tasks.support_items, same.support_items)
        assert int(tasks.support_mask.sum(1).max()) == most  # some task has them all, none more


@pytest.mark.parametrize("m, min_size", [(1, 1), (2, 2), (9, 2), (29, 2), (30, 5), (4095, 2)])
def test_candidate_windows_are_numpys_triangle_without_making_it(m, min_size):
    a, b = np.triu_indices(m + 1, k=min_size)
    assert window_count(m, min_size) == len(a)
    index = np.arange(len(a)) if len(a) < 10 ** 5 else np.random.default_rng(0).choice(len(a), 1000)
    found = candidate_windows(index, m, min_size)
    assert np.array_equal(found[0], a[index]) and np.array_equal(found[1], b[index])


def test_a_long_window_does_not_make_every_window_of_every_length(ratings_file, tmp_path):
    """Every (a, b) of every length below --max_seq_len was made at start: L³/6 pairs, a numpy MemoryError
    (or the OOM killer) at --max_seq_len=4096."""
    script = ("import resource, sys\n"
              f"resource.setrlimit(resource.RLIMIT_AS, ({3 * 2 ** 30}, {3 * 2 ** 30}))\n"
              "from ratings import preprocess, tasks\nfrom helpers import make_args\n"
              f"args = make_args('ml-100k', {ratings_file!r}, {str(tmp_path)!r}, min_item=1, num_test_data=20, "
              "val_size=10, max_seq_len=4096)\n"
              "test_tasks = tasks.MetaDataset.from_args(preprocess.load_data(args), args).test_tasks()\n"
              "print(tuple(test_tasks.support_items.shape))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "tests")))
    assert done.returncode == 0 and done.stdout.split("\n")[0] == "(20, 8, 4096)", done.stderr


def test_sizes_within_the_bounds_but_past_memory_are_one_line(ratings_file, tmp_path):
    """The allocator's RuntimeError (or numpy's MemoryError) was a traceback; nothing is saved."""
    done = capped("main", small(ratings_file, tmp_path, "--gru4rec_hidden_size=4096",
                                "--gru4rec_embedding_dim=4096"))
    line = one_line_of(done)
    assert line.startswith("error: out of memory (an allocation of ") and "--task_chunk" in line, line
    assert os.listdir(tmp_path / "ckpt") == []


def test_numpys_memory_error_is_one_line(capsys):
    def huge(args):
        return np.zeros((10 ** 7, 10 ** 7))  # refused at once: far past any address space

    line = one_line_error([], capsys, huge)
    assert line.startswith("error: out of memory (an allocation of ") and "TiB failed)" in line
