"""One line for the last tracebacks (issue 35): every bad input, lost process and full disk below ends in one
`error: ...` line with exit status 2, a SIGTERM while starting in one line with 143, a diverging run in a
warning; nothing saved is changed."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import ablation
import compare
import dataloader as dl
import main
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


def one_line_error(argv, capsys, main_function, parse=options.parse_args):
    """Run `main_function` through run_cli with `argv` (`parse`d: the study scripts parse their own); return
    its single stderr line (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        options.run_cli(main_function, argv, parse)
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
        assert err[0].startswith(f"error: argument {flag}: must be from ")
        assert f" to {maximum}, got {maximum + 1}" in err[0]
        options.parse_args([f"{flag}={maximum}"] + (["--bert_hidden_units=4096"] * (flag == "--bert_num_heads")))
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


# ============================================================================ sizes past memory (item 3)
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
    args = sy.make_args("ml-100k", ratings_file, tmp_path, min_item=1, num_test_data=20, val_size=10, **flags)
    return args, dl.MetaDataset.from_args(dl.load_data(args), args)


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
    most = dl.window_count(10 - 1, args.min_sub_window_size)  # every window of a full task window
    assert data.S == most == 36
    _, exact = dataset(ratings_file, tmp_path, num_samples=most, max_seq_len=10)
    for tasks, same in ((data.test_tasks(), exact.test_tasks()), (data.train_batch(5), exact.train_batch(5))):
        assert tasks.support_items.shape[1] == most and torch.equal(tasks.support_items, same.support_items)
        assert int(tasks.support_mask.sum(1).max()) == most  # some task has them all, none more


@pytest.mark.parametrize("m, min_size", [(1, 1), (2, 2), (9, 2), (29, 2), (30, 5), (4095, 2)])
def test_candidate_windows_are_numpys_triangle_without_making_it(m, min_size):
    a, b = np.triu_indices(m + 1, k=min_size)
    assert dl.window_count(m, min_size) == len(a)
    index = np.arange(len(a)) if len(a) < 10 ** 5 else np.random.default_rng(0).choice(len(a), 1000)
    found = dl.candidate_windows(index, m, min_size)
    assert np.array_equal(found[0], a[index]) and np.array_equal(found[1], b[index])


def test_a_long_window_does_not_make_every_window_of_every_length(ratings_file, tmp_path):
    """Every (a, b) of every length below --max_seq_len was made at start: L³/6 pairs, a numpy MemoryError
    (or the OOM killer) at --max_seq_len=4096."""
    script = ("import resource, sys\n"
              f"resource.setrlimit(resource.RLIMIT_AS, ({3 * 2 ** 30}, {3 * 2 ** 30}))\n"
              "import dataloader as dl, synthetic as sy\n"
              f"args = sy.make_args('ml-100k', {ratings_file!r}, {str(tmp_path)!r}, min_item=1, num_test_data=20, "
              "val_size=10, max_seq_len=4096)\n"
              "tasks = dl.MetaDataset.from_args(dl.load_data(args), args).test_tasks()\n"
              "print(tuple(tasks.support_items.shape))\n")
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


# ============================================================================ a lost torchrun process (item 2)
KILLED_AT_STEP_2 = """
import os, signal, sys
import options, {module}
trainer = {module}.{trainer}
step = trainer.{method}
def killed_at_step_2(self, *args):
    if self.dist.rank == 1 and self.step == 2:  # after step 2 was saved, before the next collective
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args)
setattr(trainer, "{method}", killed_at_step_2)
options.run_cli({module}.main, sys.argv[1:])
"""


def free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("module, trainer, method, folder", [
    ("main", "MetaTrainer", "train_step", "ckpt"), ("train_original", "BaselineTrainer", "train_epoch", "pre")])
def test_a_lost_torchrun_process_is_one_line_that_says_where_to_resume(ratings_file, tmp_path, module, trainer,
                                                                      method, folder):
    """The surviving rank printed gloo's 'RuntimeError ... Connection closed by peer' traceback and exited 1
    (item 2). Two processes as torchrun starts them (its environment variables), so that each one's own
    output and exit status can be read."""
    port = free_port()
    argv = small(ratings_file, tmp_path, "--num_train_iterations=6", "--pretrain_epochs=4", "--device=cpu",
                 "--pretraining_batch_size=64")
    script = KILLED_AT_STEP_2.format(module=module, trainer=trainer, method=method)
    ranks = [subprocess.Popen([sys.executable, "-c", script, *argv], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in ranks]
    assert ranks[1].returncode == -9
    err = outputs[0][1]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert ranks[0].returncode == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: lost another process of this torchrun job (") and " by peer" in errors[0]
    assert errors[0].endswith("; resume with --checkpoint_step=2"), errors[0]
    saved = sorted(name for name in os.listdir(tmp_path / folder) if not name.startswith("."))
    assert saved[-1].endswith("_step2.pt") and all(name.endswith(".pt") for name in saved), saved  # no temporary files
    assert torch.load(tmp_path / folder / saved[-1], weights_only=True)["step"] == 2


# ============================================================================ SIGTERM while starting (item 14)
# Runs a script as `python SCRIPT ARGV` does (runpy, as __main__), paused where the test sends SIGTERM: in
# the import of torch, or in reading the ratings file; "paused" on stdout says it got there.
PAUSED = """
import runpy, sys, time
where, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
def pause(*args, **kwargs):
    print("paused", flush=True)
    time.sleep(120)
class PauseInTorchsImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            pause()
if where == "import":
    sys.meta_path.insert(0, PauseInTorchsImport())
else:
    import readers
    readers.read_ratings = pause
    import dataloader  # takes the paused reader
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["main.py", "train_original.py"])
@pytest.mark.parametrize("where", ["import", "loading"])
def test_sigterm_while_starting_is_one_line(ratings_file, tmp_path, where, script):
    """SIGTERM in the first seconds (imports, reading the data) killed the run without a word (item 14)."""
    argv = small(str(tmp_path / "copy.data"), tmp_path)
    with open(ratings_file) as source, open(tmp_path / "copy.data", "w") as copy:  # read anew: no cache
        copy.write(source.read())
    process = subprocess.Popen([sys.executable, "-c", PAUSED, where, script, *argv], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == "paused\n"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip().splitlines() == ["terminated (SIGTERM) outside the training loop (starting, loading data, "
                                        "testing): nothing was saved, and nothing saved before was changed"], err
    for folder in ("ckpt", "pre"):
        assert not os.path.exists(tmp_path / folder) or os.listdir(tmp_path / folder) == []


# ============================================================================ study commands (items 6, 7)
@pytest.mark.parametrize("script", ["compare", "ablation"])
def test_a_file_as_results_dir_is_one_line(ratings_file, tmp_path, script, capsys):
    """compare.py --results_dir=<a file>: NotADirectoryError (item 6), as main.py gives for its folders."""
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
    """shlex's 'ValueError: No closing quotation' (item 7)."""
    line = one_line_error(["--mode=ml-100k", "--define=foo=--inner_lr='0.1", "--variants=foo"], capsys,
                          ablation.main, list)
    assert line == ("error: --define \"foo=--inner_lr='0.1\": its flags cannot be split as a shell would (No "
                    "closing quotation): check the quotes")


# ============================================================================ vague errors (item 11)
@pytest.mark.parametrize("mode, line, name", [
    ("ml-100k", f"{2 ** 70}\t4\t4\t1002", "user id"),
    ("ml-100k", f"{2 ** 64 - 1}\t4\t4\t1002", "user id"),   # was read, silently, as user -1
    ("ml-100k", f"1\t{-2 ** 63 - 1}\t4\t1002", "item id"),
    ("ml-1m", f"1::{2 ** 70}::4::1002", "item id")])
def test_an_id_beyond_64_bits_is_named_with_its_line(tmp_path, mode, line, name):
    """A user id of 2**70 gave 'FILE: could not be parsed' (item 11)."""
    sep = "\t" if mode == "ml-100k" else "::"
    path = tmp_path / "ratings.txt"
    path.write_text(f"1{sep}2{sep}4{sep}1000\n1{sep}3{sep}4{sep}1001\n{line}\n")
    with pytest.raises(options.MeloError) as error:
        dl.load_data(sy.make_args(mode, str(path), tmp_path, min_item=1, min_sequence=2))
    value = line.split(sep)[0 if name == "user id" else 1]
    assert str(error.value) == (f"{path} line 3: {name} {value} does not fit the 64-bit integers MELO stores ids "
                                f"in: number the {name.split()[0]}s anew")


def test_a_text_file_as_a_checkpoint_says_why_without_a_bare_number(ratings_file, tmp_path, capsys):
    """'... (truncated, or not a file MELO wrote): 101', the pickle opcode of its first letter (item 11)."""
    (tmp_path / "ckpt").mkdir()
    checkpoint = tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step4.pt"
    checkpoint.write_text("e.g. notes saved under a checkpoint's name\n")
    line = one_line_error(small(ratings_file, tmp_path, "--checkpoint_step=4", "--test"), capsys, main.main)
    assert line == f"error: cannot read checkpoint {checkpoint} (truncated, or not a file MELO wrote)"


# ============================================================================ a diverging run (item 12)
def warnings_of(err):
    return [line for line in err.splitlines() if line.startswith("warning: the run diverges")]


@pytest.mark.parametrize("flag, where", [("--inner_lr=10000", 0), ("--outer_lr=10000", 2)])
def test_a_diverging_run_says_so_once_and_keeps_the_start_as_best(ratings_file, tmp_path, capsys, flag, where):
    """--inner_lr=10000 or --outer_lr=10000 exited 0 with a validation RMSE of 2.9e12 kept as the best
    checkpoint, without a word (item 12)."""
    capsys.readouterr()
    trainer = main.main(options.parse_args(small(ratings_file, tmp_path, flag, "--num_train_iterations=6")))
    found = warnings_of(capsys.readouterr().err)
    assert len(found) == 1, found
    assert found[0].startswith(f"warning: the run diverges: at step {where} the validation RMSE ")
    assert "is worse than predicting the training users' mean rating" in found[0]
    assert found[0].endswith(("" if where == 0 else "; the best weights stay those of step 0")
                             + "; try a lower --inner_lr, --outer_lr or --lstm_lr")
    assert trainer.best["step"] == 0  # no later step scored below the start


def test_a_score_twice_the_best_so_far_is_diverging_and_a_healthy_run_says_nothing(ratings_file, tmp_path, capsys):
    capsys.readouterr()
    trainer = main.main(options.parse_args(small(ratings_file, tmp_path)))
    assert warnings_of(capsys.readouterr().err) == []
    tasks = trainer.dataset.val_tasks()
    knowing_nothing = trainer.mean_rating_rmse(tasks)
    trainer.best["rmse"] = 0.3 * knowing_nothing  # a step scoring between twice that and knowing nothing
    report = {"rmse": 0.8 * knowing_nothing, "mae": 1.0, "mean_per_rating_rmse": 1.0}
    trainer.warn_if_diverging(report, tasks)
    trainer.warn_if_diverging(report, tasks)  # once
    found = warnings_of(capsys.readouterr().err)
    assert len(found) == 1 and f"more than twice the best so far ({trainer.best['rmse']:.4f} at step " in found[0]


def test_train_original_says_so_too(ratings_file, tmp_path, capsys):
    capsys.readouterr()
    train_original.main(options.parse_args(small(ratings_file, tmp_path, "--pretraining_lr=10000",
                                                  "--pretrain_epochs=2", "--pretraining_batch_size=64")))
    found = warnings_of(capsys.readouterr().err)
    assert len(found) == 1 and found[0].startswith("warning: the run diverges: at epoch 1 the validation RMSE ")
    assert found[0].endswith("; the best weights stay those of epoch 0; try a lower --pretraining_lr")


# ============================================================================ a full log disk (item 1)
FULL_AFTER_STEP_2 = """
import errno, os, sys
import checkpointing, main, options
from tensorboard.summary.writer import record_writer
full, save, write = [False], checkpointing.save_atomic, record_writer.RecordWriter.write
def save_then_fill(state, path):
    save(state, path)
    full[0] = full[0] or state["step"] == 2
def write_unless_full(self, data):  # in TensorBoard's writer thread
    if full[0]:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(self, data)
checkpointing.save_atomic, record_writer.RecordWriter.write = save_then_fill, write_unless_full
options.run_cli(main.main, sys.argv[1:])
"""


def test_a_log_disk_that_fills_mid_run_is_one_line_naming_the_last_saved_step(ratings_file, tmp_path):
    """TensorBoard's writer thread printed 'Exception in thread ... OSError: [Errno 28] No space left on
    device' with its traceback around the error line, which said 'resume with --checkpoint_step=<the last
    saved step>' (item 1)."""
    done = subprocess.run([sys.executable, "-c", FULL_AFTER_STEP_2, *small(ratings_file, tmp_path,
                                                                          "--num_train_iterations=10")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr
    assert "Exception in thread" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    saved = sorted(int(name.split("step")[1][:-3]) for name in os.listdir(tmp_path / "ckpt"))
    assert saved[:2] == [0, 2] and all(name.endswith(".pt") for name in os.listdir(tmp_path / "ckpt"))
    assert errors[0].startswith(f"error: could not write the TensorBoard log in {tmp_path}/runs/")
    assert "(No space left on device)" in errors[0]
    assert errors[0].endswith(f"The checkpoints saved before are intact; resume with --checkpoint_step={saved[-1]}")
