"""compare.py: the runs it plans, the table it builds from the JSON reports, reuse, seeds, refusals.

The end-to-end test runs every piece in this process (the same argv the subprocesses get) to stay fast;
one test runs a real subprocess."""
import importlib
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

from common import errors
import compare
from evaluation import baselines, metrics
from models import BACKBONES
import options
from studies import study, tables
from training.analysis import SHARE_NAMES



def argv(ratings_file, tmp_path, *extra):
    return ["--mode=ml-100k", f"--data_path={ratings_file}", f"--results_dir={tmp_path}/results",
            "--num_train_iterations=2", "--pretrain_epochs=2",
            # passed through to every run
            f"--data_dir={tmp_path}/Data", "--min_item=1", "--num_test_data=20", "--val_size=10",
            "--batch_size=4", "--num_samples=5", "--num_query_set=2", "--max_seq_len=10",
            "--bert_hidden_units=16", "--gru4rec_hidden_size=16", "--narm_hidden_size=16", "--log_interval=1",
            "--pretraining_batch_size=64", "--num_threads=1", *extra]


def in_process(calls):
    """A stand-in for study.run_script that runs the script's main() here, with the same argv."""

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
            per_rating = cells[0] == "all" or cells[0] in [b.display_name for b in BACKBONES.values()]
            rows[(cells[0], cells[1]) if per_rating else cells[0]] = cells
    return rows


def assert_predictions_match_report(report_path, report):
    """The per-target CSV beside a report adds up to the report's per-window and per-user figures."""
    frame = pd.read_csv(metrics.predictions_path(str(report_path)))
    assert list(frame.columns) == list(metrics.PREDICTION_COLUMNS)
    error = frame["prediction"] - frame["rating"]
    assert len(frame) == report["count"]
    assert math.sqrt((error ** 2).mean()) == pytest.approx(report["rmse"], rel=1e-9)
    assert error.abs().mean() == pytest.approx(report["mae"], rel=1e-9)
    for rating, rows in frame.groupby("rating"):
        row = report["per_rating"][f"{rating:g}"]
        assert row["count"] == len(rows)
        assert math.sqrt(((rows["prediction"] - rows["rating"]) ** 2).mean()) == pytest.approx(row["rmse"], rel=1e-9)
    per_user = frame.groupby("user")[["prediction", "rating"]].mean()  # one prediction per user: its windows' mean
    assert report["per_user"]["count"] == len(per_user)
    assert math.sqrt(((per_user["prediction"] - per_user["rating"]) ** 2).mean()) == \
        pytest.approx(report["per_user"]["rmse"], rel=1e-9)
    assert (frame["window_length"] >= 2).all() and frame["window_length"].max() <= 10


