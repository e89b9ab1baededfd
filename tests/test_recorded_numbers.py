"""The test reports of a tiny fixed-seed run of every method on every backbone, with both rating heads,
against the numbers recorded in tests/recorded_numbers.json.

A change that must not move the numbers (a refactor, a new flag at its default) leaves them as recorded.
A change that moves them on purpose records them again, and its commit says why:

    python tests/test_recorded_numbers.py --record

Two tolerances (`close`): the errors, weights and validation scores agree to a relative 1e-6, the last
bits that differ between CPU instruction sets; the query-gradient means are sums of second-order
gradients over users whose float reductions round with the CPU's vector width (AVX2 against AVX-512:
up to a relative 1.5e-5 of an entry near zero), so they agree to 2e-5 of the largest mean of their
table. A change of the method moves the numbers far more: a test perturbs every recorded number by 1e-4
(relative to it, or to its table's largest entry) and sees the comparison fail.
"""
import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import main  # noqa: E402
import options  # noqa: E402
from ratings.synthetic import write_movielens  # noqa: E402
import train_original  # noqa: E402

RECORDED = os.path.join(HERE, "recorded_numbers.json")
BACKBONES = ("bert4rec", "sasrec", "gru4rec", "narm")
HEADS = ("plain", "bias")
# what a report says about the method: the errors, the step whose weights were tested, and the analysis
KEYS = ("rmse", "mae", "mean_per_rating_rmse", "adaptive_weight_by_rating", "query_gradient_by_rating",
        "query_gradient_by_share")
# Recorded with requirements.txt's torch. Another release rounds the transformers' float kernels
# differently and a few training steps amplify it (torch 2.11: every BERT4Rec and SASRec run is off by
# up to a few per cent, while GRU4Rec, NARM and the baselines agree to the last bit), so there only those
# compare.
TRANSFORMERS = ("bert4rec", "sasrec")


def pinned_torch():
    """The release requirements.txt pins torch to, as 'major.minor.' (what the numbers are recorded with)."""
    with open(os.path.join(os.path.dirname(HERE), "requirements.txt")) as file:
        version = next(line for line in file if line.startswith("torch==")).strip()[len("torch=="):]
    return version.rsplit(".", 1)[0] + "."


def on_pinned_torch():
    return torch.__version__.startswith(pinned_torch())


def flags(folder, out, *extra):
    """The data in `folder`, every run's files in `folder`/`out` (run names do not say the rating head)."""
    return ["--mode=ml-100k", f"--data_path={folder}/u.data", f"--data_dir={folder}/Data", "--min_item=1",
            "--num_test_data=12", "--val_size=8", "--batch_size=4", "--num_samples=4", "--num_query_set=2",
            "--max_seq_len=8", "--bert_hidden_units=16", "--gru4rec_hidden_size=16", "--narm_hidden_size=16",
            "--pretraining_batch_size=64", "--pretrain_epochs=1", "--num_train_iterations=2", "--log_interval=2",
            "--inner_lr=0.05", "--num_threads=1", f"--checkpoint_dir={folder}/{out}/ckpt",
            f"--log_dir={folder}/{out}/runs", f"--pretrain_log_dir={folder}/{out}/pre", *extra]


def numbers(report):
    """The recorded part of a report; the query gradients by their mean alone (their t and share of users
    helped follow from the same per-user values)."""
    found = {key: report[key] for key in KEYS if key in report}
    for key in ("query_gradient_by_rating", "query_gradient_by_share"):
        if key in found:
            found[key] = {bucket: row["mean"] for bucket, row in found[key].items()}
    found["validation_rmse"] = report.get("validation", {}).get("rmse")
    return found


def run_everything(folder):
    """{run name: numbers} of every method, backbone and head on one generated file in `folder`."""
    write_movielens(os.path.join(folder, "u.data"), fmt="ml-100k", num_users=90, num_items=60, seed=5)
    found = {}
    baselines = main.main(options.parse_args(flags(folder, "baselines", "--test_baseline")))
    for name, report in baselines.items():
        found[name] = numbers(report)
    # the MF fold-in at its grid's minimum (--grid_choice=minimum: the ML-1M tables' choice)
    minimum = flags(folder, "baselines-minimum", "--test_baseline", "--baseline=mf-fold-in", "--grid_choice=minimum")
    found["mf-fold-in-grid-minimum"] = numbers(main.main(options.parse_args(minimum))["mf-fold-in"])
    for model in BACKBONES:
        for head in HEADS:
            shared = flags(folder, head, f"--model={model}", f"--rating_head={head}")
            basic = shared + ["--checkpoint_step=1", "--test"]
            train_original.main(options.parse_args(shared))
            found[f"{model}-{head}-basic"] = numbers(train_original.main(options.parse_args(basic)))
            found[f"{model}-{head}-finetune"] = numbers(train_original.main(options.parse_args(
                basic + ["--finetune_steps=2", "--finetune_lr=0.1"])))
            for method, adaptive in (("maml", "False"), ("melo", "True")):
                argv = shared + [f"--use_adaptive_loss={adaptive}"]
                main.main(options.parse_args(argv))
                found[f"{model}-{head}-{method}"] = numbers(main.main(options.parse_args(
                    argv + ["--checkpoint_step=2", "--test"])))
    return found


