"""Make the repository root importable (dataloader, options, models) however pytest is started, and keep
the tests on the CPU.

The tests run on the CPU (their fixed seeds give the same numbers there) and their runs use main.py's
`--device=auto`. On a machine with a GPU that would mean CUDA, in this process and in the torchrun
processes the tests start, so the GPU is hidden before torch sees it. `MELO_TEST_DEVICE=cuda` keeps it, for
the GPU checks of tests/test_meta_learner.py (docs/reproducibility.md, Checking a GPU machine).
"""
import os
import sys

import pytest

if os.environ.get("MELO_TEST_DEVICE", "cpu").startswith("cpu"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402  (after the GPU is hidden)

from ratings.synthetic import write_movielens  # noqa: E402


# ---------------------------------------------------------------- fixtures several test modules share
@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    """A generated MovieLens-100K file of 120 users and 80 items, one per test module."""
    path = tmp_path_factory.mktemp("data") / "u.data"
    write_movielens(str(path), fmt="ml-100k", num_users=120, num_items=80, seed=3)
    return str(path)


@pytest.fixture
def float64():
    """torch's default dtype float64 for the test (the float64 checks of the inner loop and the heads)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def keep_thread_count():
    """A script run in-process sets torch's thread count (--num_threads): the next test gets it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