def test_table_end_to_end_equals_the_reports(ratings_file, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(study, "run_script", in_process(calls))
    command = argv(ratings_file, tmp_path, "--models=gru4rec,narm", "--finetune_steps_grid=0,2",
                   "--finetune_lr_grid=0.1,0.5", "--select_by=mean_per_rating_rmse", "--bootstrap=200")
    text, summary = compare.main(command)
    scripts = [(script, "--test" in a or "--test_baseline" in a) for script, a in calls]
    assert scripts == [("main.py", True)] * len(baselines.BASELINES) + [
        ("train_original.py", False), ("train_original.py", True), ("train_original.py", True), ("main.py", False),
        ("main.py", True), ("main.py", False), ("main.py", True)] * 2
    assert all("--random_seed=222" in a and "--select_by=mean_per_rating_rmse" in a for _, a in calls)
    # --start=fold-in (the default): Basic exports nothing, MAML and MELO start from random weights (f ≡ 0,
    # b_user at its fold-in start) with the recipe's inner lr and outer loss, at training and in their
    # tests' records alike
    trainings = [a for script, a in calls if "--test" not in a and "--test_baseline" not in a]
    assert ["--save_pretrained=True" in a for a in trainings] == [False, False, False] * 2
    meta_runs = [options.parse_args(a) for script, a in calls if script == "main.py" and "--test_baseline" not in a]
    assert ("from the fold-in (random weights, f = 0) (inner loop adapting the output layer, inner lr from 0, "
            f"outer loss on the query target; MELO's weights {options.parse_args([]).adaptive_weights}, task state "
            "static, fitting the start too, reading each rating's recency)") in text
    assert ("(item biases starting at the fold-in blend, a 32-column user x item factor term, its tables held "
            "at their start)") in text
    assert len(meta_runs) == 8 and all(not args.load_pretrained and not args.load_pretrained_embedding and
                                       args.user_bias_start == "fold-in" and args.inner_lr == 0 and
                                       args.query_loss == "target" and not args.adapt_user_bias and
                                       args.inner_params == "head" and args.user_factors == 32 and
                                       args.bias_outer_lr == 0 for args in meta_runs)

    root = tmp_path / "results" / "ml-100k"
    assert (root / "comparison.md").read_text() == text
    assert (root / "comparison.png").stat().st_size > 10_000
    seed = root / "seed222"
    reports = {(name, None): seed / "checkpoints" / f"{name}_ml-100k.test.json" for name in baselines.BASELINES}
    for model in ("gru4rec", "narm"):
        reports.update({
            ("basic", model): seed / "pretrained" / f"{model}_ml-100k_basic_step2.test_best.json",
            ("finetune", model): seed / "pretrained" / f"{model}_ml-100k_basic_step2.finetune-tuned.test_best.json",
            ("maml", model): seed / "checkpoints" / f"{model}_ml-100k_maml_step2.test_best.json",
            ("melo", model): seed / "checkpoints" / f"{model}_ml-100k_melo_step2.test_best.json"})
    loaded = {key: json.loads(path.read_text()) for key, path in reports.items()}
    for key, path in reports.items():
        assert_predictions_match_report(path, loaded[key])
    tuned = loaded[("finetune", "gru4rec")]
    selection = tuned["finetune_selection"]
    scores = selection["validation_scores"]
    # the grid first, in its order; then the whole product of any extension past a chosen edge
    assert [(row["lr"], row["steps"]) for row in scores[:4]] == [(0.1, 0), (0.1, 2), (0.5, 0), (0.5, 2)]
    assert {(row["lr"], row["steps"]) for row in scores} == {
        (lr, k) for lr in selection["axes"]["lr"] for k in selection["axes"]["steps"]}
    assert len(selection["axes"]["lr"]) == 2 + selection["extensions"]["lr"]
    best = min(scores, key=lambda row: row["score"])
    assert (tuned["finetune_lr"], tuned["finetune_steps"]) == (best["lr"], best["steps"])
    # 0 steps is the Basic model itself, whatever the lr
    assert len({round(row["score"], 9) for row in scores if row["steps"] == 0}) == 1

    # Every number in the tables is the JSON report's, rounded to 4 places; the JSON summary holds them exactly.
    window_table, user_table = (section_rows(text, title) for title in ("## RMSE and MAE per query window",
                                                                        "## RMSE and MAE per user"))
    rows = markdown_rows(text)
    labels = {**{name: tables.METHOD_NAMES[name] for name in baselines.BASELINES},
              "basic": "Basic", "finetune": "Fine-tune (tuned)", "maml": "MAML", "melo": "MELO"}
    for column, model in enumerate(("gru4rec", "narm")):
        for method, label in labels.items():
            report = loaded[(method, None if method in baselines.BASELINES else model)]
            span = slice(1 + 2 * column, 3 + 2 * column)
            edge = " †" if tables.at_edge(report) else ""  # still on its grid's edge after the extensions
            assert window_table[label][span] == [f"{report['rmse']:.4f}{edge}", f"{report['mae']:.4f}"]
            assert user_table[label][span] == [f"{report['per_user']['rmse']:.4f}{edge}",
                                               f"{report['per_user']['mae']:.4f}"]
            assert summary["rmse_mae"][model][method]["rmse"]["mean"] == report["rmse"]
            assert summary["per_user"][model][method]["mae"]["mean"] == report["per_user"]["mae"]
            per_rating = rows[(tables.display(model) if method not in baselines.BASELINES else "all", label)]
            header = [line for line in text.splitlines() if line.startswith("| Backbone")][0]
            columns = [c.strip() for c in header.strip("|").split("|")]
            for rating in report["per_rating"]:
                assert per_rating[columns.index(f"{rating} ★")] == f"{report['per_rating'][rating]['rmse']:.4f}"
            assert per_rating[-1] == f"{report['mean_per_rating_rmse']:.4f}"
        for method in ("maml", "melo"):  # the query-gradient t by the rating's share of each user's support set
            found = loaded[(method, model)]["query_gradient_by_share"]
            row = rows[(tables.display(model), f"{tables.METHOD_NAMES[method]} query-gradient t by share")]
            assert row[2:] == [f"{found[name]['t']:.4f}" if name in found and found[name]["t"] is not None else "–"
                               for name in SHARE_NAMES]
        # per support rating: MELO's weight and both meta-learners' query-gradient t, from their reports
        for method, key, label in (("melo", "weight", "MELO's weight"), ("maml", "query_gradient_t",
                                                                          "MAML query-gradient t")):
            report = loaded[(method, model)]
            found = (report["adaptive_weight_by_rating"] if key == "weight" else
                     {rating: row["t"] for rating, row in report["query_gradient_by_rating"].items()})
            cells = summary["by_support_rating"][model][method][key]
            shown = [rating for rating in cells if found.get(rating) is not None]
            assert shown and all(cells[rating]["mean"] == found[rating] for rating in shown)
            section = text.split("## Per support rating", 1)[1].split("\n## ", 1)[0]
            header = [line for line in section.splitlines() if line.startswith("| Backbone")][0]
            support_columns = [c.strip() for c in header.strip("|").split("|")]
            row = rows[(tables.display(model), label)]
            assert all(row[support_columns.index(f"{rating} ★")] == f"{found[rating]:.4f}" for rating in shown)
            assert {c[:-2] for c in support_columns[2:]} == {  # every support rating of any report, in its columns
                k for (m, _), r in loaded.items() if m in ("maml", "melo")
                for k in [*r.get("adaptive_weight_by_rating", {}), *r["query_gradient_by_rating"]]}
        for other, row in (("basic", "MELO vs Basic (error reduction)"),
                           ("maml", "MELO vs MAML (error reduction)")):
            melo, base = loaded[("melo", model)]["rmse"], loaded[(other, model)]["rmse"]
            assert window_table[row][1 + 2 * column] == f"{100 * (base - melo) / base:+.2f}%"
        # The paired intervals are metrics.paired_bootstrap of the two CSVs, seeded: recomputed here.
        melo = metrics.per_user_errors(pd.read_csv(metrics.predictions_path(str(reports[("melo", model)]))))
        paired = section_rows(text, "## Paired differences per user")
        for other in ("maml", "finetune", "basic"):
            base = metrics.per_user_errors(pd.read_csv(metrics.predictions_path(str(reports[(other, model)]))))
            expected = metrics.paired_bootstrap(melo["squared_error"], base["squared_error"], melo["windows"],
                                                melo["rating"], 200, 0)
            for offset, key in enumerate(("rmse", "mean_per_rating_rmse")):
                r = expected[key]
                assert paired[f"MELO − {tables.METHOD_NAMES[other]}"][1 + 2 * column + offset] == \
                    f"{r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
                assert r["low"] <= r["difference"] <= r["high"]
                assert r["difference"] == pytest.approx(
                    summary["paired"][model][f"melo_minus_{other}"][key]["mean"])
            for key in ("rmse", "mean_per_rating_rmse"):  # the point estimate: the per-window difference
                assert expected[key]["difference"] == pytest.approx(loaded[("melo", model)][key] -
                                                                    loaded[(other, model)][key])
    # Beyond the biases: each meta-learner − the no-network baseline better on validation, paired; and each
    # neural method's blend with the fold-in, w chosen on the validation users' CSVs, scored on the test's.
    scores = {name: loaded[(name, None)]["selection"]["cross_fitted_score"] for name in tables.NO_NETWORK}
    best = min(scores, key=scores.get)
    assert summary["beyond_biases"]["best_no_network"][0]["baseline"] == best
    beyond = section_rows(text, "## What the network adds")
    for column, model in enumerate(("gru4rec", "narm")):
        fold_in = [pd.read_csv(path(reports[("user-item-bias", None)])) for path in
                   (metrics.validation_predictions_path, metrics.predictions_path)]
        for method in ("basic", "finetune", "maml", "melo"):
            mine = [pd.read_csv(path(str(reports[(method, model)]))) for path in
                    (metrics.validation_predictions_path, metrics.predictions_path)]
            assert len(mine[0]) == 10 * 2  # --val_size users x --num_query_set windows

            def blended(which, w):
                joined = mine[which].merge(fold_in[which], on=["user", "window", "item", "rating"])
                return math.sqrt(((w * joined["prediction_y"] + (1 - w) * joined["prediction_x"] -
                                   joined["rating"]) ** 2).mean())

            w = min(tables.BLEND_WEIGHTS, key=lambda w: blended(0, w))
            found = summary["beyond_biases"]["blend"][model][method]
            assert found["w"]["mean"] == w and found["rmse"]["mean"] == pytest.approx(blended(1, w))
            assert blended(0, w) <= blended(0, 0.0) and blended(0, w) <= blended(0, 1.0)
            assert beyond[(tables.display(model), f"{labels[method]} + fold-in")][4:6] == [f"{w:.4f}",
                                                                                           f"{blended(1, w):.4f}"]
            for against, label in ((best, "best no-network"), ("user-item-bias", "User + item bias")):
                if method not in ("maml", "melo"):
                    continue
                other = metrics.per_user_errors(pd.read_csv(metrics.predictions_path(str(reports[(against, None)]))))
                own = metrics.per_user_errors(mine[1])
                r = metrics.paired_bootstrap(own["squared_error"], other["squared_error"], own["windows"],
                                             own["rating"], 200, 0)["rmse"]
                assert beyond[f"{tables.METHOD_NAMES[method]} − {label}"][1 + 2 * column] == \
                    f"{r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
    for name in baselines.BASELINES:
        assert len(pd.read_csv(metrics.validation_predictions_path(str(reports[(name, None)])))) == 10 * 2
    for section in text.split("\n## ")[1:]:
        assert "–" not in section.split("\n", 1)[1].replace("MELO − ", ""), section  # every cell filled
    assert (root / "comparison.json").exists() and (root / "settings.json").exists()

    # A second run reads the reports and runs nothing; the table is the same.
    monkeypatch.setattr(study, "run_script", no_runs)
    capsys.readouterr()
    again, _ = compare.main(command)
    assert again == text


def section_rows(text, title):
    """markdown_rows of the table under the heading that starts with `title`."""
    return markdown_rows(text.split(title, 1)[1].split("\n## ", 1)[0])


def fake_report(rmse, mae, per_rating):
    rows = {r: {"count": 2, "rmse": v, "mae": v / 2, "mean_prediction": 3.0} for r, v in per_rating.items()}
    return {"count": 2 * len(rows), "rmse": rmse, "mae": mae,
            "mean_per_rating_rmse": sum(per_rating.values()) / len(per_rating), "per_rating": rows}


def test_seeds_give_mean_and_standard_deviation(ratings_file, tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_script", no_runs)
    command = argv(ratings_file, tmp_path, "--models=sasrec", "--seeds=2", "--random_seed=7", "--finetune_steps_grid=")
    config = compare.parse(command)
    fingerprint = study.data_fingerprint(options.parse_args(compare.run_flags(config, config.seeds[0])))
    values = {("basic", 7): 1.0, ("basic", 8): 0.8, ("maml", 7): 0.9, ("maml", 8): 0.7, ("melo", 7): 0.8,
              ("melo", 8): 0.6}
    for name in baselines.BASELINES:
        values.update({(name, 7): 1.2, (name, 8): 1.0})
    for piece in compare.plan(config):
        value = values[(piece.method, piece.seed.random_seed)]
        per_rating = {"4": value, "5": value + 1} if piece.seed.random_seed == 7 else {"4": value}
        os.makedirs(os.path.dirname(piece.report), exist_ok=True)
        report = fake_report(value, value / 2, per_rating)
        if piece.method == "shrunk-user-mean" and piece.seed.random_seed == 7:  # on its grid's edge
            report["selection"] = {"at_edge": {"shrinkage": "largest"}}
        if piece.method in tables.NO_NETWORK:  # the fold-in is better on validation in seed 7, MF in seed 8,
            # by the cross-fitted scores; the grids' minima say the opposite and do not count
            better = (piece.method == "user-item-bias") == (piece.seed.random_seed == 7)
            report["selection"] = {"select_by": "rmse", "validation_scores": [0.9 if better else 0.8, 1.1],
                                   "cross_fitted_score": 0.95 if better else 0.97}
        # per-target predictions: 8 users, one window each, the error of the user grows with the value
        users = np.arange(8)
        metrics.publish(report, "fake", piece.report,
                        pd.DataFrame({"user": users, "window": 0, "item": 10, "rating": 4.0, "window_length": 3,
                                      "prediction": 4.0 + value * (1 + users % 3)}), fingerprint=fingerprint)
    text, summary = compare.main(command)
    rows = markdown_rows(text.split("## RMSE and MAE per user")[0])
    std = 0.2 / 2 ** 0.5  # sample standard deviation of two values 0.2 apart
    assert rows["Basic"][1:3] == [f"{0.9:.4f} ± {std:.4f}", f"{0.45:.4f} ± {std / 2:.4f}"]
    assert rows["MELO"][1] == f"{0.7:.4f} ± {std:.4f}"
    # the fold-in against each method, in percent of the method's RMSE: Basic 1.0 / 0.8 against 1.2 / 1.0
    figures = section_rows(text, "### The fold-in against each method")
    assert figures["Basic"][1] == "+22.50% ± 3.54%"
    assert summary["beyond_biases"]["fold_in_vs_percent"]["sasrec"]["maml"]["per_seed"] == pytest.approx(
        [100 * (1.2 - 0.9) / 0.9, 100 * (1.0 - 0.7) / 0.7])
    assert rows["Mean rating"][1] == rows["User + item bias"][1] == f"{1.1:.4f} ± {std:.4f}"
    assert rows["Shrunk user mean"][1:3] == [f"{1.1:.4f} ± {std:.4f} †", f"{0.55:.4f} ± {std / 2:.4f}"]
    assert ("† Shrunk user mean: still on the edge of its grid after 3 extensions (shrinkage (largest)) in 1 of "
            "2 seeds.") in text
    gains = [100 * (1.0 - 0.8) / 1.0, 100 * (0.8 - 0.6) / 0.8]
    mean_gain = sum(gains) / 2
    gain_std = abs(gains[0] - gains[1]) / 2 ** 0.5
    assert rows["MELO vs Basic (error reduction)"][1] == f"{mean_gain:+.2f}% ± {gain_std:.2f}%"
    assert summary["improvement_percent"]["sasrec"]["vs_basic"]["rmse"]["per_seed"] == pytest.approx(gains)
    assert markdown_rows(text)[("SASRec", "MELO")][2:] == [f"{0.7:.4f} ± {std:.4f}", f"{1.8:.4f} (n=1)",
                                            f"{(1.3 + 0.6) / 2:.4f} ± {abs(1.3 - 0.6) / 2 ** 0.5:.4f}"]
    assert "seeds 7, 8 (mean ± standard deviation over seeds)" in text
    # Paired: MELO's value is 0.1 below MAML's and 0.2 below Basic's in both seeds, so its error is lower in
    # both; the per-user RMSE difference is exactly value gap x sqrt(mean of (1 + u % 3)^2).
    paired = summary["paired"]["sasrec"]
    scale = math.sqrt(np.mean((1 + np.arange(8) % 3) ** 2.0))
    for other, gap in (("maml", 0.1), ("basic", 0.2)):
        rmse = paired[f"melo_minus_{other}"]["rmse"]
        assert rmse["per_seed"] == pytest.approx([-gap * scale] * 2) and rmse["melo_lower"] == 2
    gap = -0.1 * scale  # the same in both seeds: the interval over seeds has no width
    assert section_rows(text, "## Paired differences")["MELO − MAML"][1].startswith(
        f"{gap:+.4f} [{gap:+.4f}, {gap:+.4f}] over seeds; lower in 2/2, interval below 0 in ")
    assert paired["melo_minus_maml"]["rmse"]["seed_interval"] == pytest.approx([gap, gap])
    # beyond the biases: MELO (0.8, 0.6) − the baseline better on validation (1.2, 1.0), whichever it is
    beyond = summary["beyond_biases"]
    assert [row["baseline"] for row in beyond["best_no_network"]] == ["user-item-bias", "mf-fold-in"]
    assert [row["by"] for row in beyond["best_no_network"]] == [tables.CROSS_FITTED] * 2
    assert "7: User + item bias (0.9500, 0.9700); 8: MF fold-in (0.9700, 0.9500)" in text
    gap = -0.4 * scale
    assert beyond["paired"]["sasrec"]["melo_minus_best_no_network"]["rmse"]["per_seed"] == pytest.approx([gap] * 2)
    assert section_rows(text, "## What the network adds")["MELO − best no-network"][1].startswith(f"{gap:+.4f} [")
    # and against the user + item bias fold-in in every seed (1.2, 1.0 here, the better one in seed 7 only)
    assert beyond["paired"]["sasrec"]["melo_minus_user-item-bias"]["rmse"]["per_seed"] == pytest.approx([gap] * 2)
    assert section_rows(text, "## What the network adds")["MELO − User + item bias"][1].startswith(f"{gap:+.4f} [")
    # no validation predictions in these reports: the blend says so instead of inventing one
    assert ("| SASRec | MELO + fold-in | 0.7000 ± 0.1414 | 1.1000 ± 0.1414 | – | – | – |" in text and
            "reports predate the validation predictions" in text)


def test_start_chooses_the_meta_learners_first_weights(ratings_file, tmp_path):
    def meta_training_args(*extra):
        config = compare.parse(argv(ratings_file, tmp_path, "--models=gru4rec", *extra))
        pieces = {piece.method: piece for piece in compare.plan(config)}
        (_, _, basic_argv), _ = pieces["basic"].steps
        (_, _, maml_argv), _ = pieces["maml"].steps
        return options.parse_args(basic_argv), options.parse_args(maml_argv)

    basic, maml = meta_training_args("--start=embedding")
    assert basic.save_pretrained and maml.load_pretrained_embedding and not maml.load_pretrained
    assert (maml.inner_lr, maml.query_loss) == (1e-3, "all")  # main.py's defaults
    basic, maml = meta_training_args("--start=random")
    assert not (basic.save_pretrained or maml.load_pretrained or maml.load_pretrained_embedding)
    assert (maml.inner_lr, maml.query_loss) == (1e-3, "all")
    basic, maml = meta_training_args("--start=basic")
    assert basic.save_pretrained and maml.load_pretrained and (maml.inner_lr, maml.query_loss) == (0.1, "target")
    # the default: random weights with the recipe's inner lr and outer loss; passed-through flags win
    basic, maml = meta_training_args("--inner_lr=0.05")
    assert not (basic.save_pretrained or maml.load_pretrained or maml.load_pretrained_embedding)
    assert (maml.inner_lr, maml.query_loss, maml.user_bias_start) == (0.05, "target", "fold-in")


def test_every_network_starts_from_the_fold_in_blend_where_there_is_one(ratings_file, tmp_path, capsys):
    def bias_starts(*extra):
        config = compare.parse(argv(ratings_file, tmp_path, "--models=gru4rec", *extra))
        return {piece.method: options.parse_args(piece.steps[0][2]).bias_start for piece in compare.plan(config)
                if piece.method in ("basic", "maml", "melo")}

    # the bias head with --user_factors (compare.py's default 32): the blend, Basic's and the meta-learners'
    assert bias_starts() == {"basic": "blend", "maml": "blend", "melo": "blend"}
    # nothing to blend: the better fold-in (the user + item bias fold-in without factors)
    assert set(bias_starts("--user_factors=0").values()) == {"fold-in"}
    assert set(bias_starts("--rating_head=plain").values()) == {"fold-in"}
    assert set(bias_starts("--bias_start=fold-in").values()) == {"fold-in"}  # asked for: kept
    with pytest.raises(SystemExit):
        compare.parse(argv(ratings_file, tmp_path, "--bias_start=blend", "--user_factors=0"))
    assert "--bias_start=blend starts the bias head's factor term" in capsys.readouterr().err
    # a folder made at the MF fold-in's start is not mixed with the blend's
    made_at_fold_in = compare.parse(argv(ratings_file, tmp_path, "--bias_start=fold-in"))
    compare.record_settings(made_at_fold_in, compare.check_settings(made_at_fold_in))
    with pytest.raises(errors.MeloError, match=r"other settings: .*bias_start='fold-in' \(now 'blend'\)"):
        compare.check_settings(compare.parse(argv(ratings_file, tmp_path)))


def test_a_folder_from_before_start_keeps_its_recipe(ratings_file, tmp_path):
    """settings.json written before --start recorded `pretrained`: it reads as start=random (or embedding)
    and is refused under another start rather than mixed with it."""
    config = compare.parse(argv(ratings_file, tmp_path, "--start=random"))
    settings = compare.check_settings(config)
    settings.pop("start")
    compare.record_settings(config, {**settings, "pretrained": False})
    compare.check_settings(config)  # the same recipe: accepted
    with pytest.raises(errors.MeloError, match=r"other settings: .*start='random' \(now 'fold-in'\)"):
        compare.check_settings(compare.parse(argv(ratings_file, tmp_path)))


def test_a_folder_from_before_the_user_bias_start_is_not_reused_under_the_fold_in_start(ratings_file, tmp_path):
    """settings.json written before --user_bias_start: a bias-head folder had the learned start, so it is
    refused under the fold-in start (not mixed with it), and accepted under the learned one."""
    config = compare.parse(argv(ratings_file, tmp_path, "--start=basic", "--user_bias_start=learned"))
    settings = compare.check_settings(config)
    settings.pop("user_bias_start")
    compare.record_settings(config, settings)
    compare.check_settings(config)
    with pytest.raises(errors.MeloError, match=r"other settings: .*user_bias_start='learned' \(now 'fold-in'\)"):
        compare.check_settings(compare.parse(argv(ratings_file, tmp_path, "--start=basic")))


def test_the_edge_note_says_whether_a_minimum_or_a_one_standard_error_choice_sits_there():
    def report(rule, edges):
        return {"selection": {"grid_choice": rule, "at_edge": edges}}

    one_se, minimum, inside = report("one-se", {"reg": "largest"}), report("minimum", {"rank": "largest"}), \
        report("minimum", {})
    simpler = "a one-standard-error choice on its grid's simpler edge (not extended)"
    assert tables.edge_reason([one_se, inside]) == simpler
    assert tables.edge_reason([minimum, report("one-se", {})]) == "still on the edge of its grid after 3 extensions"
    assert tables.edge_reason([one_se, minimum]) == "still on the edge of its grid after 3 extensions, or " + simpler


def test_a_folder_from_before_the_grid_choice_is_reused_only_under_the_grid_minimum(ratings_file, tmp_path):
    """settings.json written before --grid_choice: its MF fold-in (report and start) was its grid's
    minimum, so it is refused under today's default (auto, which may take the one-standard-error choice)
    and accepted under the minimum."""
    config = compare.parse(argv(ratings_file, tmp_path, "--grid_choice=minimum"))
    settings = compare.check_settings(config)
    settings.pop("grid_choice")
    compare.record_settings(config, settings)
    compare.check_settings(config)
    with pytest.raises(errors.MeloError, match=r"other settings: grid_choice='minimum' \(now 'auto'\)"):
        compare.check_settings(compare.parse(argv(ratings_file, tmp_path)))


def test_seeds_can_vary_the_initial_weights_only(ratings_file, tmp_path):
    config = compare.parse(argv(ratings_file, tmp_path, "--models=gru4rec", "--seeds=2", "--vary=model_init_seed",
                                "--model_init_seed=5", "--dry_run"))
    folders = {seed.folder for seed in config.seeds}
    assert folders == {"seed222_init5", "seed222_init6"}
    for seed in config.seeds:
        flags = compare.run_flags(config, seed)
        assert "--random_seed=222" in flags and f"--model_init_seed={seed.model_init_seed}" in flags
    both = compare.parse(argv(ratings_file, tmp_path, "--seeds=2", "--vary=both"))
    assert [(s.random_seed, s.model_init_seed) for s in both.seeds] == [(222, 0), (223, 1)]
    plain = compare.parse(argv(ratings_file, tmp_path, "--seeds=2"))
    assert [s.folder for s in plain.seeds] == ["seed222", "seed223"]


def test_refusals_are_one_line_errors(ratings_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "run_script", no_runs)
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
    with pytest.raises(errors.MeloError, match=r"other settings: max_seq_len=10 \(now 12\)"):
        compare.check_settings(compare.parse(argv(ratings_file, tmp_path, "--max_seq_len=12")))
    # and other lengths: the meta-learners' reports may start from a Basic export of other epochs, and a
    # checkpoint of a longer run bears a shorter run's name
    for flag, message in (("--num_train_iterations=3", r"num_train_iterations=\d+ \(now 3\)"),
                          ("--pretrain_epochs=3", r"pretrain_epochs=\d+ \(now 3\)")):
        with pytest.raises(errors.MeloError, match="other settings: " + message):
            compare.check_settings(compare.parse(argv(ratings_file, tmp_path, flag)))


def test_a_failed_run_stops_with_its_last_line(ratings_file, tmp_path, monkeypatch):
    def failing(script, script_argv, log_path, verbose):
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "w") as log:
            log.write("progress\nerror: something specific\n")
        return 2

    monkeypatch.setattr(study, "run_script", failing)
    with pytest.raises(errors.MeloError, match=r"seed 222 mean rating \(test: python main.py\) failed with "
                                                r"exit status 2: error: something specific \(full log: "):
        compare.main(argv(ratings_file, tmp_path, "--models=gru4rec"))


def test_dry_run_prints_the_commands(ratings_file, tmp_path, capsys):
    compare.main(argv(ratings_file, tmp_path, "--models=narm", "--dry_run"))
    printed = capsys.readouterr().out
    steps = len(baselines.BASELINES) + 7  # each baseline tested; Basic, MAML, MELO trained and tested; Fine-tune
    assert re.search(rf"\[1/{steps}\] seed 222 mean rating: test\n    python main.py .*--test_baseline", printed)
    assert "python train_original.py" in printed and "--use_adaptive_loss=True" in printed
    assert not (tmp_path / "results" / "ml-100k" / "seed222").exists()


def test_the_runs_are_real_processes(ratings_file, tmp_path):
    config = compare.parse(argv(ratings_file, tmp_path, "--models=gru4rec"))
    mean = compare.plan(config)[0]
    assert mean.method == "mean-rating"
    (label, script, script_argv), = mean.steps
    log = tmp_path / "mean.log"
    assert study.run_script(script, script_argv, str(log), verbose=False) == 0
    assert os.path.exists(mean.report) and "test mean-rating baseline" in log.read_text()


def test_an_interrupted_training_resumes_from_its_last_checkpoint(tmp_path):
    folder = tmp_path / "ckpt"
    assert study.training_step("main.py", ["--x"], str(folder), "gru4rec_ml-100k_melo", 4) == \
        ("train", "main.py", ["--x"])  # nothing saved: a fresh run
    folder.mkdir()
    for step in (1, 2, 6):
        (folder / f"gru4rec_ml-100k_melo_step{step}.pt").write_bytes(b"")
    (folder / "gru4rec_ml-100k_maml_step3.pt").write_bytes(b"")  # another run's file
    assert study.training_step("main.py", ["--x"], str(folder), "gru4rec_ml-100k_melo", 4) == \
        ("train", "main.py", ["--x", "--checkpoint_step=2"])


def test_a_checkpoint_of_another_length_or_stopped_before_its_validation_is_not_taken_as_final(tmp_path):
    """The final checkpoint's name says only its step: one of a longer run (its learning rates annealed over
    more iterations) is refused, not tested as this run's, nor resumed; one saved before its validation
    finished is resumed to validate it (its best weights would miss that step)."""
    prefix, flags = "gru4rec_ml-100k_melo", ["--x"]

    def save(step, total, pending=False):
        torch.save({"data_fingerprint": "abc", "pending_validation": pending,
                    "training_options": {"num_train_iterations": total}}, tmp_path / f"{prefix}_step{step}.pt")

    save(4, 4)
    assert study.training_need("main.py", flags, str(tmp_path), prefix, 4, "abc") is None
    save(4, 4, pending=True)
    assert study.training_need("main.py", flags, str(tmp_path), prefix, 4, "abc") == \
        ("train", "main.py", ["--x", "--checkpoint_step=4"])
    save(4, 8)
    with pytest.raises(errors.MeloError, match=r"step4.pt is from a run of 8 iterations, not 4 \(its learning "
                                                r"rates were annealed over 8\): use another --results_dir"):
        study.training_need("main.py", flags, str(tmp_path), prefix, 4, "abc")
    with pytest.raises(errors.MeloError, match=r"step4.pt is from a run of 8 iterations, not 6"):
        study.training_need("main.py", flags, str(tmp_path), prefix, 6, "abc")  # would resume from it
    save(4, 6)
    assert study.training_need("main.py", flags, str(tmp_path), prefix, 6, "abc") == \
        ("train", "main.py", ["--x", "--checkpoint_step=4"])
    # other data: trained anew over it, whatever its length
    assert study.training_need("main.py", flags, str(tmp_path), prefix, 4, "other") == \
        ("train", "main.py", ["--x", "--overwrite=True"])


def test_paired_bootstrap_covers_a_known_gap_and_is_reproducible():
    """Errors of A and B drawn with standard deviations 1.0 and 1.2 on every rating: the true difference of
    both the RMSE and the mean per-rating RMSE is -0.2. Over many data sets the 95% interval covers it
    about 95% of the time (and excludes 0); one data set's interval is a pure function of its seed."""

    def sample(seed, users=300, windows=3):
        rng = np.random.default_rng(seed)
        ratings = rng.choice([1.0, 2.0, 3.0, 4.0, 5.0], users, p=[0.1, 0.1, 0.2, 0.35, 0.25])
        a = (rng.normal(0, 1.0, (users, windows)) ** 2).sum(1)
        b = (rng.normal(0, 1.2, (users, windows)) ** 2).sum(1)
        return a, b, np.full(users, windows), ratings

    covered = {"rmse": 0, "mean_per_rating_rmse": 0}
    repetitions = 60
    for seed in range(repetitions):
        result = metrics.paired_bootstrap(*sample(seed), resamples=400, seed=seed)
        for key in covered:
            covered[key] += result[key]["low"] <= -0.2 <= result[key]["high"]
            assert result[key]["high"] < 0, (seed, key)  # a gap of 0.2 is far outside the noise here
    for key, count in covered.items():
        assert 0.85 * repetitions <= count, (key, count)
    data = sample(123)
    first = metrics.paired_bootstrap(*data, resamples=300, seed=7)
    assert metrics.paired_bootstrap(*data, resamples=300, seed=7) == first
    assert metrics.paired_bootstrap(*data, resamples=300, seed=8)["rmse"]["low"] != first["rmse"]["low"]
    # the point estimate is the plain difference of the two per-window RMSEs
    a, b, windows, _ = data
    assert first["rmse"]["difference"] == pytest.approx(math.sqrt(a.sum() / windows.sum()) -
                                                        math.sqrt(b.sum() / windows.sum()))


def test_the_interval_over_seeds_is_students_t():
    """Five values 1..5: mean 3, standard deviation sqrt(2.5), t(4) = 2.776. Over many sets of five normal
    draws the interval covers the true mean about 95% of the time (the normal quantile 1.96 instead of t's
    would cover about 88%)."""
    mean, low, high = metrics.seed_interval([1, 2, 3, 4, 5])
    half = 2.776 * math.sqrt(2.5) / math.sqrt(5)
    assert (mean, low, high) == pytest.approx((3, 3 - half, 3 + half))
    assert metrics.seed_interval([0.5]) is None
    assert metrics.t_quantile_975(60) == pytest.approx(2.000, abs=0.002)  # the expansion beyond the table
    rng = np.random.default_rng(0)
    covered = [low <= 0.3 <= high for _, low, high in
               (metrics.seed_interval(rng.normal(0.3, 2.0, 5)) for _ in range(4000))]
    assert 0.935 < np.mean(covered) < 0.965


def test_the_pooled_interval_draws_users_within_each_seed_and_narrows_with_more_users():
    """tables.pooled_difference: the point is the difference of the metrics over every seed's users pooled,
    its bootstrap draws each seed's users from that seed alone (so each resample holds as many of each), and
    twice the users (a second seed) narrows the interval."""
    import numpy as np
    import pandas as pd

    from studies import tables

    def frames(seed, users=300, shift=0.0):
        rng = np.random.default_rng(seed)
        rating = rng.integers(1, 6, users).astype(float)
        other = rating + rng.normal(0, 1.0, users)
        melo = other - shift + rng.normal(0, 0.3, users)
        make = lambda prediction: pd.DataFrame({"user": np.arange(users), "window": 0, "item": 1,  # noqa: E731
                                                "rating": rating, "prediction": prediction})
        return make(melo), make(other)

    one = tables.pooled_difference([frames(1)], 500, 0)["rmse"]
    two = tables.pooled_difference([frames(1), frames(2)], 500, 0)["rmse"]
    assert two["users"] == 600 and one["users"] == 300
    assert two["half_width"] < one["half_width"]
    pooled_melo = pd.concat([frames(1)[0], frames(2)[0]])
    pooled_other = pd.concat([frames(1)[1], frames(2)[1]])
    rmse = lambda frame: float(np.sqrt(((frame["prediction"] - frame["rating"]) ** 2).mean()))  # noqa: E731
    assert two["difference"] == pytest.approx(rmse(pooled_melo) - rmse(pooled_other))
    assert two["low"] <= two["difference"] <= two["high"]
    # users drawn within their seed: every resample keeps 300 of each
    squared = np.concatenate([np.zeros(300), np.ones(300)])
    found = tables.metrics.paired_bootstrap(squared, np.zeros(600), np.ones(600), np.full(600, 3.0), 200, 0,
                                            strata=np.repeat([0, 1], 300))
    assert found["rmse"]["low"] == found["rmse"]["high"] == pytest.approx(np.sqrt(0.5))


def test_reports_from_before_the_cross_fitted_score_compare_the_grids_minima():
    def report(grid, crossed=None):
        selection = {"validation_scores": grid, **({} if crossed is None else {"cross_fitted_score": crossed})}
        return [{"selection": selection}]
    reports = {(None, "user-item-bias"): report([0.95, 0.93], 0.94), (None, "mf-fold-in"): report([0.96, 0.91], 0.97)}
    assert tables.best_no_network(reports, 0) == ("user-item-bias", {"user-item-bias": 0.94, "mf-fold-in": 0.97},
                                                  tables.CROSS_FITTED)
    reports[(None, "user-item-bias")] = report([0.95, 0.93])  # one without it: the minima, for both alike
    assert tables.best_no_network(reports, 0) == ("mf-fold-in", {"user-item-bias": 0.93, "mf-fold-in": 0.91},
                                                  tables.GRID_MINIMUM)
