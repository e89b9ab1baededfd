"""Every flag is checked when parsed: sizes, seeds, rates and floats are bounded (the bounds in --help), a
bad value or an unknown flag is one `error:` line in the form of every other error, exit status 2."""
import os
import subprocess
import sys

import pytest
import torch

import ablation
from common import flag_types
import compare
import options
import train_original

from helpers import SCRIPTS, one_line_error, one_line_of, small
from test_main import REPO


# ============================================================================ flags
def bounded_flags(kind):
    return [action for action in options.build_parser()._actions if action.type is kind]


def test_every_size_flag_is_bounded_and_says_so_in_help(capsys):
    """--gru4rec_n_layers=100000 built layers for minutes without a word; a hidden size or window of 10**6
    ended in the allocator's traceback."""
    widths, depths = bounded_flags(flag_types.width), bounded_flags(flag_types.depth)
    assert {"--num_query_set", "--lstm_hidden", "--lstm_input_size", "--bert_hidden_units", "--gru4rec_hidden_size",
            "--gru4rec_embedding_dim", "--narm_hidden_size", "--narm_embedding_dim"} <= {a.option_strings[0]
                                                                                        for a in widths}
    assert {"--gru4rec_n_layers", "--narm_n_layers", "--bert_num_blocks", "--bert_num_heads", "--lstm_num_layers",
            "--loss_num_layers", "--num_inner_steps"} <= {a.option_strings[0] for a in depths}
    cases = [(a.option_strings[0], flag_types.WIDTH_MAX) for a in widths]
    cases += [(a.option_strings[0], flag_types.DEPTH_MAX) for a in depths] + [("--max_seq_len", flag_types.WIDTH_MAX)]
    for flag, maximum in cases:
        with pytest.raises(SystemExit) as exit_info:
            options.parse_args([f"{flag}={maximum + 1}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1, err
        assert err[0].startswith(f"error: argument {flag}: must be from ")
        assert f" to {maximum}, got {maximum + 1}" in err[0]
        options.parse_args([f"{flag}={maximum}"] + (["--bert_hidden_units=4096"] * (flag == "--bert_num_heads")))
    assert all(action.help.endswith(f"(1 to {flag_types.DEPTH_MAX})") for action in depths)
    assert "(3 to 4096)" in " ".join(options.build_parser().format_help().split())


def test_gru4rec_with_100000_layers_is_one_line_at_once():
    done = subprocess.run([sys.executable, "main.py", "--gru4rec_n_layers=100000", "--model=gru4rec"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert "--gru4rec_n_layers: must be from 1 to 64, got 100000" in one_line_of(done)


@pytest.mark.parametrize("flag", ["--random_seed", "--model_init_seed"])
def test_seeds_beyond_64_bits_are_one_line_and_the_largest_seeds_work(flag, capsys):
    """torch.manual_seed raised 'ValueError: Overflow' for --random_seed=10**23."""
    with pytest.raises(SystemExit):
        options.parse_args([f"{flag}={10 ** 23}"])
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: argument {flag}: must be a seed from 0 to {2 ** 63 - 1}"), err
    from models import model_factory
    from common.runtime import seed_everything

    args = options.parse_args([f"{flag}={flag_types.SEED_MAX}", "--model=gru4rec"])
    seed_everything(args.random_seed)
    model_factory(args, 10)
    model_factory(options.parse_args([f"--model_init_seed={flag_types.SEED_MAX}"]), 10)  # + 1 for the loss network


@pytest.mark.parametrize("flag, message", [
    ("--default_rating", "must be from -5 to 5, got 3e38"),
    ("--outer_weight_decay", "must be from 0 to 10000, got 3e38"),
    ("--loss_weight_decay", "must be from 0 to 10000, got 3e38")])
def test_a_float_that_overflowed_in_training_is_refused_by_name(flag, message, capsys):
    """Both passed the float32 check and stopped training with 'try a lower --outer_lr'."""
    with pytest.raises(SystemExit):
        options.parse_args([f"{flag}=3e38"])
    assert capsys.readouterr().err.strip().startswith(f"error: argument {flag}: {message}")


def test_train_original_with_no_epochs_is_one_line(ratings_file, tmp_path, capsys):
    """--pretrain_epochs=0 exited 0 and said nothing."""
    line = one_line_error(small(ratings_file, tmp_path, "--pretrain_epochs=0"), capsys, train_original.main)
    assert "argument --pretrain_epochs: must be >= 1, got 0" in line
    assert not os.path.exists(tmp_path / "pre")


@pytest.mark.parametrize("script", SCRIPTS)
def test_flag_errors_take_the_form_of_every_other_error(script):
    """argparse wrote `main.py: error: ...`, everything else `error: ...`."""
    done = subprocess.run([sys.executable, script, "--no_such_flag=1"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert one_line_of(done) == "error: unrecognized arguments: --no_such_flag=1 (--help lists the options)"


# ============================================================================ learning rates
def test_every_learning_rate_flag_is_bounded_to_what_adam_can_use(capsys):
    parser = options.build_parser()
    rate_actions = [action for action in parser._actions
                    if action.type is flag_types.learning_rate or action.dest == "finetune_lr_grid"]
    rate_flags = [action.option_strings[0] for action in rate_actions]
    assert len(rate_flags) == 13 and {"--user_bias_lr", "--outer_lr", "--bias_outer_lr", "--finetune_lr_grid"} <= set(rate_flags)
    for flag in rate_flags:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            options.parse_args([f"{flag}=2e38"])   # passed the float32 check, then overflowed Adam
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{flag}: must be a learning rate from 0 to 10000, got 2e38" in err[0], err
    assert all(action.help.endswith("(0 to 10000)") for action in rate_actions)  # what --help shows
    # the bound itself trains: Adam's first steps at LR_MAX stay finite in float32
    weight = torch.nn.Parameter(torch.ones(4))
    adam = torch.optim.Adam([weight], lr=flag_types.LR_MAX)
    for _ in range(3):
        adam.zero_grad()
        (weight ** 2).sum().backward()
        adam.step()
    assert torch.isfinite(weight).all()


# ============================================================================ study commands
@pytest.mark.parametrize("script", ["compare", "ablation"])
def test_a_file_as_results_dir_is_one_line(ratings_file, tmp_path, script, capsys):
    """compare.py --results_dir=<a file>: NotADirectoryError, as main.py gives for its folders."""
    (tmp_path / "a_file").write_text("kept")
    argv = [f"--results_dir={tmp_path / 'a_file'}", "--mode=ml-100k", f"--data_path={ratings_file}",
            f"--data_dir={tmp_path}/Data", "--min_item=1", "--num_test_data=20", "--models=gru4rec"]
    if script == "ablation":
        argv = argv[:-1] + ["--model=gru4rec"]
    line = one_line_error(argv, capsys, {"compare": compare.main, "ablation": ablation.main}[script], list)
    assert line.startswith(f"error: cannot make the folder {tmp_path / 'a_file' / 'ml-100k'}"), line
    assert "Not a directory" in line
    assert line.endswith("pass another --results_dir") and (tmp_path / "a_file").read_text() == "kept"


def test_an_unclosed_quote_in_a_defined_variant_is_one_line(capsys):
    """shlex's 'ValueError: No closing quotation'."""
    line = one_line_error(["--mode=ml-100k", "--define=foo=--inner_lr='0.1", "--variants=foo"], capsys,
                          ablation.main, list)
    assert line == ("error: --define \"foo=--inner_lr='0.1\": its flags cannot be split as a shell would (No "
                    "closing quotation): check the quotes")
