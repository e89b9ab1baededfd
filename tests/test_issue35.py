"""One line for the last tracebacks (issue 35): every bad input, lost process and stop signal below ends in
one `error: ...` line with exit status 2 (a warning for a diverging run), and nothing saved is changed."""
import os
import subprocess
import sys

import pytest

import options
import train_original

import synthetic as sy
from test_main import REPO

SCRIPTS = ("main.py", "train_original.py", "compare.py", "ablation.py")


@pytest.fixture(scope="module")
def ratings_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "u.data"
    sy.write_movielens(str(path), fmt="ml-100k", num_users=120, num_items=80, seed=3)
    return str(path)


def small(ratings_file, tmp_path, *extra):
    """A small GRU4Rec run of main.py or train_original.py (issue 35's "B") into tmp_path."""
    return ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--batch_size=4", "--num_samples=5", "--num_query_set=2",
            "--max_seq_len=10", "--model=gru4rec", "--gru4rec_hidden_size=16", "--log_interval=2",
            "--num_train_iterations=4", "--inner_lr=0.05", "--num_threads=1", "--pretrain_epochs=1",
            f"--checkpoint_dir={tmp_path}/ckpt", f"--log_dir={tmp_path}/runs", f"--pretrain_log_dir={tmp_path}/pre",
            *extra]


def one_line_error(argv, capsys, main_function):
    """Run `main_function` through run_cli with `argv`; return its single stderr line (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        options.run_cli(main_function, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def one_line_of(done):
    """The single stderr line of a finished script (exit status 2)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# ============================================================================ flags (items 4, 5, 9, 10, 13)
def bounded_flags(kind):
    return [action for action in options.build_parser()._actions if action.type is kind]


def test_every_size_flag_is_bounded_and_says_so_in_help(capsys):
    """--gru4rec_n_layers=100000 built layers for minutes without a word; a hidden size or window of 10**6
    ended in the allocator's traceback (items 3, 4)."""
    widths, depths = bounded_flags(options.width), bounded_flags(options.depth)
    assert {"--num_query_set", "--lstm_hidden", "--lstm_input_size", "--bert_hidden_units", "--gru4rec_hidden_size",
            "--gru4rec_embedding_dim", "--narm_hidden_size", "--narm_embedding_dim"} <= {a.option_strings[0]
                                                                                        for a in widths}
    assert {"--gru4rec_n_layers", "--narm_n_layers", "--bert_num_blocks", "--bert_num_heads", "--lstm_num_layers",
            "--loss_num_layers", "--num_inner_steps"} <= {a.option_strings[0] for a in depths}
    cases = [(a.option_strings[0], options.WIDTH_MAX) for a in widths]
    cases += [(a.option_strings[0], options.DEPTH_MAX) for a in depths] + [("--max_seq_len", options.WIDTH_MAX)]
    for flag, maximum in cases:
        with pytest.raises(SystemExit) as exit_info:
            options.parse_args([f"{flag}={maximum + 1}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: argument {flag}: must be from ") and f" to {maximum}, got {maximum + 1}" in err[0]
        options.parse_args([f"{flag}={maximum}"] + (["--bert_hidden_units=4096"] if flag == "--bert_num_heads" else []))
    assert all(action.help.endswith(f"(1 to {options.DEPTH_MAX})") for action in depths)
    assert "(3 to 4096)" in " ".join(options.build_parser().format_help().split())


def test_gru4rec_with_100000_layers_is_one_line_at_once():
    done = subprocess.run([sys.executable, "main.py", "--gru4rec_n_layers=100000", "--model=gru4rec"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert "--gru4rec_n_layers: must be from 1 to 64, got 100000" in one_line_of(done)


@pytest.mark.parametrize("flag", ["--random_seed", "--model_init_seed"])
def test_seeds_beyond_64_bits_are_one_line_and_the_largest_seeds_work(flag, capsys):
    """torch.manual_seed raised 'ValueError: Overflow' for --random_seed=10**23 (item 5)."""
    with pytest.raises(SystemExit):
        options.parse_args([f"{flag}={10 ** 23}"])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument {flag}: must be a seed from 0 to {2 ** 63 - 1}"), err
    from models import model_factory
    from runtime import seed_everything

    args = options.parse_args([f"{flag}={options.SEED_MAX}", "--model=gru4rec"])
    seed_everything(args.random_seed)
    model_factory(args, 10)
    model_factory(options.parse_args([f"--model_init_seed={options.SEED_MAX}"]), 10)  # + 1 for the loss network


@pytest.mark.parametrize("flag, message", [
    ("--default_rating", "must be from -5 to 5, got 3e38"),
    ("--outer_weight_decay", "must be from 0 to 10000, got 3e38"),
    ("--loss_weight_decay", "must be from 0 to 10000, got 3e38")])
def test_a_float_that_overflowed_in_training_is_refused_by_name(flag, message, capsys):
    """Both passed the float32 check and stopped training with 'try a lower --outer_lr' (item 9)."""
    with pytest.raises(SystemExit):
        options.parse_args([f"{flag}=3e38"])
    assert capsys.readouterr().err.strip().startswith(f"error: argument {flag}: {message}")


def test_train_original_with_no_epochs_is_one_line(ratings_file, tmp_path, capsys):
    """--pretrain_epochs=0 exited 0 and said nothing (item 10)."""
    line = one_line_error(small(ratings_file, tmp_path, "--pretrain_epochs=0"), capsys, train_original.main)
    assert "argument --pretrain_epochs: must be >= 1, got 0" in line
    assert not os.path.exists(tmp_path / "pre")


@pytest.mark.parametrize("script", SCRIPTS)
def test_flag_errors_take_the_form_of_every_other_error(script):
    """argparse wrote `main.py: error: ...`, everything else `error: ...` (item 13)."""
    done = subprocess.run([sys.executable, script, "--no_such_flag=1"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert one_line_of(done) == "error: unrecognized arguments: --no_such_flag=1 (--help lists the options)"
