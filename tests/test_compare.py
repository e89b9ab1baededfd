"""compare.py: the runs it plans, the table it builds from the JSON reports, reuse, seeds, refusals.

The end-to-end test runs every piece in this process (the same argv the subprocesses get) to stay fast;
one test runs a real subprocess."""
import importlib
import json
import os
import re

import pytest
import torch

import compare
import options

from synthetic import write_movielens


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "u.data"
    write_movielens(str(path), fmt="ml-100k", num_users=120, num_items=80, seed=3)
    return str(path)


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def argv(ratings_file, tmp_path, *extra):
    return ["--mode=ml-100k", f"--data_path={ratings_file}", f"--results_dir={tmp_path}/results",
            "--num_train_iterations=2", "--pretrain_epochs=2",
            # passed through to every run
            f"--data_dir={tmp_path}/Data", "--min_item=1", "--num_test_data=20", "--val_size=10",
            "--batch_size=4", "--num_samples=5", "--num_query_set=2", "--max_seq_len=10",
            "--bert_hidden_units=16", "--gru4rec_hidden_size=16", "--narm_hidden_size=16", "--log_interval=1",
            "--pretraining_batch_size=64", "--num_threads=1", *extra]


def in_process(calls):
    """A stand-in for compare.run_script that runs the script's main() here, with the same argv."""

    def run_script(script, script_argv, log_path, verbose):
        calls.append((script, list(script_argv)))
        module = importlib.import_module(script[:-3])
        try:
            options.run_cli(module.main, script_argv)
        except SystemExit as exit_info:
            return exit_info.code
        return 0

    return run_script


def no_runs(script, script_argv, log_path, verbose):
    raise AssertionError(f"ran {script} {script_argv} although its report exists")