# The query-gradient means: float reductions over users, compared at a tolerance of their table's scale.
REDUCED = ("query_gradient_by_rating", "query_gradient_by_share")
RELATIVE = 1e-6      # everything else: the last bits of a float32 computation
REDUCED_SCALE = 2e-5  # a query-gradient mean: this share of the largest |mean| of its table


def close(found, recorded, path="", scale=None):
    """Paths where `found` and `recorded` differ: numbers by a relative RELATIVE, or, inside a table of
    REDUCED (`scale` its largest |value|), by REDUCED_SCALE × scale."""
    if isinstance(recorded, dict) and isinstance(found, dict):
        if set(found) != set(recorded):
            return [f"{path}: keys {sorted(found)} != {sorted(recorded)}"]
        differing = []
        for key in recorded:
            inner = scale
            if key in REDUCED and isinstance(recorded[key], dict):
                inner = max((abs(v) for v in recorded[key].values() if isinstance(v, (int, float))), default=0.0)
            differing += close(found[key], recorded[key], f"{path}/{key}", inner)
        return differing
    if isinstance(recorded, float) and isinstance(found, (int, float)):
        tolerance = dict(abs=REDUCED_SCALE * scale, rel=0) if scale is not None else dict(rel=RELATIVE, abs=1e-12)
        return [] if found == pytest.approx(recorded, **tolerance) else [f"{path}: {found!r} != {recorded!r}"]
    return [] if found == recorded else [f"{path}: {found!r} != {recorded!r}"]


def recorded_numbers():
    with open(RECORDED) as file:
        return json.load(file)


@pytest.fixture(scope="module")
def found_numbers(tmp_path_factory):
    """Every run's numbers, made once for the module; the JSON round trip of the recording."""
    return json.loads(json.dumps(run_everything(str(tmp_path_factory.mktemp("recorded")))))


@pytest.mark.parametrize("name", sorted(recorded_numbers()))
def test_every_method_gives_its_recorded_numbers(name, found_numbers):
    if name.startswith(TRANSFORMERS) and not on_pinned_torch():
        pytest.skip(f"recorded with torch {pinned_torch()}x; torch {torch.__version__} rounds the transformers' "
                    "float kernels otherwise and training amplifies it (GRU4Rec, NARM and the baselines compare)")
    recorded = recorded_numbers()
    assert set(found_numbers) == set(recorded), "the runs made are not the runs recorded"
    differing = close(found_numbers[name], recorded[name], name)
    assert not differing, "\n".join(differing[:20])


def moved_by_1e_4(numbers):
    """(path, a copy of one run's `numbers` with that one number moved by 1e-4 of itself, or of its
    query-gradient table's largest entry) for every number of the run."""
    for key, value in numbers.items():
        if isinstance(value, float):
            yield f"/{key}", {**numbers, key: value + 1e-4 * abs(value)}
        elif isinstance(value, dict):
            scale = max(map(abs, value.values())) if key in REDUCED else 0.0
            for bucket, entry in value.items():
                moved = entry + 1e-4 * max(abs(entry), scale)
                yield f"/{key}/{bucket}", {**numbers, key: {**value, bucket: moved}}


def test_a_change_of_1e_4_in_any_recorded_number_is_caught():
    """Every number of the recording, moved alone by 1e-4 at the scale it is compared at, is the one
    difference `close` reports; the recording itself has none."""
    recorded = recorded_numbers()
    assert not close(recorded, recorded)
    checked = 0
    for name, numbers in recorded.items():
        for path, moved in moved_by_1e_4(numbers):
            differing = close(moved, numbers)
            assert len(differing) == 1 and differing[0].startswith(f"{path}:"), (name, path, differing)
            checked += 1
    assert checked > 37 * 4  # every run has at least its RMSE, MAE, per-rating and validation RMSE


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_recorded_numbers.py --record")
    if not on_pinned_torch():
        sys.exit(f"record with torch {pinned_torch()}x (requirements.txt), not {torch.__version__}")
    with tempfile.TemporaryDirectory() as scratch:
        made = run_everything(scratch)
    with open(RECORDED, "w") as file:
        json.dump(made, file, indent=1, sort_keys=True)
        file.write("\n")
    print(f"recorded {len(made)} runs in {RECORDED}")
