"""Make the repository root importable (dataloader, options, models) however pytest is started, and keep
the tests on the CPU.

The tests run on the CPU (their fixed seeds give the same numbers there) and their runs use main.py's
`--device=auto`. On a machine with a GPU that would mean CUDA, in this process and in the torchrun
processes the tests start, so the GPU is hidden before torch sees it. `MELO_TEST_DEVICE=cuda` keeps it, for
the GPU checks of tests/test_meta_learner.py (docs/reproducibility.md, Checking a GPU machine).
"""
import os
import sys

if os.environ.get("MELO_TEST_DEVICE", "cpu").startswith("cpu"):
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