def markdown_rows(text):
    """The cells of every table row, by method label (RMSE / MAE table) or by (backbone, method label)
    (per-rating table)."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| Method", "| Backbone")):
            cells = [c.strip() for c in line.strip("|").split("|")]
            per_rating = cells[0] == "all" or cells[0] in compare.DISPLAY.values()
            rows[(cells[0], cells[1]) if per_rating else cells[0]] = cells
    return rows


def test_table_end_to_end_equals_the_reports(ratings_file, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(compare, "run_script", in_process(calls))
    command = argv(ratings_file, tmp_path, "--models=gru4rec,narm", "--finetune_steps=2")
    text, summary = compare.main(command)
    scripts = [(script, "--test" in a or "--test_baseline" in a) for script, a in calls]
    assert scripts == [("main.py", True)] + [("train_original.py", False), ("train_original.py", True),
                                             ("train_original.py", True), ("main.py", False), ("main.py", True),
                                             ("main.py", False), ("main.py", True)] * 2
    assert all("--random_seed=222" in a for _, a in calls)

    root = tmp_path / "results" / "ml-100k"
    assert (root / "comparison.md").read_text() == text
    seed = root / "seed222"
    reports = {
        ("mean", None): seed / "checkpoints" / "mean-rating_ml-100k.test.json",
        ("basic", "gru4rec"): seed / "pretrained" / "gru4rec_ml-100k_basic_step2.test_best.json",
        ("finetune", "gru4rec"):
            seed / "pretrained" / "gru4rec_ml-100k_basic_step2.finetune2_lr0.1.test_best.json",
        ("maml", "gru4rec"): seed / "checkpoints" / "gru4rec_ml-100k_maml_step2.test_best.json",
        ("melo", "gru4rec"): seed / "checkpoints" / "gru4rec_ml-100k_melo_step2.test_best.json",
    }
    for model in ("narm",):
        for (method, _), path in list(reports.items())[1:]:
            reports[(method, model)] = path.parent / path.name.replace("gru4rec", model)
    loaded = {key: json.loads(path.read_text()) for key, path in reports.items()}

    # Every number in the table is the JSON report's, rounded to 4 places; the JSON summary holds them exactly.
    rows = markdown_rows(text)
    labels = {"mean": "Mean rating", "basic": "Basic", "finetune": "Fine-tune (2 steps)", "maml": "MAML",
              "melo": "MELO"}
    for column, model in enumerate(("gru4rec", "narm")):
        for method, label in labels.items():
            report = loaded[(method, None if method == "mean" else model)]
            assert rows[label][1 + 2 * column:3 + 2 * column] == [f"{report['rmse']:.4f}", f"{report['mae']:.4f}"]
            assert summary["rmse_mae"][model][method]["rmse"]["mean"] == report["rmse"]
            assert summary["rmse_mae"][model][method]["mae"]["mean"] == report["mae"]
            if method != "mean":
                per_rating = rows[(compare.DISPLAY[model], label)]
                ratings = sorted(report["per_rating"], key=float)
                header = [line for line in text.splitlines() if line.startswith("| Backbone")][0]
                columns = [c.strip() for c in header.strip("|").split("|")]
                for rating in ratings:
                    expected = f"{report['per_rating'][rating]['rmse']:.4f}"
                    assert per_rating[columns.index(f"{rating} ★")] == expected
                assert per_rating[-1] == f"{report['mean_per_rating_rmse']:.4f}"
        for other, row in (("basic", "MELO vs Basic (error reduction)"),
                           ("maml", "MELO vs MAML (error reduction)")):
            melo, base = loaded[("melo", model)]["rmse"], loaded[(other, model)]["rmse"]
            assert rows[row][1 + 2 * column] == f"{100 * (base - melo) / base:+.2f}%"
    assert "–" not in text.split("## RMSE and MAE")[1].split("## RMSE per rating")[0]
    assert (root / "comparison.json").exists() and (root / "settings.json").exists()

    # A second run reads the reports and runs nothing; the table is the same.
    monkeypatch.setattr(compare, "run_script", no_runs)
    capsys.readouterr()
    again, _ = compare.main(command)
    assert again == text


def fake_report(rmse, mae, per_rating):
    rows = {r: {"count": 2, "rmse": v, "mae": v / 2, "mean_prediction": 3.0} for r, v in per_rating.items()}
    return {"count": 2 * len(rows), "rmse": rmse, "mae": mae,
            "mean_per_rating_rmse": sum(per_rating.values()) / len(per_rating), "per_rating": rows}


def test_seeds_give_mean_and_standard_deviation(ratings_file, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "run_script", no_runs)
    command = argv(ratings_file, tmp_path, "--models=sasrec", "--seeds=2", "--random_seed=7")
    config = compare.parse(command)
    values = {("mean", 7): 1.2, ("mean", 8): 1.0, ("basic", 7): 1.0, ("basic", 8): 0.8,
              ("maml", 7): 0.9, ("maml", 8): 0.7, ("melo", 7): 0.8, ("melo", 8): 0.6}
    for piece in compare.plan(config):
        value = values[(piece.method, piece.seed)]
        per_rating = {"4": value, "5": value + 1} if piece.seed == 7 else {"4": value}
        os.makedirs(os.path.dirname(piece.report), exist_ok=True)
        with open(piece.report, "w") as handle:
            json.dump(fake_report(value, value / 2, per_rating), handle)
    text, summary = compare.main(command)
    rows = markdown_rows(text)
    std = 0.2 / 2 ** 0.5  # sample standard deviation of two values 0.2 apart
    assert rows["Basic"][1:3] == [f"{0.9:.4f} ± {std:.4f}", f"{0.45:.4f} ± {std / 2:.4f}"]
    assert rows["MELO"][1] == f"{0.7:.4f} ± {std:.4f}"
    assert rows["Mean rating"][1] == f"{1.1:.4f} ± {std:.4f}"
    gains = [100 * (1.0 - 0.8) / 1.0, 100 * (0.8 - 0.6) / 0.8]
    mean_gain = sum(gains) / 2
    gain_std = abs(gains[0] - gains[1]) / 2 ** 0.5
    assert rows["MELO vs Basic (error reduction)"][1] == f"{mean_gain:+.2f}% ± {gain_std:.2f}%"
    assert summary["improvement_percent"]["sasrec"]["vs_basic"]["rmse"]["per_seed"] == pytest.approx(gains)
    assert rows[("SASRec", "MELO")][2:] == [f"{0.7:.4f} ± {std:.4f}", f"{1.8:.4f} (n=1)",
                                            f"{(1.3 + 0.6) / 2:.4f} ± {abs(1.3 - 0.6) / 2 ** 0.5:.4f}"]
    assert "seeds 7, 8 (mean ± standard deviation over seeds)" in text


def test_refusals_are_one_line_errors(ratings_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compare, "run_script", no_runs)
    cases = [
        (argv(ratings_file, tmp_path, "--checkpoint_dir=x"), "compare.py sets --checkpoint_dir"),
        (argv(ratings_file, tmp_path, "--use_adaptive_loss=False"), "compare.py sets --use_adaptive_loss"),
        (argv(ratings_file, tmp_path, "--models=bert4rec,lstm"), "--models: unknown lstm"),
        (argv(ratings_file, tmp_path, "--num_test_data=5000"), "--num_test_data=5000 leaves no training"),
    ]
    for command, message in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            compare.cli(command)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    # The settings of a results folder are recorded; other settings are refused, not mixed in.
    config = compare.parse(argv(ratings_file, tmp_path))
    compare.record_settings(config, compare.check_settings(config))
    with pytest.raises(options.MeloError, match=r"other settings: max_seq_len=10 \(now 12\)"):
        compare.check_settings(compare.parse(argv(ratings_file, tmp_path, "--max_seq_len=12")))


def test_a_failed_run_stops_with_its_last_line(ratings_file, tmp_path, monkeypatch):
    def failing(script, script_argv, log_path, verbose):
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            log.write("progress\nerror: something specific\n")
        return 2

    monkeypatch.setattr(compare, "run_script", failing)
    with pytest.raises(options.MeloError, match=r"seed 222 mean rating \(test: python main.py\) failed with "
                                                r"exit status 2: error: something specific \(full log: "):
        compare.main(argv(ratings_file, tmp_path, "--models=gru4rec"))


def test_dry_run_prints_the_commands(ratings_file, tmp_path, capsys):
    compare.main(argv(ratings_file, tmp_path, "--models=narm", "--dry_run"))
    printed = capsys.readouterr().out
    assert re.search(r"\[1/7\] seed 222 mean rating: test\n    python main.py .*--test_baseline", printed)
    assert "python train_original.py" in printed and "--use_adaptive_loss=True" in printed
    assert not (tmp_path / "results" / "ml-100k" / "seed222").exists()


def test_the_runs_are_real_processes(ratings_file, tmp_path):
    config = compare.parse(argv(ratings_file, tmp_path, "--models=gru4rec"))
    mean = compare.plan(config)[0]
    (label, script, script_argv), = mean.steps
    log = tmp_path / "mean.log"
    assert compare.run_script(script, script_argv, str(log), verbose=False) == 0
    assert os.path.exists(mean.report) and "test mean-rating baseline" in log.read_text()


def test_an_interrupted_training_resumes_from_its_last_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    assert compare.training_step("main.py", ["--x"], str(folder), "gru4rec_ml-100k_melo", 4) == \
        ("train", "main.py", ["--x"])  # nothing saved: a fresh run
    folder.mkdir()
    for step in (1, 2, 6):
        (folder / f"gru4rec_ml-100k_melo_step{step}.pt").write_bytes(b"")
    (folder / "gru4rec_ml-100k_maml_step3.pt").write_bytes(b"")  # another run's file
    assert compare.training_step("main.py", ["--x"], str(folder), "gru4rec_ml-100k_melo", 4) == \
        ("train", "main.py", ["--x", "--checkpoint_step=2"])
