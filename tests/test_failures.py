"""What can go wrong while a run starts or trains ends in one line and changes nothing saved: a lost torchrun
process, SIGTERM while starting, ids and files that are not what they should be, a diverging run (a
warning), a log disk that fills."""
import os
import signal
import subprocess
import sys

import pytest
import torch

from common import errors
import main
import options
from ratings import preprocess
import train_original

from helpers import make_args, one_line_error, small
from test_main import REPO


# ============================================================================ a lost torchrun process
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
   . Two processes as torchrun starts them (its environment variables), so that each one's own
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
    assert ranks[1].returncode == -9, (outputs[0][1][-2000:], outputs[1][1][-2000:])
    err = outputs[0][1]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert ranks[0].returncode == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: lost another process of this torchrun job (") and " by peer" in errors[0]
    assert errors[0].endswith("; resume with --checkpoint_step=2"), errors[0]
    saved = sorted(name for name in os.listdir(tmp_path / folder) if not name.startswith("."))
    assert saved[-1].endswith("_step2.pt") and all(name.endswith(".pt") for name in saved), saved  # no temporary files
    assert torch.load(tmp_path / folder / saved[-1], weights_only=True)["step"] == 2


# ============================================================================ SIGTERM while starting
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
    from ratings import readers
    readers.read_ratings = pause
    from ratings import preprocess  # takes the paused reader
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("script", ["main.py", "train_original.py"])
@pytest.mark.parametrize("where", ["import", "loading"])
def test_sigterm_while_starting_is_one_line(ratings_file, tmp_path, where, script):
    """SIGTERM in the first seconds (imports, reading the data) killed the run without a word."""
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


# ============================================================================ vague errors
@pytest.mark.parametrize("mode, line, name", [
    ("ml-100k", f"{2 ** 70}\t4\t4\t1002", "user id"),
    ("ml-100k", f"{2 ** 64 - 1}\t4\t4\t1002", "user id"),   # was read, silently, as user -1
    ("ml-100k", f"1\t{-2 ** 63 - 1}\t4\t1002", "item id"),
    ("ml-1m", f"1::{2 ** 70}::4::1002", "item id")])
def test_an_id_beyond_64_bits_is_named_with_its_line(tmp_path, mode, line, name):
    """A user id of 2**70 gave 'FILE: could not be parsed'."""
    sep = "\t" if mode == "ml-100k" else "::"
    path = tmp_path / "ratings.txt"
    path.write_text(f"1{sep}2{sep}4{sep}1000\n1{sep}3{sep}4{sep}1001\n{line}\n")
    with pytest.raises(errors.MeloError) as error:
        preprocess.load_data(make_args(mode, str(path), tmp_path, min_item=1, min_sequence=2))
    value = line.split(sep)[0 if name == "user id" else 1]
    assert str(error.value) == (f"{path} line 3: {name} {value} does not fit the 64-bit integers MELO stores ids "
                                f"in: number the {name.split()[0]}s anew")


def test_a_text_file_as_a_checkpoint_says_why_without_a_bare_number(ratings_file, tmp_path, capsys):
    """'... (truncated, or not a file MELO wrote): 101', the pickle opcode of its first letter."""
    (tmp_path / "ckpt").mkdir()
    checkpoint = tmp_path / "ckpt" / "gru4rec_ml-100k_melo_step4.pt"
    checkpoint.write_text("e.g. notes saved under a checkpoint's name\n")
    line = one_line_error(small(ratings_file, tmp_path, "--checkpoint_step=4", "--test"), capsys, main.main)
    assert line == f"error: cannot read checkpoint {checkpoint} (truncated, or not a file MELO wrote)"


# ============================================================================ a diverging run
def warnings_of(err):
    return [line for line in err.splitlines() if line.startswith("warning: the run diverges")]


@pytest.mark.parametrize("flag, where", [("--inner_lr=10000", 0), ("--outer_lr=10000", 2)])
def test_a_diverging_run_says_so_once_and_keeps_the_start_as_best(ratings_file, tmp_path, capsys, flag, where):
    """--inner_lr=10000 or --outer_lr=10000 exited 0 with a validation RMSE of 2.9e12 kept as the best
    checkpoint, without a word."""
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
    # it is that of the tasks given (it once kept the first tasks' value for any later ones)
    test_tasks = trainer.dataset.test_tasks()
    targets = test_tasks.query_ratings[..., -1][test_tasks.query_mask].double()
    assert trainer.mean_rating_rmse(test_tasks) == pytest.approx(
        float(((targets - trainer.training_ratings.mean()) ** 2).mean().sqrt()))
    assert trainer.mean_rating_rmse(test_tasks) != pytest.approx(knowing_nothing)
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


# ============================================================================ a full log disk
FULL_AFTER_STEP_2 = """
import errno, os, sys
import main, options
from training import checkpointing
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
    saved step>'."""
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
