"""ablation.py: every variant trained and tested on the same data and seeds, the table from its reports,
reuse of finished runs, pretraining once per seed, refusals."""
import json
import re
import shlex

import numpy as np
import pandas as pd
import pytest

import ablation
from evaluation import baselines, metrics
import options
from options import MeloError
from studies import study

# the same generated file and thread-count guard as compare.py's tests, and its in-process stand-in
from test_compare import in_process, no_runs


def argv(ratings_file, tmp_path, *extra):
    return ["--mode=ml-100k", f"--data_path={ratings_file}", f"--results_dir={tmp_path}/results",
            "--model=gru4rec", "--num_train_iterations=2", "--pretrain_epochs=1",
            f"--data_dir={tmp_path}/Data", "--min_item=1", "--num_test_data=20", "--val_size=10",
            "--batch_size=4", "--num_samples=5", "--num_query_set=2", "--max_seq_len=10",
            "--gru4rec_hidden_size=16", "--log_interval=1", "--pretraining_batch_size=64", "--num_threads=1",
            *extra]


def test_ablation_trains_every_variant_and_tabulates_its_reports(ratings_file, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(study, "run_script", in_process(calls))
    flags = argv(ratings_file, tmp_path,
                 "--variants=maml,melo-bounded,melo-unbounded,melo-pretrained,maml-pretrained,melo-step",
                 "--define", "melo-step=--use_adaptive_loss=True --task_state=per_step --query_loss=target")
    text, summary = ablation.main(flags)
    scripts = [script for script, _ in calls]
    assert scripts.count("train_original.py") == 1  # the pretrained export, once for the seed
    assert scripts.count("main.py") == 2 * 6       # train and test of each variant
    assert list(summary) == ["maml", "melo-bounded", "melo-unbounded", "melo-pretrained", "maml-pretrained",
                             "melo-step"]
    for name, cells in summary.items():
        report_path = next(run.report for run in ablation.plan(*ablation.parse(flags)) if run.name == name)
        report = json.loads(open(report_path).read())
        assert cells["rmse"]["mean"] == pytest.approx(report["rmse"])
        assert cells["mean_per_rating_rmse"]["mean"] == pytest.approx(report["mean_per_rating_rmse"])
        assert cells["val_rmse"]["mean"] == pytest.approx(report["validation"]["rmse"])
        weights = [k for k in cells if k.startswith("weight_")]
        assert weights, name
        if name.startswith("maml"):
            assert all(cells[k]["mean"] is None for k in weights)
        else:
            assert all(cells[k]["mean"] == pytest.approx(report["adaptive_weight_by_rating"][k[7:]]) for k in weights)
    assert "| melo-step | defined: --use_adaptive_loss=True --task_state=per_step --query_loss=target |" in text
    # every row has the header's cells: the unbounded form's "|1 + z|" is escaped, not a cell border
    def cells_per_row(text):
        rows = [line for line in text.splitlines() if line.startswith("|")]
        return {len(re.findall(r"(?<!\\)\|", line)) for line in rows}, len(rows)
    assert cells_per_row(text) == ({7 + len(weights)}, 2 + 6)
    assert (tmp_path / "results" / "ml-100k" / "gru4rec" / "ablation.md").read_text() == text
    # a second call finds every report and runs nothing
    monkeypatch.setattr(study, "run_script", no_runs)
    assert ablation.main(flags)[1] == summary
    # a table of MAML++ variants alone has no weight columns, and its header no empty cell
    maml_only, _ = ablation.main([f for f in flags if not f.startswith("--variants")] + ["--variants=maml"])
    assert cells_per_row(maml_only) == ({7}, 2 + 1)
    # results made with other settings are refused, not relabelled
    with pytest.raises(MeloError, match=r"variant maml in .* other settings: lstm_lr=0.01 \(now 0.5\)"):
        ablation.main(flags + ["--lstm_lr=0.5"])
    # so are other lengths: a checkpoint of a longer run has a shorter run's name, and the export none
    with pytest.raises(MeloError, match=r"variant maml in .* other settings: num_train_iterations=2 \(now 3\)"):
        ablation.main(flags + ["--num_train_iterations=3"])
    with pytest.raises(MeloError, match=r"variant melo-pretrained in .* other settings: pretrain_epochs=1 \(now 2\)"):
        ablation.main(flags + ["--pretrain_epochs=2"])
    # the Basic export is shared: a new variant that loads it is refused when it was made for other epochs
    new = [f for f in flags if not f.startswith("--variants")] + [
        "--variants=maml-basic", "--define", "maml-basic=--use_adaptive_loss=False --load_pretrained=True"]
    with pytest.raises(MeloError, match=r"pretrained.pt, which this ablation's variants would load, was made with "
                                        r"other settings: pretrain_epochs=1 \(now 2\); use another --results_dir"):
        ablation.main(new + ["--pretrain_epochs=2"])
    # and when its head's start would be chosen otherwise, or its best epoch by another score
    for flag, named in (("--grid_choice=minimum", r"grid_choice='auto' \(now 'minimum'\)"),
                        ("--select_by=mean_per_rating_rmse", r"select_by='rmse' \(now 'mean_per_rating_rmse'\)"),
                        ("--pretraining_lr=0.01", r"pretraining_lr=0.001 \(now 0.01\)"),
                        ("--vary_init=True", r"model_init_seed=0 \(now 222\)")):
        with pytest.raises(MeloError, match=r"Basic export .* other settings: " + named):
            ablation.main(new + [flag])
    # with the same settings it is reused as it is: the new variant trains, Basic does not
    calls.clear()
    monkeypatch.setattr(study, "run_script", in_process(calls))
    ablation.main(new)
    assert [script for script, _ in calls] == ["main.py", "main.py"]


def test_ablation_refuses_unknown_variants_and_flags_it_sets(ratings_file, tmp_path):
    with pytest.raises(MeloError, match="unknown melo-typo"):
        ablation.parse(argv(ratings_file, tmp_path, "--variants=melo,melo-typo"))
    with pytest.raises(MeloError, match="sets --model_init_seed"):
        ablation.parse(argv(ratings_file, tmp_path, "--vary_init=True", "--model_init_seed=4"))
    with pytest.raises(MeloError, match="sets --checkpoint_dir"):
        ablation.parse(argv(ratings_file, tmp_path, "--checkpoint_dir=here"))
    with pytest.raises(MeloError, match="NAME=FLAGS"):
        ablation.parse(argv(ratings_file, tmp_path, "--define", "nothing"))
    with pytest.raises(SystemExit):  # a variant's flag that main.py does not know fails before any run
        ablation.parse(argv(ratings_file, tmp_path, "--variants=bad", "--define", "bad=--adaptive_weights=huge"))


def test_ablation_pretrains_basic_once_per_rating_head(ratings_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "run_script", in_process(calls))
    flags = argv(ratings_file, tmp_path, "--variants=maml-ft-start,maml-plain,melo-bias-head-only", "--define",
                 "maml-plain=--use_adaptive_loss=False --rating_head=plain --load_pretrained=True --inner_lr=0.1")
    table, summary = ablation.main(flags)
    # the table names a defined variant's flags, and its command line runs again as it was given
    assert "| maml-plain | defined: --use_adaptive_loss=False --rating_head=plain --load_pretrained=True" in table
    command = next(line for line in table.splitlines() if line.startswith("Command: "))
    assert shlex.split(command.removeprefix("Command: `python ablation.py ").removesuffix("`")) == flags
    pretrain = [a for script, a in calls if script == "train_original.py"]
    heads = sorted(next(f for f in reversed(a) if f.startswith("--rating_head=")) for a in pretrain)
    assert heads == ["--rating_head=bias", "--rating_head=plain"]  # one Basic per head, shared by its variants
    for script, a in calls:
        if script == "main.py" and "--test" not in a:
            folder = next(f for f in reversed(a) if f.startswith("--pretrain_log_dir="))
            assert folder.endswith("pretrained-bias") == (options.parse_args(a).rating_head == "bias")
    assert all(cells["rmse"]["mean"] is not None for cells in summary.values())


@pytest.mark.parametrize("name", sorted(ablation.VARIANTS))
def test_every_preset_variant_is_a_valid_main_py_command(name):
    # a preset with a misspelt flag or value would only fail after the runs before it had trained
    description, flags = ablation.VARIANTS[name]
    args = options.parse_args(flags)
    for flag in flags:
        dest = flag[2:].split("=", 1)[0]
        assert hasattr(args, dest), f"{name}: {flag} is not main.py's own spelling"  # not an abbreviation


def test_pairs_add_the_pooled_paired_difference_of_two_variants(ratings_file, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_script", in_process([]))
    flags = argv(ratings_file, tmp_path, "--variants=maml,melo", "--seeds=2", "--pairs=melo:maml")
    ablation.main(flags)
    folder = tmp_path / "results" / "ml-100k" / "gru4rec"
    found = json.loads((folder / "ablation.json").read_text())["pairs"]["melo - maml"]
    # the pooled difference is that of the two variants' metrics over both seeds' test targets together
    runs = ablation.plan(*ablation.parse(flags))
    frames = {name: pd.concat([pd.read_csv(metrics.predictions_path(run.report)) for run in runs if run.name == name])
              for name in ("melo", "maml")}
    rmse = {name: float(np.sqrt(((f["prediction"] - f["rating"]) ** 2).mean())) for name, f in frames.items()}
    assert found["rmse"]["difference"] == pytest.approx(rmse["melo"] - rmse["maml"])
    assert found["rmse"]["low"] <= found["rmse"]["difference"] <= found["rmse"]["high"]
    assert found["rmse"]["users"] == 2 * 20
    row = next(line for line in (folder / "ablation.md").read_text().splitlines() if line.startswith("| melo − maml"))
    assert f"{found['rmse']['difference']:+.4f} [{found['rmse']['low']:+.4f}, {found['rmse']['high']:+.4f}]" in row
    # a paired variant's CSV that is not its report's own is tested again, as compare.py does, not read
    melo_run = next(run for run in runs if run.name == "melo")
    with open(metrics.predictions_path(melo_run.report), "a") as handle:
        handle.write("0,0,1,4.0,2,4.0\n")
    again = {(run.seed, run.name): [label for label, _, _ in run.steps] for run in ablation.plan(*ablation.parse(flags))}
    assert again[melo_run.seed, "melo"] == ["test"] and all(not steps for key, steps in again.items()
                                                             if key != (melo_run.seed, "melo"))


@pytest.mark.parametrize("pairs", ["melo:typo", "melo:melo", "melo"])
def test_pairs_name_two_different_variants(ratings_file, tmp_path, pairs):
    with pytest.raises(MeloError, match="--pairs: .* is not two different variants of --variants"):
        ablation.parse(argv(ratings_file, tmp_path, "--variants=maml,melo", f"--pairs={pairs}"))


def test_baselines_without_a_network_are_variants_tested_once_and_paired(ratings_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study, "run_script", in_process(calls))
    flags = argv(ratings_file, tmp_path, "--variants=maml,mf-fold-in,user-item-bias", "--pairs=maml:mf-fold-in")
    text, summary = ablation.main(flags)
    tests = [a for script, a in calls if script == "main.py" and "--test_baseline" in a]
    assert sorted(next(f for f in a if f.startswith("--baseline=")) for a in tests) == [
        "--baseline=mf-fold-in", "--baseline=user-item-bias"]
    assert len(calls) == 2 + 2  # MAML++ trained and tested; each baseline tested, nothing trained
    runs = {run.name: run for run in ablation.plan(*ablation.parse(flags))}
    for name in ("mf-fold-in", "user-item-bias"):
        report = json.loads(open(runs[name].report).read())
        assert report["method"] == name.replace("-", "_")
        assert summary[name]["rmse"]["mean"] == pytest.approx(report["rmse"])
        # its validation RMSE is its chosen setting's score (for the MF fold-in that of the rule
        # --grid_choice=auto took, not necessarily the grid's minimum)
        selection = report["selection"]
        chosen = [report[axis.name] for axis in baselines.axes(name)]
        chosen = chosen[0] if len(chosen) == 1 else chosen
        assert summary[name]["val_rmse"]["mean"] == pytest.approx(
            selection["validation_scores"][selection["grid"].index(chosen)])
        assert all(summary[name][k]["mean"] is None for k in summary[name] if k.startswith("weight_"))
    assert "| mf-fold-in | no network: MF fold-in |" in text
    # the pair against the start is the paired difference of the two runs' predictions
    found = json.loads((tmp_path / "results" / "ml-100k" / "gru4rec" / "ablation.json").read_text())["pairs"]
    assert found["maml - mf-fold-in"]["rmse"]["difference"] == pytest.approx(
        summary["maml"]["rmse"]["mean"] - summary["mf-fold-in"]["rmse"]["mean"])
    # a baseline does not depend on the training flags: an ablation of longer runs, or at another outer rate,
    # reuses it; another split does not
    calls.clear()
    longer = [f for f in flags if not f.startswith(("--num_train_iterations", "--variants", "--pairs"))]
    ablation.main(longer + ["--num_train_iterations=3", "--outer_lr=0.01", "--variants=mf-fold-in"])
    assert calls == []
    with pytest.raises(MeloError, match=r"variant mf-fold-in in .* other settings: val_size=10 \(now 9\)"):
        ablation.main([f for f in longer if not f.startswith("--val_size")] + ["--val_size=9", "--variants=mf-fold-in"])


def test_a_defined_variant_cannot_take_a_baselines_name(ratings_file, tmp_path):
    with pytest.raises(MeloError, match="mf-fold-in: that is the name of a baseline without a network"):
        ablation.parse(argv(ratings_file, tmp_path, "--variants=mf-fold-in", "--define", "mf-fold-in=--inner_lr=0"))
    with pytest.raises(MeloError, match="sets --baseline"):
        ablation.parse(argv(ratings_file, tmp_path, "--baseline=mf-fold-in"))
