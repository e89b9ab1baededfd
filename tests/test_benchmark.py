"""benchmark.py: the generated catalog, one tiny case end to end (both paths), the table."""
import numpy as np
import torch

import benchmark

TINY = ["--max_seq_len=8", "--num_samples=3", "--num_query_set=2", "--batch_size=3", "--bert_hidden_units=8",
        "--bert_num_heads=2", "--gru4rec_hidden_size=8", "--gru4rec_embedding_dim=8", "--narm_hidden_size=8",
        "--narm_embedding_dim=8", "--lstm_hidden=8", "--lstm_input_size=4"]


def test_synthetic_data_uses_exactly_the_whole_catalog():
    data = benchmark.synthetic_data(num_items=700, num_users=120)
    assert data.num_items == 700
    assert np.array_equal(np.unique(data.items), np.arange(1, 701))
    lengths = data.sequence_lengths()
    assert lengths.min() >= 40 and lengths.max() <= 200 and len(lengths) == 120
    assert set(np.unique(data.ratings)) <= {1.0, 2.0, 3.0, 4.0, 5.0}


def test_one_case_of_each_path_runs_and_the_table_lists_both():
    results = []
    for path in ("fast", "reference"):
        result = benchmark.run_case("sasrec", "melo", 300, path, 2, torch.device("cpu"), TINY, num_users=150)
        assert result["finite"] and len(result["times"]) == 2 and result["median_s"] > 0
        assert result["build_s"] > 0 and result["tasks"] == 3
        result.update(device="cpu", support=3, query=2, length=8, inner_steps=3)
        results.append(result)
    table = benchmark.format_table(results, ["0.1 0.1 0.1", "0.2 0.2 0.2"])
    row = next(line for line in table.splitlines() if line.startswith("| sasrec | melo | 300 | 3 |"))
    assert row.count("|") == 12 and not row.rstrip(" |").endswith("-")


def test_ratio_case_alternates_catalogs_and_reports_one_median_each():
    result = benchmark.run_ratio("gru4rec", "maml", [200, 3000], 2, torch.device("cpu"), TINY, num_users=150)
    assert result["catalogs"] == [200, 3000] and [len(t) for t in result["times"]] == [2, 2]
    fast = benchmark.run_case("gru4rec", "maml", 200, "fast", 1, torch.device("cpu"), TINY, num_users=150)
    fast.update(device="cpu", support=3, query=2, length=8, inner_steps=3)
    table = benchmark.format_table([fast, result], ["0 0 0", "0 0 0"])
    assert "gru4rec maml: 3,000 items cost" in table


def test_bad_arguments_are_refused_before_any_case_runs(capsys):
    import pytest

    for argv, message in [(["--methods=MELO"], "--methods: unknown 'MELO'"),
                          (["--models=bert"], "--models: unknown 'bert'"),
                          (["--items=1000,abc"], "--items=1000,abc"),
                          (["--repeats=0"], "--repeats"),
                          (["--use_adaptive_loss=False"], "choose them with --methods"),
                          (["--device=gpu"], "--device=gpu"),
                          (["--batch_sizes=16,64", "--batch_size=8"], "--batch_size and --batch_sizes"),
                          (["--batch_sizes=16,0"], "--batch_sizes")]:
        with pytest.raises(SystemExit) as exit_info:
            benchmark.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert benchmark.parse(["--methods=maml", "--models=narm,gru4rec", "--items=5"]).device == torch.device("cpu")


def test_a_case_starts_the_bias_head_as_main_py_does():
    """The timed learner is main.py's: μ, the fold-in's item biases and λ_user set, so that the timing
    includes each task's b_user start (one forward of its support set)."""
    case = benchmark.Case("gru4rec", "maml", 200, "fast", torch.device("cpu"), TINY, num_users=150)
    backbone = case.learner.backbone
    assert case.args.rating_head == "bias" and case.args.user_bias_start == "fold-in"
    assert backbone.rating_head.user_bias_reg is not None
    assert 0.5 < float(backbone.global_mean) < 1.0  # μ of ratings 1..5 around 3.6, over 5
    assert backbone.item_bias.weight.abs().max() > 0


def test_the_meta_batch_sweep_times_each_size_in_its_own_process(capsys):
    """--batch_sizes=2,4: every case at each meta-batch size, one row each with its tasks per second."""
    tiny = [flag for flag in TINY if not flag.startswith("--batch_size")]
    results = benchmark.main(["--models=gru4rec", "--methods=maml", "--items=200", "--reference=False", "--repeats=1",
                              "--num_users=150", "--num_threads=1", "--batch_sizes=2,4", *tiny])
    assert [r["tasks"] for r in results] == [2, 4]
    table = capsys.readouterr().out
    assert "; 2/4 tasks x 3 support windows" in table
    for tasks in (2, 4):
        assert any(line.startswith(f"| gru4rec | maml | 200 | {tasks} |") for line in table.splitlines())
